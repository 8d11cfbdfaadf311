"""Dynamic per-token-group activation quantization (SVDQuant's activations, docs/methods.md §10).

Every group of ``group_size`` consecutive input channels of every token (every pixel of a conv
input, every sequence position of a linear input) gets its own scale, computed from the group's
own range when the tensor arrives: nothing is calibrated, and one outlier channel costs only its
own group's resolution. The scales are kept in the working precision (float32); a kernel that
stores them in 16 bits rounds them once more.

- INT symmetric: ``s = amax / qmax`` (``qmax = 2^(b-1) - 1``), zero point 0.
- INT asymmetric: ``s = (max(x_max, 0) - min(x_min, 0)) / (2^b - 1)``, ``z = -round(min / s)``,
  so that 0 is exactly representable (zero padding stays zero).
- FP ExMy: ``s = amax / maxval`` (the format's largest value at its standard bias).

A layer width that is not a multiple of the group size gets a shorter last group; a group that
is all zero gets scale 1 (its values are exact). Pure tensor functions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from diffsqueeze.quant.primitives.grouping import from_groups, to_groups, work_dtype

__all__ = ["dynamic_group_fake_quantize"]


def _grouped(x: Tensor, group_size: int, dim: int) -> tuple[Tensor, int]:
    """``x`` with ``dim`` last, zero-padded to a multiple of the group and split in groups."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    xt = x.movedim(dim, -1).to(work_dtype(x))
    n = xt.shape[-1]
    gs = min(group_size, n)
    pad = (-n) % gs
    if pad:
        xt = F.pad(xt, (0, pad))
    return to_groups(xt, gs), n


def dynamic_group_fake_quantize(x: Tensor, fmt, group_size: int, dim: int = -1) -> Tensor:
    """Quantize-dequantize ``x`` with one scale per group of ``group_size`` along ``dim``.

    Args:
        x: Finite values; ``dim`` is the channel dim (1 for a conv input, -1 for a linear one).
        fmt: A number format (INT symmetric or asymmetric, FP ExMy, ...).
        group_size: Channels per group (clipped to the width of ``dim``).
        dim: The dim split into groups; every index of the other dims has its own scales.

    Returns:
        ``x_hat`` of ``x``'s shape and dtype.
    """
    g, n = _grouped(x, group_size, dim)
    s, z = fmt.group_scales(g)
    out = fmt.scaled_fake_quantize(g, s, z)
    return from_groups(out)[..., :n].movedim(-1, dim).to(x.dtype)
