"""Bit packing of low-bit codes into bytes (the storage of exported quantized weights).

Codes are unsigned integers ``0 <= c < 2^bits`` held in any integer tensor. They are packed
little-endian into a flat ``uint8`` stream: for 1, 2 and 4 bits, ``8 / bits`` codes per byte,
the first code in the lowest bits; 8-bit codes are stored one per byte as they are; any other
width (3, 5, 6, 7 bits) is a continuous bit stream (code ``i`` occupies bits
``i*bits .. i*bits+bits-1``, lowest first), so 3-bit codes take 3 bits each, not 4.

``packed_nbytes(n, bits) == ceil(n * bits / 8)`` for every width; the unused high bits of the
last byte are zero, and :func:`unpack_codes` checks the stream length so a truncated or padded
buffer fails loudly instead of giving shifted weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffsqueeze.bitmask import pack_bool, unpack_bool  # masks: re-exported beside the codes

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "pack_bool", "unpack_bool"]

PACK_BITS = range(1, 9)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in PACK_BITS:
        raise ValueError(f"cannot pack {bits!r}-bit codes; widths 1..8 are supported")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack_codes` uses for ``numel`` codes of ``bits`` bits."""
    _check_bits(bits)
    return math.ceil(numel * bits / 8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, read in row-major order) into ``uint8``.

    Raises:
        ValueError: unsupported width, or a code outside ``0 .. 2^bits - 1``.
    """
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits: min {int(flat.min())}, max {int(flat.max())}")
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-flat.numel()) % per
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        shifts = torch.arange(per, dtype=torch.uint8, device=flat.device) * bits
        return (flat.reshape(-1, per) << shifts).sum(dim=1, dtype=torch.uint8)
    # generic bit stream: one uint8 per bit, then 8 bits per byte
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    return (stream.reshape(-1, 8) << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: Tensor, numel: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a flat ``uint8`` tensor.

    Raises:
        ValueError: ``packed`` is not a flat ``uint8`` tensor of exactly
            :func:`packed_nbytes` bytes (a truncated or damaged artifact).
    """
    _check_bits(bits)
    need = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed {bits}-bit buffer for {numel} codes must be {need} uint8 bytes, "
                         f"got {packed.numel()} {str(packed.dtype).replace('torch.', '')} of shape {tuple(packed.shape)}")
    if bits == 8:
        return packed
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        return ((packed.reshape(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)[:numel]
    stream = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    weights = (2 ** torch.arange(bits, device=packed.device)).to(torch.uint8)
    return (stream * weights).sum(dim=1, dtype=torch.uint8)
