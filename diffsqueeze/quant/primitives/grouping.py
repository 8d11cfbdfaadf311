"""Helpers of every number format: finite-input checks, the working dtype, and grouping of the
last dimension for per-group scales. Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor


def check_finite(x: Tensor, what: str = "input") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or +-Inf (quantizers have no code for them).

    Args:
        x: Tensor to check.
        what: Name used in the message.

    Raises:
        ValueError: Some element is not finite.
    """
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(bad.sum()) - n_nan
        raise ValueError(
            f"cannot quantize {what}: it contains {n_nan} NaN and {n_inf} Inf value(s) "
            f"out of {x.numel()}; quantization needs finite numbers"
        )


def work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def to_groups(x: Tensor, group_size: int) -> Tensor:
    """Split the last dim of ``x`` into groups: ``(..., n) -> (..., n // group_size, group_size)``.

    Scales of shape ``(..., n // group_size, 1)`` then broadcast per group.

    Raises:
        ValueError: ``group_size`` is not positive or does not divide the last dim.
    """
    n = x.shape[-1]
    if group_size <= 0 or n % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide the last dim {n}")
    return x.reshape(*x.shape[:-1], n // group_size, group_size)


def from_groups(x: Tensor) -> Tensor:
    """Inverse of :func:`to_groups`: merge the last two dims."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])
