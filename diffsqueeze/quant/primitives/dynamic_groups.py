"""Dynamic per-token-group activation quantization (SVDQuant's activations, METHODS §10).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from diffsqueeze.quant.primitives.fp_format import FPFormat, fp_quantize, maxval
from diffsqueeze.quant.primitives.grouping import from_groups, to_groups, work_dtype
from diffsqueeze.quant.primitives.int_format import (
    IntFormat,
    int_code_range,
    int_fake_quantize,
)

__all__ = ["dynamic_group_fake_quantize", "dynamic_group_scales"]


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


def dynamic_group_scales(g: Tensor, fmt: IntFormat | FPFormat) -> tuple[Tensor, Tensor | None]:
    """Scale (and INT zero point) of each group of ``g`` (``(..., n_groups, group_size)``)."""
    one = torch.ones((), dtype=g.dtype, device=g.device)
    if isinstance(fmt, IntFormat):
        lo, hi = int_code_range(fmt.bits, fmt.symmetric)
        if fmt.symmetric:
            s = g.abs().amax(dim=-1, keepdim=True) / hi
            s = torch.where(s > 0, s, one)
            return s, None
        mn = g.amin(dim=-1, keepdim=True).clamp(max=0)
        mx = g.amax(dim=-1, keepdim=True).clamp(min=0)
        s = (mx - mn) / (hi - lo)
        s = torch.where(s > 0, s, one)
        return s, lo - torch.round(mn / s)
    s = g.abs().amax(dim=-1, keepdim=True) / maxval(fmt, float(fmt.standard_bias))
    return torch.where(s > 0, s, one), None


def dynamic_group_fake_quantize(x: Tensor, fmt: IntFormat | FPFormat, group_size: int, dim: int = -1) -> Tensor:
    """Quantize-dequantize ``x`` with one scale per group of ``group_size`` along ``dim``.

    Args:
        x: Finite values; ``dim`` is the channel dim (1 for a conv input, -1 for a linear one).
        fmt: INT (symmetric or asymmetric) or FP element format.
        group_size: Channels per group (clipped to the width of ``dim``).
        dim: The dim split into groups; every index of the other dims has its own scales.

    Returns:
        ``x_hat`` of ``x``'s shape and dtype.
    """
    g, n = _grouped(x, group_size, dim)
    s, z = dynamic_group_scales(g, fmt)
    if isinstance(fmt, IntFormat):
        out = int_fake_quantize(g, s, z, bits=fmt.bits, symmetric=fmt.symmetric, check=False)
    else:
        out = fp_quantize(g / s, fmt, fmt.standard_bias, check=False) * s
    return from_groups(out)[..., :n].movedim(-1, dim).to(x.dtype)
