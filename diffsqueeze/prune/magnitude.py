"""Magnitude pruning (METHODS 8): zero the weights of smallest |W|, exactly as many as asked.

Pure functions on tensors; :mod:`diffsqueeze.prune.stage` applies them to pipelines.
"""

from __future__ import annotations

import torch


def n_to_prune(numel: int, sparsity: float) -> int:
    """Weights to remove so that achieved sparsity is the target rounded to the nearest weight."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round(sparsity * numel))


def smallest_k_mask(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Keep-masks removing exactly the ``k`` smallest scores across all tensors together.

    Ties at the threshold are broken by position (tensor order, then flat index), so the count is
    exact and the result deterministic.

    Args:
        scores: non-negative importance tensors (|W|), any shapes.
        k: how many entries to remove in total.
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} weights")
    if k == 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in scores]
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    threshold = torch.kthvalue(flat, k).values
    below = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)
    remove = below.clone()
    remove[ties[: k - int(below.sum())]] = True
    keep = ~remove
    masks, start = [], 0
    for s in scores:
        masks.append(keep[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return masks


def n_m_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: in every group of ``m`` consecutive weights along the input dimension keep the ``n`` largest |W|.

    The weight is viewed as ``[out, in * kh * kw]`` (for Linear this is NVIDIA's 2:4 layout along
    in_features). Ties keep the earlier position.

    Raises:
        ValueError: the row length is not a multiple of ``m``.
    """
    rows = weight.reshape(weight.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(f"row length {rows.shape[1]} is not a multiple of M={m}")
    groups = rows.detach().abs().float().reshape(rows.shape[0], -1, m)
    # stable descending order: earlier positions win ties
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(weight.shape)
