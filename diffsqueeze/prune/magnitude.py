"""Magnitude pruning (docs/methods.md §8): zero the weights of smallest |W|, exactly as many as asked.

Pure functions on tensors; :mod:`diffsqueeze.prune.stage` applies them to pipelines.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def n_to_prune(numel: int, sparsity: float) -> int:
    """Weights to remove so that achieved sparsity is the target rounded to the nearest weight."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return int(round(sparsity * numel))


def smallest_k_mask(scores: list[torch.Tensor], k: int, absolute: bool = False) -> list[torch.Tensor]:
    """:func:`iter_smallest_k_masks` as a list."""
    return list(iter_smallest_k_masks(scores, k, absolute))


def iter_smallest_k_masks(scores: list[torch.Tensor], k: int, absolute: bool = False) -> Iterator[torch.Tensor]:
    """Keep-masks removing exactly the ``k`` smallest scores across all tensors together.

    Ties at the threshold are broken by position (tensor order, then flat index), so the count is
    exact and the result deterministic. The masks come one at a time, in the order of ``scores``.

    Memory stays at one tensor's size beyond the masks (a 2.6B-weight UNet is never concatenated):
    the k-th smallest value is found by a two-pass radix select on the float32 bit patterns (for
    non-negative floats their order is the integers' order): the upper 16 bits' histogram finds
    the bucket holding the k-th value, the lower 16 bits' histogram inside it the exact value.

    Args:
        scores: non-negative importance tensors, any shapes; with ``absolute`` the weights
            themselves, scored by ``|W|`` one tensor at a time.
        k: how many entries to remove in total.
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"cannot prune {k} of {total} weights")
    if k == 0:
        yield from (torch.ones_like(s, dtype=torch.bool) for s in scores)
        return

    def bits_of(s: torch.Tensor) -> torch.Tensor:
        v = s.detach().reshape(-1).float()
        return (v.abs() if absolute else v).view(torch.int32)

    high = sum(torch.bincount((bits_of(s) >> 16).long(), minlength=2**15) for s in scores)
    bucket = int(torch.searchsorted(high.cumsum(0), k))  # first bucket whose cumulative count reaches k
    before = int(high[:bucket].sum())
    low = torch.zeros(2**16, dtype=torch.long, device=scores[0].device)
    for s in scores:
        b = bits_of(s)
        low += torch.bincount((b[(b >> 16) == bucket] & 0xFFFF).long(), minlength=2**16)
    value = (bucket << 16) | int(torch.searchsorted(low.cumsum(0), k - before))
    below_total = before + int(low[: value & 0xFFFF].sum())
    ties_left = k - below_total  # ties at the threshold removed first come, first served
    for s in scores:
        b = bits_of(s)
        remove = b < value  # a Python int: compares on the scores' own device
        if ties_left:
            ties = (b == value).nonzero().squeeze(1)[:ties_left]
            remove[ties] = True
            ties_left -= ties.numel()
        yield (~remove).reshape(s.shape)


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
