"""Boolean masks at one bit per element: how pruning masks are held in memory and stored.

A bool tensor costs a byte per weight (2.6 GB for an SDXL UNet, a quarter of its FP32 size);
packed, an eighth of that. Layout: a flat ``uint8`` stream, element ``8j + i`` in bit ``i``
of byte ``j`` (the 1-bit case of :mod:`diffsqueeze.quant.primitives.pack`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["pack_bool", "unpack_bool"]


def pack_bool(mask: Tensor) -> Tensor:
    """A boolean tensor as 1 bit per element (True = 1), ``ceil(numel / 8)`` bytes."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, dtype=torch.uint8, device=flat.device)
    return (flat.reshape(-1, 8) << shifts).sum(dim=1, dtype=torch.uint8)


def unpack_bool(packed: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_bool` for a mask of ``shape``.

    Raises:
        ValueError: ``packed`` does not hold exactly ``ceil(numel / 8)`` bytes.
    """
    numel = math.prod(shape)
    if packed.numel() != math.ceil(numel / 8):
        raise ValueError(f"a packed mask of shape {tuple(shape)} needs {math.ceil(numel / 8)} bytes, got {packed.numel()}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].reshape(tuple(shape)).bool()
