"""The bytes a GGUF file holds for a tensor of type Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0, from the codes and
scales the formats of :mod:`.gguf_legacy` and :mod:`.gguf_q8_0` compute (for an exporter that writes
``.gguf`` files; the tests check them against ``gguf.quants.quantize`` byte for byte).

Each row of ``n`` values becomes ``n / 32`` blocks laid out as ggml's structs (little endian):

======  =====  ==========================================================================
type    bytes  block
======  =====  ==========================================================================
Q4_0    18     ``d`` f16, ``qs[16]``: ``qs[j] = q[j] | q[j + 16] << 4``
Q4_1    20     ``d`` f16, ``m`` f16, ``qs[16]`` as Q4_0
Q5_0    22     ``d`` f16, ``qh`` u32 (bit ``j`` = bit 4 of ``q[j]``), ``qs[16]`` of the low nibbles
Q5_1    24     ``d`` f16, ``m`` f16, ``qh``, ``qs[16]`` as Q5_0
Q8_0    34     ``d`` f16, ``qs[32]`` int8
======  =====  ==========================================================================

Pure tensor functions (float16 bytes are read in the machine's order: little endian, as on every
platform torch runs on).
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffsqueeze.quant.primitives.gguf_legacy import BLOCK, GGUF_LEGACY_FORMATS, LegacyCodes, legacy_quantize
from diffsqueeze.quant.primitives.gguf_q8_0 import q8_0_quantize

__all__ = ["GGUF_TYPE_SIZES", "gguf_blocks", "gguf_quantize_bytes"]

GGUF_TYPE_SIZES = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34}
"""Bytes of one block of 32 values, per type (ggml's ``GGML_QUANT_SIZES``)."""


def _f16_bytes(v: Tensor) -> Tensor:
    """``(..., n_blocks)`` float16 -> ``(..., n_blocks, 2)`` uint8."""
    v = v.to(torch.float16).contiguous()
    return v.view(torch.uint8).reshape(*v.shape, 2)


def _low_nibbles(q: Tensor) -> Tensor:
    """``(..., 32)`` codes -> ``(..., 16)`` bytes ``(q[j] & 15) | (q[j + 16] & 15) << 4``."""
    q = q & 15
    return q[..., :16] | (q[..., 16:] << 4)


def _high_bits(q: Tensor) -> Tensor:
    """``(..., 32)`` 5-bit codes -> ``(..., 4)`` bytes of the little-endian u32 whose bit ``j`` is bit 4 of ``q[j]``."""
    bits = ((q >> 4) & 1).reshape(*q.shape[:-1], 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    return (bits << shifts).sum(dim=-1, dtype=torch.uint8)


def gguf_blocks(name: str, codes: Tensor, d: Tensor, m: Tensor | None = None) -> Tensor:
    """GGUF blocks of stored codes: uint8 ``(..., n_blocks * type_size)``.

    Args:
        name: ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` or ``q8_0``.
        codes: ``(..., n)``, ``n`` a multiple of 32: uint8 codes of the legacy types, int8 for Q8_0.
        d: float16 scales ``(..., n / 32)``.
        m: float16 block minimums of the ``_1`` types (None for the others).

    Raises:
        ValueError: unknown type, a missing or unexpected ``m``, or shapes that do not match.
    """
    if name not in GGUF_TYPE_SIZES:
        raise ValueError(f"no GGUF layout for {name!r}; known: {', '.join(GGUF_TYPE_SIZES)}")
    has_min = name.endswith("_1")
    if (m is None) == has_min:
        raise ValueError(f"{name} {'needs' if has_min else 'takes no'} block minimums")
    n = codes.shape[-1]
    if n % BLOCK or tuple(d.shape) != (*codes.shape[:-1], n // BLOCK) or (m is not None and m.shape != d.shape):
        raise ValueError(f"{name}: codes {tuple(codes.shape)} need a last dim that is a multiple of {BLOCK} and "
                         f"scales of shape {(*codes.shape[:-1], n // BLOCK)}; got d {tuple(d.shape)}"
                         + (f", m {tuple(m.shape)}" if m is not None else ""))
    q = codes.reshape(*codes.shape[:-1], n // BLOCK, BLOCK)
    parts = [_f16_bytes(d)]
    if name == "q8_0":
        parts.append(q.to(torch.int8).view(torch.uint8))
    else:
        q = q.to(torch.uint8)
        if m is not None:
            parts.append(_f16_bytes(m))
        if name.startswith("q5"):
            parts.append(_high_bits(q))
        parts.append(_low_nibbles(q))
    out = torch.cat(parts, dim=-1)
    return out.reshape(*codes.shape[:-1], -1)


def gguf_quantize_bytes(x: Tensor, name: str) -> Tensor:
    """What ``gguf.quants.quantize(x, GGMLQuantizationType.<NAME>)`` returns for ``x`` (last dim a
    positive multiple of 32), computed by this package's encoders: uint8 ``(..., n / 32 * type_size)``."""
    if name == "q8_0":
        codes, d = q8_0_quantize(x)
        return gguf_blocks(name, codes, d)
    if name not in GGUF_LEGACY_FORMATS:
        raise ValueError(f"no GGUF layout for {name!r}; known: {', '.join(GGUF_TYPE_SIZES)}")
    q: LegacyCodes = legacy_quantize(x, GGUF_LEGACY_FORMATS[name])
    return gguf_blocks(name, q.codes, q.d, q.m)
