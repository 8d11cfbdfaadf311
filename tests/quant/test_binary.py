"""LMB binarizer math (docs/methods.md §7) against plain float64 loops: scales, values, gradients, masks."""

from __future__ import annotations

import pytest
import torch

from diffsqueeze.quant.primitives.binary import (
    binarize,
    binarize_reference,
    binary_sign,
    init_scales,
)


def loop_scales(w: torch.Tensor, mask: torch.Tensor | None):
    """a1 = mean|W|, a2 = mean|W - a1 sign W| per row over kept entries, in float64 Python loops."""
    rows = w.double().reshape(w.shape[0], -1).tolist()
    keep = (mask.reshape(w.shape[0], -1).tolist() if mask is not None else [[True] * len(r) for r in rows])
    a1s, a2s = [], []
    for r, k in zip(rows, keep):
        vals = [v for v, kk in zip(r, k) if kk]
        n = max(len(vals), 1)
        a1 = sum(abs(v) for v in vals) / n
        a2 = sum(abs(v - a1 * (1.0 if v >= 0 else -1.0)) for v in vals) / n
        a1s.append(a1)
        a2s.append(a2)
    return torch.tensor(a1s, dtype=torch.float64), torch.tensor(a2s, dtype=torch.float64)


def loop_binarize(w, a1, a2, order, mask):
    rows = w.double().reshape(w.shape[0], -1).tolist()
    keep = mask.reshape(w.shape[0], -1).tolist() if mask is not None else [[True] * len(r) for r in rows]
    out = []
    for i, (r, k) in enumerate(zip(rows, keep)):
        row = []
        for v, kk in zip(r, k):
            if not kk:
                row.append(0.0)
                continue
            s1 = 1.0 if v >= 0 else -1.0
            x = float(a1[i]) * s1
            if order == 2:
                x += float(a2[i]) * (1.0 if v - float(a1[i]) * s1 >= 0 else -1.0)
            row.append(x)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(w.shape)


@pytest.fixture
def weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64) * 0.7
    w[0, 0, 0, 0] = 0.0  # an unpruned exact zero: sign +1
    w[1, 0, 0, 0] = 2.5  # outside the STE window
    return w


def test_binary_sign_never_zero():
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    assert binary_sign(x).tolist() == [-1.0, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("masked", [False, True])
def test_init_scales_match_loops(weight, masked):
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.4) if masked else None
    a1, a2 = init_scales(weight, 2, mask)
    r1, r2 = loop_scales(weight, mask)
    assert a1.shape == (6, 1) and a2.shape == (6, 1)
    torch.testing.assert_close(a1.reshape(-1), r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a2.reshape(-1), r2, rtol=1e-12, atol=1e-12)
    b1, none = init_scales(weight, 1, mask)
    assert none is None
    torch.testing.assert_close(b1, a1)


def test_fully_pruned_row_gets_zero_scales(weight):
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[2] = False
    a1, a2 = init_scales(weight, 2, mask)
    assert a1[2].item() == 0.0 and a2[2].item() == 0.0
    assert binarize(weight, a1, a2, 2, mask)[2].abs().sum().item() == 0.0


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_binarize_values_match_loops(weight, order, masked):
    mask = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(2)) > 0.5) if masked else None
    w = weight * mask if masked else weight  # pruned weights are zero in the model
    a1, a2 = init_scales(w, order, mask)
    out = binarize(w, a1, a2, order, mask)
    ref = loop_binarize(w, a1.reshape(-1), a2.reshape(-1) if a2 is not None else None, order, mask)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
    torch.testing.assert_close(binarize_reference(w, a1, a2, order, mask), ref, rtol=0, atol=1e-15)
    if masked:
        assert (out[~mask] == 0).all()
    # distinct values per row: {±a1} (order 1) or {±a1 ± a2} (order 2), plus 0 where pruned
    for i in range(w.shape[0]):
        vals = set(out[i].reshape(-1).tolist()) - ({0.0} if masked else set())
        assert len(vals) <= 2 * order


def test_order2_is_closer_than_order1(weight):
    a1, a2 = init_scales(weight, 2)
    e1 = (binarize(weight, a1, None, 1) - weight).pow(2).sum()
    e2 = (binarize(weight, a1, a2, 2) - weight).pow(2).sum()
    assert e2 < e1


@pytest.mark.parametrize("order", [1, 2])
def test_gradients_ste_and_scales(weight, order):
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.3
    w0 = weight * mask
    a1, a2 = init_scales(w0, order, mask)
    w = w0.clone().requires_grad_(True)
    a1 = a1.clone().requires_grad_(True)
    a2 = a2.clone().requires_grad_(True) if a2 is not None else None
    g = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (binarize(w, a1, a2, order, mask) * g).sum().backward()
    # W: straight through where |W| <= 1 and kept, zero elsewhere
    expected_w = g * ((w0.abs() <= 1) & mask).double()
    torch.testing.assert_close(w.grad, expected_w, rtol=0, atol=0)
    assert w.grad[1, 0, 0, 0] == 0.0  # |W| = 2.5 > 1
    # a1, a2: sum over the row of g * basis
    s1 = torch.where(w0 >= 0, 1.0, -1.0).double() * mask
    torch.testing.assert_close(a1.grad.reshape(-1), (g * s1).reshape(6, -1).sum(1), rtol=1e-12, atol=1e-12)
    if order == 2:
        r = w0 - a1.detach().reshape(-1, 1, 1, 1) * s1
        s2 = torch.where(r >= 0, 1.0, -1.0).double() * mask
        torch.testing.assert_close(a2.grad.reshape(-1), (g * s2).reshape(6, -1).sum(1), rtol=1e-12, atol=1e-12)


def test_order2_needs_a2(weight):
    a1, _ = init_scales(weight, 1)
    with pytest.raises(ValueError):
        binarize(weight, a1, None, 2)
    with pytest.raises(ValueError):
        init_scales(weight, 3)
