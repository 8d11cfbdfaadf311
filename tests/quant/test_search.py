"""Tests of diffsqueeze.quant.primitives.search: candidates, selection and losses against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffsqueeze.quant.primitives import formats as F
from diffsqueeze.quant.primitives import search as S
from diffsqueeze.quant.primitives.formats import (
    E1M2,
    E2M1,
    E2M1_HW,
    E3M0,
    E4M3,
    E4M3_HW,
    E5M2,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _heavy(n: int, seed: int) -> torch.Tensor:
    """Bulk of small values plus a few outliers: clipping the range pays off."""
    g = _gen(seed)
    x = torch.randn(n, dtype=torch.float64, generator=g)
    x[:3] = torch.tensor([9.0, -6.0, 7.5], dtype=torch.float64)
    return x


# ---------------------------------------------------------------------------- helpers


def test_keep_shape_minmax_quantile():
    x = torch.randn(3, 4, 5, generator=_gen(0))
    assert S.keep_shape(x, None) == [1, 1, 1]
    assert S.keep_shape(x, 1) == [1, 4, 1]
    assert S.keep_shape(x, (0, -1)) == [3, 1, 5]
    lo, hi = S.channel_minmax(x, 1)
    assert torch.equal(lo, x.amin(dim=(0, 2), keepdim=True))
    assert torch.equal(hi, x.amax(dim=(0, 2), keepdim=True))
    lo, hi = S.channel_minmax(x, (0, 2))
    assert torch.equal(hi, x.amax(dim=1, keepdim=True))
    q = S.channel_quantile(x, 0.9, 0)
    for c in range(3):
        vals = torch.sort(x[c].flatten()).values
        assert q[c, 0, 0] == vals[math.ceil(0.9 * vals.numel()) - 1]
    assert S.channel_quantile(x, 1.0).item() == x.max().item()


def test_output_l2_loss_shapes():
    g = _gen(1)
    inp = torch.randn(2, 3, 6, 6, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    fwd = lambda v: torch.nn.functional.conv2d(inp, v)  # noqa: E731
    ref = fwd(w)
    per_ch = S.output_l2_loss(fwd, ref, channel_dim=1)(w + 0.1)
    assert per_ch.shape == (4,)
    total = S.output_l2_loss(fwd, ref)(w + 0.1)
    assert total.shape == () and torch.allclose(per_ch.sum(), total)
    assert S.output_l2_loss(fwd, ref, 1)(w).abs().max() == 0


# ---------------------------------------------------------------------------- INT scale search


def _ref_int_search(x: np.ndarray, bits: int, sym: bool, p: float = 2.4) -> tuple[float, float]:
    """float64 brute force of docs/methods.md §2 on one channel."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    best = (np.inf, 0.0, 0.0)
    for i in range(80):
        f = 1 - 0.01 * i
        if sym:
            s, z = max(abs(x.min()), abs(x.max())) * f / qmax, 0.0
        else:
            lo, hi = min(x.min() * f, 0.0), max(x.max() * f, 0.0)
            s = (hi - lo) / (2**bits - 1)
            z = float(np.clip(np.round(-lo / s), qmin, qmax))
        xh = (np.clip(np.round(x / s) + z, qmin, qmax) - z) * s
        loss = np.mean(np.abs(x - xh) ** p)
        if loss < best[0]:
            best = (loss, s, z)
    return best[1], best[2]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int_scale_search_matches_brute_force(bits, sym):
    x = _heavy(3000, bits) + (0.0 if sym else 1.5)
    scale, zp = S.int_scale_search(x, bits, sym)
    s_ref, z_ref = _ref_int_search(x.numpy(), bits, sym)
    assert scale.shape == (1,) and scale.item() == pytest.approx(s_ref, rel=1e-12)
    assert zp.item() == z_ref
    if sym:
        assert zp.item() == 0


def test_int_scale_search_known_best_is_exact_grid():
    x = torch.arange(16, dtype=torch.float64) * 0.1  # exactly the 4-bit grid at s = 0.1
    scale, zp = S.int_scale_search(x, 4, symmetric=False)
    assert scale.item() == pytest.approx(0.1, rel=1e-12) and zp.item() == 0
    # a moderate outlier: clipping it buys a finer step for the bulk
    outlier = torch.cat([torch.linspace(-1, 1, 999, dtype=torch.float64), torch.tensor([3.0])])
    scale, _ = S.int_scale_search(outlier, 4, symmetric=True)
    assert scale.item() < 0.8 * 3 / 7
    # a huge one: the p = 2.4 error of clipping it dominates, the full range wins
    outlier[-1] = 50.0
    scale, _ = S.int_scale_search(outlier, 4, symmetric=True)
    assert scale.item() == pytest.approx(50 / 7, rel=1e-12)


def test_int_scale_search_per_channel_equals_rows():
    g = _gen(2)
    w = torch.randn(5, 300, dtype=torch.float64, generator=g) * torch.logspace(-2, 1, 5, dtype=torch.float64)[:, None]
    w[1, 0] = 40.0
    scale, zp = S.int_scale_search(w, 3, symmetric=False, axis=0)
    assert scale.shape == (5, 1) and zp.shape == (5, 1)
    for r in range(5):
        s_r, z_r = S.int_scale_search(w[r], 3, symmetric=False)
        assert scale[r, 0] == s_r[0] and zp[r, 0] == z_r[0]
    # per group: (5, 300) -> (5, 10, 30), one scale per group
    grp = F.to_groups(w, 30)
    sg, zg = S.int_scale_search(grp, 3, symmetric=False, axis=(0, 1))
    assert sg.shape == (5, 10, 1)
    s12, z12 = S.int_scale_search(grp[1, 2], 3, symmetric=False)
    assert sg[1, 2, 0] == s12[0] and zg[1, 2, 0] == z12[0]


def test_int_scale_search_loss_fn_and_chunking(monkeypatch):
    w = torch.randn(4, 200, generator=_gen(3))
    w[0, :5] *= 8
    base = S.int_scale_search(w, 4, symmetric=True, axis=0)
    per_channel = lambda wh: (wh - w).abs().pow(2.4).mean(1)  # noqa: E731  same as default
    via_fn = S.int_scale_search(w, 4, symmetric=True, axis=0, loss_fn=per_channel)
    assert torch.equal(base[0], via_fn[0])
    monkeypatch.setattr(S, "BLOCK_ELEMENTS", 400)  # two channels per block
    chunked = S.int_scale_search(w, 4, symmetric=True, axis=0)
    assert torch.equal(base[0], chunked[0])
    # a scalar loss shares one candidate index: every channel shrinks by the same factor
    scale, _ = S.int_scale_search(w, 4, symmetric=True, axis=0, loss_fn=lambda wh: (wh - w).pow(2).sum())
    ratio = scale[:, 0] / w.abs().amax(1) * 7
    assert torch.allclose(ratio, ratio[0].expand(4))
    with pytest.raises(ValueError, match="loss_fn returned 3 values; expected 1 or one per channel \\(4\\)"):
        S.int_scale_search(w, 4, symmetric=True, axis=0, loss_fn=lambda wh: torch.ones(3))


@pytest.mark.parametrize("bits,sym", [(8, False), (8, True), (4, False), (4, True), (3, True)])
def test_int_scale_search_coarse_to_fine_finds_the_exhaustive_optimum(bits, sym):
    g = _gen(7)
    w = torch.randn(96, 2000, dtype=torch.float64, generator=g) * 0.02
    w[:48] *= torch.randn(48, 2000, dtype=torch.float64, generator=g).exp()  # heavy tails (log-normal scale mix)
    w[::7, :3] *= 10  # outliers in some channels
    exact = S.int_scale_search(w, bits, sym, axis=0)
    fast = S.int_scale_search(w, bits, sym, axis=0, coarse_step=8)

    def total_loss(scale, zp):
        return S.lp_error(w, F.int_fake_quantize(w, scale, zp, bits=bits, symmetric=sym), 2.4, 0).sum()

    same = (exact[0] == fast[0]).double().mean()
    assert same >= 0.95
    assert total_loss(*fast) <= total_loss(*exact) * (1 + 1e-4)


def test_int_search_errors():
    with pytest.raises(ValueError, match=r"9 is out of range; allowed: 2\.\.8"):
        S.int_scale_search(torch.randn(10), 9, symmetric=True)
    with pytest.raises(ValueError, match="NaN"):
        S.int_scale_search(torch.tensor([1.0, float("nan")]), 4, symmetric=True)
    with pytest.raises(ValueError, match="Inf"):
        S.percentile_int_init(torch.tensor([1.0, float("inf")]), 4, symmetric=True)


# ---------------------------------------------------------------------------- percentile init


@pytest.mark.parametrize("sym", [True, False])
def test_percentile_init_matches_brute_force(sym):
    x = _heavy(20_000, 5) if sym else _heavy(20_000, 5).abs()
    x[10:40] = 4.0 + torch.arange(30, dtype=torch.float64) / 10  # a tail that matters at 4 bits
    scale, zp = S.percentile_int_init(x, 4, sym)
    flat = torch.sort(x).values
    n = flat.numel()
    best = None
    for q in (0.999, 0.9999, 0.99999):
        if sym:
            a = torch.sort(x.abs()).values[math.ceil(q * n) - 1]
            lo, hi = -a, a
        else:
            lo, hi = flat[math.ceil((1 - q) * n) - 1], flat[math.ceil(q * n) - 1]
        s, z = F.int_qparams(lo, hi, 4, sym)
        err = ((F.int_fake_quantize(x, s, z, bits=4, symmetric=sym) - x) ** 2).sum().item()
        if best is None or err < best[0]:
            best = (err, s.item(), z.item())
    assert scale.item() == pytest.approx(best[1], rel=1e-12) and zp.item() == best[2]


def test_percentile_init_per_channel():
    x = torch.randn(64, 3, 8, 8, generator=_gen(6))  # activations NCHW, per channel axis 1
    x[:, 2] *= 10
    scale, zp = S.percentile_int_init(x, 4, symmetric=False, axis=1)
    assert scale.shape == (1, 3, 1, 1)
    s2, z2 = S.percentile_int_init(x[:, 2], 4, symmetric=False)
    assert scale[0, 2].item() == s2.item() and zp[0, 2].item() == z2.item()


# ---------------------------------------------------------------------------- FP bias search


def test_initial_fp_bias_formula():
    absmax = torch.tensor([0.05, 1.0, 3.7, 900.0], dtype=torch.float64)
    for fmt in (E4M3, E5M2, E2M1, E3M0, E1M2):
        e, m = fmt.exp_bits, fmt.man_bits
        paper = 2**e - torch.log2(absmax) + math.log2(2 - 2.0**-m) - 1
        beta0 = S.initial_fp_bias(absmax, fmt)
        assert torch.allclose(beta0, paper, rtol=0, atol=1e-12)
    for fmt in (E4M3_HW, E2M1_HW):  # hardware maxval: the grid still just covers absmax
        assert torch.allclose(F.maxval(fmt, S.initial_fp_bias(absmax, fmt)), absmax, rtol=1e-12)
    assert torch.isfinite(S.initial_fp_bias(torch.zeros(2), E4M3)).all()


def _ref_bias_search(x: torch.Tensor, fmt, loss) -> float:
    beta0 = S.initial_fp_bias(x.abs().max(), fmt).item()
    losses = [loss(F.fp_quantize(x, fmt, beta0 * i / 100)) for i in range(101)]
    return beta0 * int(np.argmin(losses)) / 100


@pytest.mark.parametrize("fmt", [E4M3, E2M1, E3M0, E4M3_HW], ids=lambda f: f.name)
def test_fp_bias_search_matches_brute_force(fmt):
    x = _heavy(2000, 7) * 0.05
    bias = S.fp_bias_search(x, fmt)
    ref = _ref_bias_search(x, fmt, lambda xh: ((xh - x) ** 2).mean().item())
    assert bias.shape == (1,) and bias.item() == pytest.approx(ref, rel=1e-12)


def test_fp_bias_search_known_best():
    x = F.fp_grid(E2M1).repeat(10)  # exactly E2M1 at the standard bias 1: beta_0 = 1 is exact
    bias = S.fp_bias_search(x, E2M1)
    assert bias.item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(F.fp_quantize(x, E2M1, bias), x)


def test_fp_bias_search_per_channel_and_output_loss():
    g = _gen(8)
    w = torch.randn(6, 32, generator=g) * torch.logspace(-2, 0.5, 6)[:, None]
    inp = torch.randn(64, 32, generator=g)
    ref_out = inp @ w.T
    bias = S.fp_bias_search(w, E2M1, axis=0)
    assert bias.shape == (6, 1)
    for r in range(6):
        assert bias[r, 0] == S.fp_bias_search(w[r], E2M1)[0]
    # layer-output loss, per output channel: each row's choice is the brute-force best
    loss = S.output_l2_loss(lambda v: inp @ v.T, ref_out, channel_dim=-1)
    bias_out = S.fp_bias_search(w, E2M1, axis=0, loss_fn=loss)
    for r in range(6):
        ref = _ref_bias_search(w[r], E2M1, lambda wr: ((inp @ wr - ref_out[:, r]) ** 2).sum().item())
        assert bias_out[r, 0].item() == pytest.approx(ref, rel=1e-6)
    # scalar output loss: one index i shared by all rows (bias / beta_0 is the same)
    shared = S.fp_bias_search(w, E2M1, axis=0, loss_fn=S.output_l2_loss(lambda v: inp @ v.T, ref_out))
    frac = shared[:, 0] / S.initial_fp_bias(w.abs().amax(1), E2M1)
    assert torch.allclose(frac, frac[0].expand(6))


def test_fp_format_search_picks_representable_format():
    x = F.fp_grid(E2M1).float().repeat(4)
    fmt, bias = S.fp_format_search(x, 4)
    assert fmt is E2M1 and bias.item() == pytest.approx(1.0, abs=1e-6)
    x = torch.arange(-7, 8, dtype=torch.float32) * 0.5  # uniform: E1M2 at bias 0
    fmt, bias = S.fp_format_search(x, 4)
    assert fmt is E1M2 and torch.equal(F.fp_quantize(x, fmt, bias), x)
    x = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]).repeat(3)  # powers of two
    assert S.fp_format_search(x, 4)[0] is E3M0
    assert S.fp_format_search(x, 4, hardware=True)[0] is E2M1_HW
    with pytest.raises(ValueError, match="no FP format with 5 bits"):
        S.fp_format_search(x, 5)
