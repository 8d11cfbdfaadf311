"""Rounding functions: AdaRound's rectified sigmoid and regulariser (docs/methods.md §4), and the
straight-through and gradient-scale tricks of LSQ (§5). Pure tensor functions."""

from __future__ import annotations

import torch
from torch import Tensor

ZETA, GAMMA = 1.1, -0.1
"""AdaRound's stretch of the rectified sigmoid (docs/methods.md §4)."""


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (docs/methods.md §4)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(r: Tensor) -> Tensor:
    """``V = -log((zeta - gamma) / (r - gamma) - 1)``, so that ``h(V) = r`` (docs/methods.md §4)."""
    r = r.clamp(0.0, 1.0)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1.0)


def rounding_regularizer(v: Tensor, beta: float) -> Tensor:
    """``sum(1 - |2 h(V) - 1|^beta)`` (docs/methods.md §4)."""
    return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()


def round_ste(x: Tensor) -> Tensor:
    """Value ``round(x)``, gradient of the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Value ``x``, gradient scaled by ``g`` (LSQ)."""
    return (x - x * g).detach() + x * g
