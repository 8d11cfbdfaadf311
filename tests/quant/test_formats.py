"""Tests of diffsqueeze.quant.primitives.formats against float64 references that enumerate each grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffsqueeze.quant.primitives import formats as F
from diffsqueeze.quant.primitives.formats import (
    E1M2,
    E2M1,
    E2M1_HW,
    E2M3,
    E2M3_HW,
    E3M0,
    E3M2,
    E3M2_HW,
    E4M3,
    E4M3_HW,
    E5M2,
    E5M2_HW,
    FPFormat,
    IntFormat,
)

PAPER = [E4M3, E5M2, E3M2, E2M3, E2M1, E3M0, E1M2]
HARDWARE = [E4M3_HW, E5M2_HW, E3M2_HW, E2M3_HW, E2M1_HW]
ALL_FP = PAPER + HARDWARE


def _biases(fmt: FPFormat) -> list[float]:
    b = fmt.standard_bias
    return [float(b), b + 1.0, b - 2.0, b + 0.37, b - 1.61]


def _samples(fmt: FPFormat, bias: float, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """Values spread over the whole range of the grid (log-uniform), some beyond it, signed."""
    g = torch.Generator().manual_seed(seed)
    mv = F.maxval(fmt, bias)
    lo = 2.0 ** (1 - fmt.man_bits - bias) / 4
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(np.log(lo), np.log(mv * 4), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return mag * sign


def _nearest_ref(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 reference: clamp into the grid, then the two neighbours and the nearest."""
    xc = x.clamp(grid[0], grid[-1])
    hi_idx = torch.searchsorted(grid, xc).clamp(max=grid.numel() - 1)
    lo_idx = (hi_idx - 1).clamp(min=0)
    lo_idx = torch.where(grid[hi_idx] == xc, hi_idx, lo_idx)
    lo, hi = grid[lo_idx], grid[hi_idx]
    nearest = torch.where((xc - lo) <= (hi - xc), lo, hi)
    return lo, hi, nearest


def _on_grid(q: torch.Tensor, grid: torch.Tensor, rtol: float = 0.0) -> bool:
    idx = torch.searchsorted(grid, q).clamp(max=grid.numel() - 1)
    near = torch.minimum((grid[idx] - q).abs(), (grid[(idx - 1).clamp(min=0)] - q).abs())
    return bool((near <= rtol * q.abs()).all())


# ---------------------------------------------------------------------------- format objects


def test_grid_sizes_and_maxima():
    expected = {E4M3: 480, E5M2: 114688, E3M2: 28, E2M3: 7.5, E2M1: 6, E3M0: 16, E1M2: 3.5,
                E4M3_HW: 448, E5M2_HW: 57344, E3M2_HW: 28, E2M3_HW: 7.5, E2M1_HW: 6}
    for fmt, mv in expected.items():
        grid = F.fp_grid(fmt)
        assert grid.dtype == torch.float64
        assert F.maxval(fmt, fmt.standard_bias) == mv == grid.max().item() == -grid.min().item()
        assert torch.all(grid[1:] > grid[:-1])
        n_codes = 2**fmt.bits - 1  # +0 and -0 coincide
        if fmt is E4M3_HW:
            n_codes -= 2  # S.1111.111 is NaN
        if fmt is E5M2_HW:
            n_codes -= 2 * 4  # S.11111.xx is Inf/NaN
        assert grid.numel() == n_codes, fmt.name


def test_paper_maxval_formula_and_grid_with_real_bias():
    for fmt in PAPER:
        for b in _biases(fmt):
            mv = (2 - 2.0**-fmt.man_bits) * 2.0 ** (2**fmt.exp_bits - 1 - b)
            assert F.maxval(fmt, b) == pytest.approx(mv, rel=1e-15)
            assert F.fp_grid(fmt, b).max().item() == pytest.approx(mv, rel=1e-15)
    t = torch.tensor([7.0, 6.5])
    assert torch.allclose(F.maxval(E4M3, t), torch.tensor([480.0, 480.0 * 2**0.5]))


def test_fpformat_fields_and_validation():
    assert (E4M3.bits, E4M3.standard_bias, E4M3.name) == (8, 7, "fp8_e4m3")
    assert (E2M1.bits, E2M1.standard_bias, E5M2.standard_bias) == (4, 1, 15)
    assert E4M3_HW.torch_dtype is torch.float8_e4m3fn and E5M2_HW.torch_dtype is torch.float8_e5m2
    assert E4M3.torch_dtype is None and E2M1_HW.torch_dtype is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        E4M3.exp_bits = 5
    with pytest.raises(ValueError, match="no hardware encoding for E3M0"):
        FPFormat(3, 0, hardware=True)
    with pytest.raises(ValueError, match="E0M3"):
        FPFormat(0, 3)
    with pytest.raises(ValueError, match="E5M5"):
        FPFormat(5, 5)


def test_parse_format():
    assert F.parse_format("fp8_e4m3") is E4M3
    assert F.parse_format("E4M3") is E4M3
    assert F.parse_format(" e5m2 ") is E5M2
    assert F.parse_format("fp8_e4m3fn") is E4M3_HW
    assert F.parse_format("float8_e5m2") is E5M2_HW
    assert F.parse_format("fp4_e2m1_hw") is E2M1_HW
    assert F.parse_format(E3M2) is E3M2
    assert F.parse_format("int4") == IntFormat(4, symmetric=False)
    assert F.parse_format("int8_sym") == IntFormat(8, symmetric=True)
    for name, bits in [("int2", 2), ("int8", 8), ("fp6_e2m3", 6), ("e1m2", 4), ("e3m0", 4), ("fp6_e3m2_hw", 6)]:
        fmt = F.parse_format(name)
        assert fmt.bits == bits
        assert F.parse_format(fmt.name) == fmt
    with pytest.raises(ValueError, match=r"unknown format 'fp5'; known: .*fp8_e4m3"):
        F.parse_format("fp5")
    with pytest.raises(ValueError, match=r"9 is out of range; allowed: 2\.\.8"):
        F.parse_format("int9")


def test_formats_for_bits():
    assert F.formats_for_bits(8) == [E4M3, E5M2]
    assert F.formats_for_bits(6) == [E3M2, E2M3]
    assert F.formats_for_bits(4) == [E2M1, E3M0, E1M2]
    assert F.formats_for_bits(4, hardware=True) == [E2M1_HW]
    with pytest.raises(ValueError, match=r"no FP format with 5 bits; available widths: \[4, 6, 8\]"):
        F.formats_for_bits(5)


# ---------------------------------------------------------------------------- FP quantizer


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_fp_quantize_matches_float64_grid_reference(fmt):
    for i, b in enumerate(_biases(fmt)):
        grid = F.fp_grid(fmt, b)
        x = _samples(fmt, b, seed=i)
        q = F.fp_quantize(x, fmt, b)
        lo, hi, nearest = _nearest_ref(x, grid)
        assert _on_grid(q, grid), (fmt.name, b)  # exact, also for a real bias
        # round to nearest: error within half the local step, and the nearest point
        xc = x.clamp(grid[0], grid[-1])
        assert torch.all((q - xc).abs() <= (hi - lo) / 2)
        tie = ((xc - lo) - (hi - xc)).abs() <= 1e-9 * (hi - lo)
        assert torch.equal(q[~tie], nearest[~tie])


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_fp_quantize_float32_input_exact_on_standard_grid(fmt):
    b = fmt.standard_bias
    grid = F.fp_grid(fmt)
    x = _samples(fmt, b, seed=7).float()
    q = F.fp_quantize(x, fmt, b)
    assert q.dtype == torch.float32
    lo, hi, nearest = _nearest_ref(x.double(), grid)
    tie = (x.double() - lo) == (hi - x.double())
    assert torch.equal(q.double()[~tie], nearest[~tie])
    assert torch.equal(F.fp_quantize(grid.float(), fmt, b).double(), grid)  # grid is fixed


@pytest.mark.parametrize("fmt", [f for f in ALL_FP if f.man_bits > 0], ids=lambda f: f.name)
def test_fp_ties_round_to_even_code(fmt):
    grid = F.fp_grid(fmt)
    pos = grid[grid >= 0]
    mid = (pos[1:] + pos[:-1]) / 2
    q = F.fp_quantize(mid, fmt, fmt.standard_bias)
    assert torch.all((q == pos[1:]) | (q == pos[:-1]))
    assert torch.all(F.fp_encode(q, fmt) % 2 == 0)  # even mantissa field


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_fp_idempotent_monotone_saturating_zero(fmt):
    for b in _biases(fmt)[:4]:
        x = torch.sort(_samples(fmt, b, n=2000)).values
        q = F.fp_quantize(x, fmt, b)
        assert torch.equal(F.fp_quantize(q, fmt, b), q)
        assert torch.all(q[1:] >= q[:-1])
        mv = F.maxval(fmt, b)
        big = torch.tensor([1.0, 1.01, 3.0, 1e6], dtype=torch.float64) * mv
        assert torch.allclose(F.fp_quantize(big, fmt, b), torch.full_like(big, mv), rtol=1e-15)
        assert torch.allclose(F.fp_quantize(-big, fmt, b), torch.full_like(big, -mv), rtol=1e-15)
        z = F.fp_quantize(torch.tensor([0.0, -0.0]), fmt, b)
        assert z.tolist() == [0.0, 0.0] and torch.signbit(z).tolist() == [False, True]


def test_nan_inf_raise():
    for bad in [float("nan"), float("inf"), -float("inf")]:
        x = torch.tensor([1.0, bad])
        with pytest.raises(ValueError, match="NaN.*Inf"):
            F.fp_quantize(x, E4M3, 7)
        with pytest.raises(ValueError, match="finite"):
            F.fp_step(x, E2M1, 1)
        with pytest.raises(ValueError, match="finite"):
            F.int_quantize(x, 0.1, bits=4, symmetric=True)
        with pytest.raises(ValueError, match="finite"):
            F.int_fake_quantize(x, 0.1, 3, bits=4, symmetric=False)


@pytest.mark.parametrize("fmt", ALL_FP, ids=lambda f: f.name)
def test_fp_step_is_local_grid_spacing(fmt):
    for b in _biases(fmt)[:3]:
        grid = F.fp_grid(fmt, b)
        pos = grid[grid >= 0]
        x = _samples(fmt, b, n=2000).abs()
        x = x[x < pos[-1]]
        s = F.fp_step(x, fmt, b)
        idx = torch.searchsorted(pos, x, right=True)  # pos[idx-1] <= x < pos[idx]
        assert torch.equal(s, pos[idx] - pos[idx - 1])
        # floor/ceil of x / s land on the two neighbours (what learned rounding uses)
        assert torch.equal(torch.floor(x / s) * s, pos[idx - 1])
        sub = 2.0 ** (1 - fmt.man_bits - b)
        assert F.fp_step(torch.zeros(1, dtype=torch.float64), fmt, b).item() == sub


def test_per_channel_bias_tensor_equals_rows():
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 5)[:, None]
    bias = torch.tensor([7.0, 9.5, 3.25, 12.0, 0.5])[:, None]
    q = F.fp_quantize(x, E4M3, bias)
    s = F.fp_step(x, E4M3, bias)
    for r in range(5):
        assert torch.equal(q[r], F.fp_quantize(x[r], E4M3, float(bias[r])))
        assert torch.equal(s[r], F.fp_step(x[r], E4M3, float(bias[r])))


def test_low_precision_dtypes_keep_dtype():
    x = torch.randn(256) * 10
    for dt in (torch.float16, torch.bfloat16):
        q = F.fp_quantize(x.to(dt), E4M3_HW, 7)
        assert q.dtype == dt
        assert torch.equal(q.float(), F.fp_quantize(x.to(dt).float(), E4M3_HW, 7))


# ---------------------------------------------------------------------------- hardware grids


HW_CASTS = [(E4M3_HW, torch.float8_e4m3fn, 464.0), (E5M2_HW, torch.float8_e5m2, 61440.0)]


@pytest.mark.parametrize("fmt,dtype,limit", HW_CASTS, ids=["e4m3fn", "e5m2"])
def test_hardware_equals_torch_float8_bit_for_bit(fmt, dtype, limit):
    g = torch.Generator().manual_seed(3)
    lo = 2.0 ** (1 - fmt.man_bits - fmt.standard_bias) / 8
    mag = torch.exp(torch.empty(100_000).uniform_(np.log(lo), np.log(limit), generator=g))
    x = mag * torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)
    grid = F.fp_grid(fmt).float()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    x = torch.cat([x, mids, grid, torch.tensor([0.0, -0.0, limit * 0.999, -limit * 0.999])])
    x = x[x.abs() < limit]
    ours = F.fp_quantize(x, fmt, fmt.standard_bias)
    ref = x.to(dtype).float()
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))
    assert torch.equal(F.fp_encode(x, fmt), x.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt,dtype", [(E4M3_HW, torch.float8_e4m3fn), (E5M2_HW, torch.float8_e5m2)])
def test_decode_all_finite_codes_like_torch(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.view(dtype).float()
    ok = torch.isfinite(ref)
    ours = F.fp_decode(codes[ok], fmt)
    assert torch.equal(ours.view(torch.int32), ref[ok].view(torch.int32))
    assert torch.equal(F.fp_encode(ours, fmt), codes[ok])


@pytest.mark.parametrize("fmt", PAPER + [E2M1_HW, E3M2_HW, E2M3_HW], ids=lambda f: f.name)
def test_encode_decode_roundtrip_all_codes(fmt):
    grid = F.fp_grid(fmt).float()
    codes = F.fp_encode(grid, fmt)
    assert torch.equal(F.fp_decode(codes, fmt), grid)
    assert int(codes.max()) < 2**fmt.bits and len(set(codes.tolist())) == grid.numel()


def test_mx_fp4_fp6_use_every_code():
    for hw, paper in [(E2M1_HW, E2M1), (E3M2_HW, E3M2), (E2M3_HW, E2M3)]:
        assert torch.equal(F.fp_grid(hw), F.fp_grid(paper))
    assert F.fp_grid(E2M1_HW)[F.fp_grid(E2M1_HW) >= 0].tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("fmt", HARDWARE, ids=lambda f: f.name)
def test_real_bias_is_scaled_standard_grid(fmt):
    b0 = fmt.standard_bias
    for b in [b0 + 2.0, b0 - 3.0]:  # power-of-two scales: exact
        x = _samples(fmt, b, n=2000).float()
        sc = F.bias_to_scale(fmt, b)
        assert torch.equal(F.fp_quantize(x, fmt, b), sc * F.fp_quantize(x / sc, fmt, b0))
    for b in [b0 + 0.3, b0 - 1.7]:
        x = _samples(fmt, b, n=2000).float()
        sc = F.bias_to_scale(fmt, b)
        q = F.fp_quantize(x, fmt, b)
        assert torch.allclose(q, sc * F.fp_quantize(x / sc, fmt, b0), rtol=1e-6, atol=0)
        codes = F.fp_encode(q, fmt, b)  # export: standard codes + scale
        assert torch.allclose(F.fp_decode(codes, fmt, b), q, rtol=1e-6, atol=0)
        assert F.scale_to_bias(fmt, sc) == pytest.approx(b)
    t = torch.tensor([b0 + 0.5])
    assert torch.allclose(F.scale_to_bias(fmt, F.bias_to_scale(fmt, t)), t)


# ---------------------------------------------------------------------------- integers


def _int_ref(x: np.ndarray, s: np.ndarray, z: np.ndarray, bits: int, sym: bool) -> np.ndarray:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    q = np.clip(np.round(x / s) + z, qmin, qmax)  # np.round is half-to-even
    return (q - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_int_against_float64_reference(bits, sym):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 32, dtype=torch.float64, generator=g) + torch.linspace(-1, 2, 6, dtype=torch.float64)[:, None]
    views = {
        "tensor": (w, (w.min(), w.max())),
        "channel": (w, (w.amin(1, keepdim=True), w.amax(1, keepdim=True))),
    }
    grp = F.to_groups(w, 8)
    views["group"] = (grp, (grp.amin(-1, keepdim=True), grp.amax(-1, keepdim=True)))
    for name, (x, (lo, hi)) in views.items():
        s, z = F.int_qparams(lo, hi, bits, sym)
        qmin, qmax = F.int_code_range(bits, sym)
        codes = F.int_quantize(x, s, z, bits=bits, symmetric=sym)
        assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
        xh = F.int_fake_quantize(x, s, z, bits=bits, symmetric=sym)
        ref = _int_ref(x.numpy(), s.numpy(), z.numpy(), bits, sym)
        np.testing.assert_array_equal(xh.numpy(), ref, err_msg=name)
        assert torch.equal(F.int_dequantize(codes.to(torch.int8 if sym else torch.uint8), s, z), xh)
        # error within half a step inside the range
        assert torch.all((xh - x).abs() <= s / 2 + 1e-12)
    assert torch.equal(F.from_groups(grp), w)


def test_int_qparams_definitions():
    s, z = F.int_qparams(torch.tensor(-1.0), torch.tensor(2.0), 4, symmetric=False)
    assert s.item() == pytest.approx(3 / 15) and z.item() == 5  # round(1 / 0.2)
    s, z = F.int_qparams(torch.tensor(-1.0), torch.tensor(2.0), 4, symmetric=True)
    assert s.item() == pytest.approx(2 / 7) and z.item() == 0
    s, z = F.int_qparams(torch.tensor(0.5), torch.tensor(2.0), 8, symmetric=False)  # 0 included
    assert s.item() == pytest.approx(2 / 255) and z.item() == 0
    s, z = F.int_qparams(torch.zeros(3), torch.zeros(3), 4, symmetric=False)  # all-zero channels
    assert torch.all(s > 0) and torch.all(z == 0)
    # zero (pruned weights) stays exactly zero
    x = torch.tensor([-0.7, 0.0, 0.3, 1.9])
    s, z = F.int_qparams(x.min(), x.max(), 3, symmetric=False)
    assert F.int_fake_quantize(x, s, z, bits=3, symmetric=False)[1].item() == 0.0
    assert F.int_fake_quantize(torch.tensor([100.0, -100.0]), 0.5, bits=4, symmetric=True).tolist() == [3.5, -4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_int_fake_quantize_in_place_equals_the_recorded_path(dtype):
    """Without gradients the fake quantizer works in one buffer; with them it records each step.
    Both give the same bits, ties (x/s = k + 1/2) and the clamp included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 48, generator=g).to(dtype)
    s = (x.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-3)
    x[:, :, :8] = (torch.arange(-4, 4).to(dtype) + 0.5) * s  # exact ties
    x[:, :, 8] = 50 * s[:, :, 0]  # clamped
    z = torch.full_like(s, 8.0)
    for zp, sym, bits in ((z, False, 4), (None, True, 4), (None, True, 8), (z, False, 3)):
        with torch.no_grad():
            fast = F.int_fake_quantize(x, s, zp, bits=bits, symmetric=sym)
        xg = x.clone().requires_grad_(True)
        recorded = F.int_fake_quantize(xg, s, zp, bits=bits, symmetric=sym)
        assert recorded.requires_grad and fast.dtype == recorded.dtype == dtype
        assert torch.equal(fast, recorded.detach())
    mixed = F.int_fake_quantize(x.float(), s.double(), z.double(), bits=4, symmetric=False)
    assert mixed.dtype == torch.float32  # a float64 scale promotes inside, the result keeps x's dtype


@pytest.mark.parametrize("bad", [0, 1, 9, 16, -4, 2.5, True, "4"])
def test_int_bits_out_of_range(bad):
    with pytest.raises(ValueError, match=rf"{bad!r} is out of range; allowed: 2\.\.8"):
        F.int_code_range(bad, True)
    with pytest.raises(ValueError, match="allowed: 2..8"):
        F.int_quantize(torch.ones(2), 1.0, bits=bad, symmetric=False)
    with pytest.raises(ValueError, match="allowed: 2..8"):
        IntFormat(bad)


def test_to_groups_validation():
    with pytest.raises(ValueError, match="group_size 5"):
        F.to_groups(torch.zeros(3, 8), 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,dtype,limit", HW_CASTS, ids=["e4m3fn", "e5m2"])
def test_hardware_equals_torch_float8_on_cuda(fmt, dtype, limit):
    g = torch.Generator().manual_seed(4)
    lo = 2.0 ** (1 - fmt.man_bits - fmt.standard_bias) / 8
    mag = torch.exp(torch.empty(1_000_000).uniform_(np.log(lo), np.log(limit), generator=g))
    x = (mag * torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)).cuda()
    ours = F.fp_quantize(x, fmt, fmt.standard_bias)
    assert torch.equal(ours.view(torch.int32), x.to(dtype).float().view(torch.int32))
    assert torch.equal(ours.cpu(), F.fp_quantize(x.cpu(), fmt, fmt.standard_bias))
    bias = torch.full((1,), fmt.standard_bias + 0.3, device="cuda")
    assert torch.equal(F.fp_quantize(x, fmt, bias).cpu(), F.fp_quantize(x.cpu(), fmt, bias.cpu()))
