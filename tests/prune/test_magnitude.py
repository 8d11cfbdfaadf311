"""Magnitude pruning math: exact counts, smallest magnitudes first, deterministic ties, N:M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsqueeze.prune.magnitude import n_m_mask, n_to_prune, smallest_k_mask


def reference_keep(values: list[np.ndarray], k: int) -> list[np.ndarray]:
    """float64 numpy reference: stable sort of |w| over all tensors, drop the first k."""
    flat = np.concatenate([np.abs(v.astype(np.float64)).ravel() for v in values])
    order = np.argsort(flat, kind="stable")
    keep = np.ones_like(flat, dtype=bool)
    keep[order[:k]] = False
    out, start = [], 0
    for v in values:
        out.append(keep[start : start + v.size].reshape(v.shape))
        start += v.size
    return out


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.35, 0.5, 0.99])
def test_global_mask_matches_reference_and_count(sparsity):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(16, 8, generator=g), torch.randn(5, 3, 3, 3, generator=g) * 3, torch.randn(7, generator=g)]
    total = sum(t.numel() for t in tensors)
    k = n_to_prune(total, sparsity)
    masks = smallest_k_mask([t.abs() for t in tensors], k)
    assert sum(int((~m).sum()) for m in masks) == k
    for m, ref in zip(masks, reference_keep([t.numpy() for t in tensors], k)):
        np.testing.assert_array_equal(m.numpy(), ref)


def test_ties_are_broken_by_position_with_exact_count():
    w = torch.tensor([1.0, 0.5, 0.5, 0.5, 2.0, 0.5])
    mask = smallest_k_mask([w.abs()], 3)[0]
    assert mask.tolist() == [True, False, False, False, True, True]
    assert int((~mask).sum()) == 3
    np.testing.assert_array_equal(mask.numpy(), reference_keep([w.numpy()], 3)[0])


def test_zeros_already_pruned_are_pruned_first():
    w = torch.tensor([0.0, 0.0, 3.0, -1.0, 2.0])
    assert smallest_k_mask([w.abs()], 3)[0].tolist() == [False, False, True, False, True]


def test_rounding_of_target_is_within_one_weight():
    for n in (7, 101, 1000):
        for s in (0.1, 0.333, 0.475):
            assert abs(n_to_prune(n, s) - s * n) <= 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        n_to_prune(10, 1.0)


def test_n_m_mask_keeps_n_largest_per_group():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 16, generator=g)
    mask = n_m_mask(w, 2, 4)
    groups = mask.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    kept_min = torch.where(groups, w.abs().reshape(6, 4, 4), torch.inf).amin(-1)
    dropped_max = torch.where(~groups, w.abs().reshape(6, 4, 4), -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    conv = torch.randn(4, 2, 2, 2, generator=g)
    assert n_m_mask(conv, 2, 4).reshape(4, -1, 4).sum(-1).eq(2).all()
    with pytest.raises(ValueError, match="multiple of M=4"):
        n_m_mask(torch.randn(3, 6), 2, 4)


@pytest.mark.gpu
def test_global_mask_on_cuda_equals_the_cpu_mask():
    """The threshold search keeps its histograms on the scores' device (it once mixed in a CPU tensor)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(64, 32, generator=g).abs(), torch.randn(300, generator=g).abs()]
    scores[1][:10] = scores[0][0, 0]  # ties at the threshold
    k = 900
    cpu = smallest_k_mask(scores, k)
    cuda = smallest_k_mask([s.cuda() for s in scores], k)
    assert all(c.device.type == "cuda" and torch.equal(a, c.cpu()) for a, c in zip(cpu, cuda))
