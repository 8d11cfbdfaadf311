"""Tests of diffsqueeze.quant.primitives.block_formats (MXFP4, MXFP8, NVFP4) against float64
references written here from docs/methods.md §10: element grids as float64 tables, round half to
even on the code index, saturation, E8M0 / E4M3 scales. Results must be equal, not close."""

from __future__ import annotations

import math

import pytest
import torch

from diffsqueeze.quant.primitives.block_formats import (
    BLOCK_FORMATS,
    MXFP4,
    MXFP8,
    NVFP4,
    BlockFormat,
    block_bytes,
    block_dequantize,
    block_fake_quantize,
    block_quantize,
    pack_block_codes,
    unpack_block_codes,
)
from diffsqueeze.quant.primitives.fp_format import E2M1_HW, E4M3_HW

F64 = torch.float64

# ------------------------------------------------------------------------- float64 references

E2M1_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)


def _e4m3_table() -> torch.Tensor:
    """Non-negative OCP E4M3 values by code 0..126 (code 127 = S.1111.111 is NaN): bias 7,
    exponent field 0 is subnormal."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=F64)


E4M3_TABLE = _e4m3_table()
REF = {  # name -> (element table, emax of the element's largest normal)
    "mxfp4": (E2M1_TABLE, 2),
    "mxfp8": (E4M3_TABLE, 8),
    "nvfp4": (E2M1_TABLE, 2),
}


def _round_to_table(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest table value to ``|y|`` with the sign of ``y``: saturate at the top, ties to the
    even index (the even code, i.e. mantissa LSB 0)."""
    mag = y.abs().clamp(max=float(table[-1]))
    hi = torch.searchsorted(table, mag).clamp(max=table.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    lo = torch.where(table[hi] == mag, hi, lo)
    twice, span = 2 * mag, table[lo] + table[hi]  # both exact: compare against the midpoint
    pick = torch.where(twice < span, lo, torch.where(twice > span, hi, torch.where(lo % 2 == 0, lo, hi)))
    return torch.where(y < 0, -table[pick], table[pick])


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    """Exact floor(log2 a) for a > 0: log2 then a correction either way (log2 may round)."""
    e = torch.floor(torch.log2(a))
    e = torch.where(torch.exp2(e) > a, e - 1, e)
    return torch.where(torch.exp2(e + 1) <= a, e + 1, e)


def ref_mx(x: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, E8M0 bytes) in float64 from the OCP MX definition; zero blocks get byte 0."""
    table, emax = REF[name]
    g = x.to(F64).reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, _floor_log2(torch.where(amax > 0, amax, 1.0)) - emax, torch.full_like(amax, -127.0))
    e = e.clamp(-127, 127)
    scale = torch.exp2(e).unsqueeze(-1)
    x_hat = _round_to_table(g / scale, table) * scale
    return x_hat.reshape(x.shape), (e + 127).to(torch.uint8)


def ref_nvfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(x_hat, E4M3 block scales as float64, FP32 tensor scale) in float64 from the definition."""
    s_t = float(torch.tensor(x.abs().max().item() / (6 * 448), dtype=F64).to(torch.float32))
    if s_t == 0:
        s_t = 2.0**-149  # the documented floor: smallest positive float32
    g = x.to(F64).reshape(*x.shape[:-1], -1, 16)
    s_b = g.abs().amax(-1) / 6
    fp8 = _round_to_table(s_b / s_t, E4M3_TABLE)
    d = (fp8 * s_t).unsqueeze(-1)
    q = torch.where(d > 0, _round_to_table(g / torch.where(d > 0, d, 1.0), E2M1_TABLE), 0.0)
    return (q * d).reshape(x.shape), fp8, s_t


def _check_against_ref(x: torch.Tensor, fmt: BlockFormat) -> None:
    codes = block_quantize(x, fmt)
    x_hat = block_fake_quantize(x, fmt)
    if fmt.scale == "e8m0":
        ref, ref_bytes = ref_mx(x, fmt.name)
        assert torch.equal(codes.scales, ref_bytes)
    else:
        ref, ref_fp8, ref_st = ref_nvfp4(x)
        assert torch.equal(codes.scales.to(F64), ref_fp8)
        assert codes.tensor_scale.dtype == torch.float32 and codes.tensor_scale.item() == ref_st
    assert x_hat.dtype == x.dtype
    assert torch.equal(x_hat, ref.to(x.dtype))
    assert torch.equal(block_dequantize(codes, fmt, dtype=x.dtype), x_hat)


def _blocks_with_max(values: list[float], block: int, top: float) -> torch.Tensor:
    """Rows of ``block`` values: ``block - 1`` of ``values`` each (padded with ``top``), then ``top``,
    so every row's amax is ``top``."""
    rows = []
    for i in range(0, len(values), block - 1):
        chunk = values[i : i + block - 1]
        rows.append(chunk + [top] * (block - len(chunk)))
    return torch.tensor(rows, dtype=F64)


def _mixed_tensor(seed: int, cols: int = 128) -> torch.Tensor:
    """Six rows of random float32 values with outliers, tiny and subnormal blocks, ties, negatives, zero blocks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, cols, generator=g, dtype=F64)
    x[0, 5] = 900.0  # outlier
    x[1, 40] = -3.0e4
    x[2, :32] = 0.0  # an all-zero MX block (two NVFP4 blocks)
    x[2, 32:64] *= 1e-30  # tiny
    x[3, :32] *= 1e-40  # float32 subnormals
    half = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ties = torch.cat([half, -half])
    x[4, :32] = torch.cat([ties, ties]) * 2.0**-3  # MX and NVFP4 ties at a power-of-two scale
    x[5, 64:] = -x[5, 64:].abs()
    return x.to(torch.float32)


# --------------------------------------------------------------------------------- the table


def test_format_table():
    assert set(BLOCK_FORMATS) == {"mxfp4", "mxfp8", "nvfp4"}
    assert (MXFP4.element, MXFP4.block, MXFP4.scale) == (E2M1_HW, 32, "e8m0")
    assert (MXFP8.element, MXFP8.block, MXFP8.scale) == (E4M3_HW, 32, "e8m0")
    assert (NVFP4.element, NVFP4.block, NVFP4.scale) == (E2M1_HW, 16, "e4m3+fp32")
    # the test's tables are the OCP grids (torch's float8 decodes the same 127 codes)
    torch_e4m3 = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).to(F64)
    assert torch.equal(E4M3_TABLE, torch_e4m3) and E4M3_TABLE[-1] == 448
    with pytest.raises(ValueError, match="scale kind"):
        BlockFormat("bad", E2M1_HW, 32, "fp16")


# ------------------------------------------------------------- (a) representable values exact


@pytest.mark.parametrize("dtype,ks", [(torch.float32, [-127, -100, -3, 0, 5, 100, 119]),
                                      (F64, [-127, -1, 0, 127])])
@pytest.mark.parametrize("name", ["mxfp4", "mxfp8"])
def test_mx_every_representable_value_round_trips(name, dtype, ks):
    table, _ = REF[name]
    signed = table.tolist() + (-table[1:]).tolist()
    base = _blocks_with_max(signed, 32, float(table[-1]))
    for k in ks:
        x = (base * 2.0**k).to(dtype)
        codes = block_quantize(x, BLOCK_FORMATS[name])
        assert torch.equal(block_fake_quantize(x, BLOCK_FORMATS[name]), x)
        assert bool((codes.scales == k + 127).all())


@pytest.mark.parametrize("dtype,s_t", [(torch.float32, 2.0**-10), (F64, 2.0**-10),
                                       (F64, float(torch.tensor(1 / 2688).float()))])
def test_nvfp4_every_representable_value_round_trips(dtype, s_t):
    signed = E2M1_TABLE.tolist() + (-E2M1_TABLE[1:]).tolist()  # 15 values + 6 = one block of 16
    block = torch.tensor(signed + [6.0], dtype=F64)
    fp8 = E4M3_TABLE[1:]  # every positive block scale, 448 among them (its block holds amax_t)
    x = (block * fp8.unsqueeze(-1) * s_t).reshape(1, -1).to(dtype)
    codes = block_quantize(x, NVFP4)
    assert codes.tensor_scale.item() == s_t
    assert torch.equal(codes.scales.to(F64), fp8.reshape(1, -1))
    assert torch.equal(block_fake_quantize(x, NVFP4), x)


# ------------------------------------------------------------------- (b) float64 references


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_matches_float64_reference_on_mixed_tensors(name):
    fmt = BLOCK_FORMATS[name]
    for seed in range(8):
        x = _mixed_tensor(seed)
        _check_against_ref(x, fmt)
        _check_against_ref(x.to(F64), fmt)
        _check_against_ref(x[:, :64].reshape(2, 3, 64), fmt)  # more dims, other amax_tensor


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_matches_float64_reference_on_float64_spread(name):
    g = torch.Generator().manual_seed(1)
    mag = torch.exp(torch.empty(16, 64, dtype=F64).uniform_(-30, 30, generator=g))
    sign = torch.where(torch.rand(16, 64, generator=g) < 0.5, -1.0, 1.0).to(F64)
    _check_against_ref(mag * sign, BLOCK_FORMATS[name])


def test_ties_round_half_to_even():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    even = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    k = 2.0**-5
    x = torch.tensor(ties + [-t for t in ties] + [6.0] * 18, dtype=torch.float32) * k  # one MX block
    x_hat = block_fake_quantize(x, MXFP4)
    assert x_hat[:14].tolist() == [e * k for e in even] + [-e * k for e in even]
    # NVFP4 with s_t = 2^-10: one block holds amax_t, the tie block gets block scale 2
    s_t, r = 2.0**-10, 2.0
    amax_block = [6 * 448 * s_t] * 16
    tie_block = [t * r * s_t for t in ties] + [-t * r * s_t for t in ties] + [6 * r * s_t] * 2
    y = torch.tensor(amax_block + tie_block, dtype=torch.float32)
    y_hat = block_fake_quantize(y, NVFP4)
    assert y_hat[16:30].tolist() == [e * r * s_t for e in even] + [-e * r * s_t for e in even]
    # MXFP8: every midpoint of the E4M3 grid, in blocks whose amax is 448
    mids = ((E4M3_TABLE[:-1] + E4M3_TABLE[1:]) / 2).tolist()
    z = _blocks_with_max(mids, 32, 448.0).to(torch.float32)
    ref, _ = ref_mx(z, "mxfp8")
    assert torch.equal(block_fake_quantize(z, MXFP8), ref.float())


def test_mxfp8_elements_are_torch_float8_bits():
    x = _mixed_tensor(3)
    codes = block_quantize(x, MXFP8)
    scale = torch.exp2(codes.scales.float() - 127).repeat_interleave(32, dim=-1)
    want = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(codes.elements, want)


# --------------------------------------------------------------------------- (c) saturation


def test_saturation_clamps_to_block_max():
    k = 2.0**3
    x = torch.tensor([7.0, -7.5, 7.99, 1.0] + [0.5] * 28) * k  # amax 7.99 -> e = k, range +-6k
    assert block_fake_quantize(x, MXFP4)[:3].tolist() == [6 * k, -6 * k, 6 * k]
    y = torch.tensor([500.0, -511.0, 480.0, 464.0, 449.0] + [1.0] * 27) * k
    assert block_fake_quantize(y, MXFP8)[:5].tolist() == [448 * k, -448 * k, 448 * k, 448 * k, 448 * k]
    # just below a power of two: floor(log2) must not round up to 3 (that would give X = 2k)
    z = torch.full((32,), 0.5) * k
    z[0] = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)) * k
    codes = block_quantize(z, MXFP4)
    assert codes.scales.item() == 127 + 3 and block_fake_quantize(z, MXFP4)[0].item() == 6 * k
    # NVFP4: block ratio 1.0625 is an E4M3 tie, rounds to 1.0, so 6.375 * s_t saturates at 6 * s_t
    s_t = 2.0**-10
    w = torch.tensor([6 * 448 * s_t] * 16 + [6.375 * s_t, -6.375 * s_t] + [1 * s_t] * 14)
    codes = block_quantize(w, NVFP4)
    assert codes.scales[1].item() == 1.0
    assert block_fake_quantize(w, NVFP4)[16:18].tolist() == [6 * s_t, -6 * s_t]


# ------------------------------------------------------------------------ (d) scale encodings


@pytest.mark.parametrize("fmt", [MXFP4, MXFP8])
def test_e8m0_bytes_and_exponent_clamping(fmt):
    top = float(REF[fmt.name][0][-1])
    x = torch.zeros(5, 32, dtype=F64)
    x[1] = 1e-300  # e far below -127: clamped to byte 0, everything underflows to 0
    x[2] = 1e300  # e far above 127: clamped to byte 254, everything saturates
    x[2, 0] = -1e300
    x[3] = 2.0**-126  # e = -126 - emax is clamped to -127, yet 2^-126 = 2^(1 or 7) * X is exact
    x[4] = top * 2.0**-127  # e = -127 exactly, no clamping needed
    codes = block_quantize(x, fmt)
    assert codes.scales.flatten().tolist() == [0, 0, 254, 0, 0]
    x_hat = block_fake_quantize(x, fmt)
    assert bool((x_hat[:2] == 0).all())
    assert x_hat[2, 0].item() == -top * 2.0**127 and bool((x_hat[2, 1:] == top * 2.0**127).all())
    assert torch.equal(x_hat[3:], x[3:])
    wide = torch.exp(torch.empty(64, 32, dtype=F64).uniform_(-700, 700, generator=torch.Generator().manual_seed(0)))
    assert int(block_quantize(wide, fmt).scales.max()) <= 254


def test_nvfp4_scales_finite_and_zero_handling():
    x = _mixed_tensor(0)
    codes = block_quantize(x, NVFP4)
    s = codes.scales.to(F64)
    assert not bool(torch.isnan(s).any()) and s.max().item() == 448.0
    assert bool((codes.scales.view(torch.uint8) & 0x7F != 0x7F).all())  # no NaN code
    assert bool((s[2, :2] == 0).all()) and bool((block_fake_quantize(x, NVFP4)[2, :32] == 0).all())
    zero = torch.zeros(3, 32)
    codes = block_quantize(zero, NVFP4)
    assert codes.tensor_scale.item() == 2.0**-149 and bool((codes.scales.to(F64) == 0).all())
    out = block_fake_quantize(zero, NVFP4)
    assert not bool(torch.isnan(out).any()) and bool((out == 0).all())
    with pytest.raises(ValueError, match="overflows"):
        block_quantize(torch.full((16,), 1e45, dtype=F64), NVFP4)


# ------------------------------------------------------------------------------ (e) packing


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_pack_unpack_bit_identical(name):
    fmt = BLOCK_FORMATS[name]
    x = _mixed_tensor(5, cols=96).reshape(2, 3, 96)
    codes = block_quantize(x, fmt)
    packed = pack_block_codes(codes, fmt)
    assert packed["elements"].dtype == torch.uint8 and packed["scales"].dtype == torch.uint8
    assert sum(t.nbytes for t in packed.values()) == block_bytes(x.numel(), fmt)
    back = unpack_block_codes(packed, fmt, x.shape)
    assert torch.equal(back.elements, codes.elements)
    assert torch.equal(back.scales.view(torch.uint8), codes.scales.view(torch.uint8))
    assert back.scales.dtype == codes.scales.dtype and back.scales.shape == (2, 3, 96 // fmt.block)
    if fmt.scale == "e4m3+fp32":
        assert packed["tensor_scale"].dtype == torch.float32 and torch.equal(back.tensor_scale, codes.tensor_scale)
    else:
        assert "tensor_scale" not in packed and back.tensor_scale is None
    assert torch.equal(block_dequantize(back, fmt), block_dequantize(codes, fmt))
    with pytest.raises(ValueError):
        unpack_block_codes({**packed, "elements": packed["elements"][:-1]}, fmt, x.shape)
    with pytest.raises(ValueError):
        unpack_block_codes({**packed, "scales": packed["scales"][:-1]}, fmt, x.shape)


def test_block_bytes_per_element():
    n = 32 * 1000
    assert block_bytes(n, MXFP4) * 8 / n == 4.25
    assert block_bytes(n, MXFP8) * 8 / n == 8.25
    assert block_bytes(n, NVFP4) == n * 4.5 / 8 + 4
    assert block_bytes(16, NVFP4) == 8 + 1 + 4 and block_bytes(32, MXFP4) == 16 + 1
    with pytest.raises(ValueError, match="blocks of 32"):
        block_bytes(48, MXFP4)


# ---------------------------------------------------------------------- (f) dtypes and shapes


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_dtypes_and_shape_errors(name):
    fmt = BLOCK_FORMATS[name]
    x = _mixed_tensor(2, cols=64)
    for dtype in (F64, torch.float32, torch.bfloat16, torch.float16):
        xd = (x.clamp(-6e4, 6e4) if dtype == torch.float16 else x).to(dtype)
        assert block_fake_quantize(xd, fmt).dtype == dtype
    assert block_dequantize(block_quantize(x.double(), fmt), fmt).dtype == torch.float32
    for shape in [(4, fmt.block + 1), (fmt.block // 2,), (3, 0), ()]:
        last = shape[-1] if shape else 0
        with pytest.raises(ValueError, match=f"block size {fmt.block}.*last dim {last}"):
            block_quantize(torch.ones(shape), fmt)
    with pytest.raises(ValueError, match="NaN"):
        block_quantize(torch.full((fmt.block,), math.nan), fmt)
