"""Learnable multi-basis binarizer (LMB) of BinaryDM, as pure tensor functions (docs/methods.md §7).

Per output channel (row ``i`` of ``W`` viewed as ``(out, -1)``)::

    order 1:  W_hat = a1 * sign(W)
    order 2:  W_hat = a1 * sign(W) + a2 * sign(W - a1 * sign(W))

initialized explicitly from the weights: ``a1 = mean|W|``, ``a2 = mean|W - a1 sign(W)|``.
Gradients: straight-through to ``W`` where ``|W| <= 1`` (zero elsewhere); ``a1`` and ``a2`` get
their exact gradients (``sum g * sign(.)`` over the row).

``sign`` here is binary: ``+1`` for ``x >= 0``, ``-1`` for ``x < 0``, so an unpruned weight is
always one of ``±a1`` (order 1) or ``±a1 ± a2`` (order 2). Pruned weights (``mask`` False) give
0, so a pruned layer binarizes to ``{-a, 0, +a}``; the means of the initialization are taken
over the kept entries only. Both the value and the gradient of a pruned entry are exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

ORDERS = (1, 2)


def binary_sign(x: Tensor) -> Tensor:
    """``+1`` where ``x >= 0``, ``-1`` elsewhere (never 0), in ``x``'s dtype."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _keep(w: Tensor, mask: Tensor | None) -> Tensor:
    """Kept entries as ``w``'s dtype (all ones without a mask)."""
    if mask is None:
        return torch.ones_like(w)
    if mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(w.shape)}")
    return mask.to(device=w.device, dtype=w.dtype)


def binary_bases(w: Tensor, a1: Tensor, order: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The sign bases ``b1 = sign(W)`` and (order 2) ``b2 = sign(W - a1 b1)``, zero where pruned.

    Args:
        w: weight ``(out, ...)``.
        a1: first scale, ``(out, 1)`` (or anything that broadcasts against ``w`` as ``(out, -1)``).
        order: 1 or 2.
        mask: optional bool tensor shaped like ``w``; False = pruned.

    Returns:
        ``(b1, b2)`` shaped like ``w`` (``b2`` is None for order 1); no gradient flows through them.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be 1 or 2, got {order}")
    with torch.no_grad():
        keep = _rows(_keep(w, mask))
        wr = _rows(w)
        b1 = binary_sign(wr) * keep
        b2 = None
        if order == 2:
            b2 = (binary_sign(wr - a1.reshape(-1, 1).to(w.dtype) * b1) * keep).reshape(w.shape)
    return b1.reshape(w.shape), b2


@torch.no_grad()
def init_scales(w: Tensor, order: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """LMB initialization per output channel (docs/methods.md §7): ``a1 = mean|W|``, ``a2 = mean|W - a1 sign(W)|``.

    Means run over the kept (unpruned) entries of each row; a fully pruned row gets 0.

    Returns:
        ``(a1, a2)``, each ``(out, 1)`` in ``w``'s dtype; ``a2`` is None for order 1.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be 1 or 2, got {order}")
    keep = _rows(_keep(w, mask))
    wr = _rows(w) * keep
    count = keep.sum(dim=1, keepdim=True).clamp(min=1)
    a1 = wr.abs().sum(dim=1, keepdim=True) / count
    if order == 1:
        return a1, None
    b1 = binary_sign(wr) * keep
    a2 = ((wr - a1 * b1).abs() * keep).sum(dim=1, keepdim=True) / count
    return a1, a2


def ste_weight(w: Tensor, mask: Tensor | None = None, clip: float = 1.0) -> Tensor:
    """Zero-valued term whose gradient w.r.t. ``w`` is ``1[|W| <= clip]`` (and 0 where pruned)."""
    gate = (w.detach().abs() <= clip).to(w.dtype) * _keep(w, mask)
    wg = w * gate
    return wg - wg.detach()


def binarize(w: Tensor, a1: Tensor, a2: Tensor | None = None, order: int = 2, mask: Tensor | None = None,
             clip: float = 1.0) -> Tensor:
    """Multi-basis binarization of ``w`` (docs/methods.md §7) with the clipped straight-through estimator.

    Args:
        w: latent FP weight ``(out, ...)``.
        a1: ``(out, 1)`` first-basis scale (learnable).
        a2: ``(out, 1)`` second-basis scale, required for order 2.
        order: 1 or 2.
        mask: optional pruning mask (False = pruned, output exactly 0 there).
        clip: the STE passes gradients where ``|W| <= clip`` (1 in BinaryDM).

    Returns:
        ``W_hat`` shaped like ``w``.
    """
    if order == 2 and a2 is None:
        raise ValueError("order 2 needs a2")
    b1, b2 = binary_bases(w, a1, order, mask)
    out = _rows(b1) * a1.reshape(-1, 1)
    if order == 2:
        out = out + _rows(b2) * a2.reshape(-1, 1)
    return out.reshape(w.shape) + ste_weight(w, mask, clip)


def binarize_reference(w: Tensor, a1: Tensor, a2: Tensor | None, order: int, mask: Tensor | None = None) -> Tensor:
    """Straightforward float64 loop-free reference of the forward value (for tests and checks)."""
    w64 = _rows(w.detach().double())
    keep = torch.ones_like(w64) if mask is None else _rows(mask).double()
    s1 = torch.where(w64 >= 0, 1.0, -1.0).double()
    out = a1.double().reshape(-1, 1) * s1
    if order == 2:
        r = w64 - out
        out = out + a2.double().reshape(-1, 1) * torch.where(r >= 0, 1.0, -1.0).double()
    return (out * keep).reshape(w.shape)
