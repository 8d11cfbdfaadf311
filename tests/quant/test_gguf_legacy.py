"""GGUF's legacy block types Q4_0, Q4_1, Q5_0, Q5_1 as number formats: codes, scales and GGUF block
bytes against the gguf package (bit for bit, on random and adversarial blocks), decoded values
against float64, the packed storage, learned rounding on the ``_0`` grids (its initialization is
the reference encoder, it never leaves the grid) and a ptq run that exports and reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.quantizers import WeightQuantizer
from diffsqueeze.quant.primitives.formats import parse_format
from diffsqueeze.quant.primitives.gguf_bytes import GGUF_TYPE_SIZES, gguf_blocks, gguf_quantize_bytes
from diffsqueeze.quant.primitives.gguf_legacy import GGUF_LEGACY_FORMATS, legacy_dequantize, legacy_quantize
from diffsqueeze.quant.primitives.rounding import inverse_rectified_sigmoid, rounding_regularizer
from diffsqueeze.quant.ptq.config import PTQConfig, RoundingConfig, WeightQuantConfig

quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

NAMES = sorted(GGUF_LEGACY_FORMATS)
SYMMETRIC = [n for n in NAMES if n.endswith("_0")]
BITS_PER_WEIGHT = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}


def _adversarial() -> torch.Tensor:
    """Blocks of 32 (one per row) that test the edges of ggml's arithmetic."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.zeros(32), torch.full((32,), 0.3), torch.full((32,), -7.0),  # zeros, all equal
            torch.cat([torch.tensor([-8.0]), torch.arange(31) % 16 - 7.5]),  # Q4_0 d = 1: every code a tie
            torch.cat([torch.tensor([-16.0]), torch.arange(31) - 15.5]),  # Q5_0 ties
            torch.cat([torch.tensor([0.0, 15.0]), torch.arange(30) % 15 + 0.5]),  # Q4_1 ties
            torch.cat([torch.tensor([0.0, 31.0]), torch.arange(30) % 31 + 0.5]),  # Q5_1 ties
            torch.cat([torch.tensor([3.0, -3.0]), torch.randn(30, generator=g)]),  # equal magnitudes: the first
            torch.cat([torch.tensor([-3.0, 3.0]), torch.randn(30, generator=g)]),  # sets the scale's sign
            -torch.rand(32, generator=g),  # negative max
            torch.rand(32, generator=g) * 1e-3 + 0.5,  # narrow range away from zero
            torch.tensor([1e-45] + [0.0] * 31), torch.tensor([3e38, -3e38] + [0.0] * 30)]
    # tiny (subnormal: 1/d overflows), small, large, beyond float16's scale range (inf scales)
    for s in (1e-45, 1e-42, 1e-39, 2.0**-126, 1e-20, 1e-8, 6e-5, 1e4, 5e5, 1e6, 1e20, 1e38):
        rows.append(torch.randn(32, generator=g).clamp(-3, 3) * s)
    for _ in range(16):  # exact ties at random powers of two
        e = float(torch.randint(-10, 10, (1,), generator=g))
        r = (torch.randint(-8, 8, (32,), generator=g).float() + 0.5) * 2**e
        r[int(torch.randint(0, 32, (1,), generator=g))] = -8 * 2**e
        rows.append(r)
    return torch.stack(rows)


def _random() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(48, 128, generator=g) * torch.logspace(-12, 12, 48).unsqueeze(1)


def _bits(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).view(np.uint32)


@pytest.mark.parametrize("name", NAMES + ["q8_0"])
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_bytes_equal_the_gguf_package_and_decode_as_it_does(name, data):
    x = _random() if data == "random" else _adversarial()
    qtype = getattr(GGMLQuantizationType, name.upper())
    with np.errstate(all="ignore"):  # gguf's overflows on the blocks beyond float16's range
        ref = quants.quantize(x.numpy(), qtype)
    mine = gguf_quantize_bytes(x, name)
    assert mine.dtype == torch.uint8 and mine.shape == (x.shape[0], x.shape[1] // 32 * GGUF_TYPE_SIZES[name])
    assert np.array_equal(mine.numpy(), ref)
    if name == "q8_0":
        return
    fmt = GGUF_LEGACY_FORMATS[name]
    q = legacy_quantize(x, fmt)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= fmt.top and q.d.dtype == torch.float16
    decoded = legacy_dequantize(q, fmt)
    with np.errstate(all="ignore"):
        expected = quants.dequantize(ref, qtype)
    assert np.array_equal(_bits(decoded.numpy()), _bits(expected))  # NaNs and signed zeros too
    fake = fmt.fake_quantize(x.reshape(x.shape[0], 1, -1), {}).reshape(x.shape)
    assert np.array_equal(_bits(fake.numpy()), _bits(decoded.numpy()))


@pytest.mark.parametrize("name", NAMES)
def test_decoded_values_against_float64(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(32, 128, generator=g) * torch.logspace(-3, 3, 32).unsqueeze(1)  # float16 scales stay normal
    fmt = GGUF_LEGACY_FORMATS[name]
    q = legacy_quantize(x, fmt)
    codes = q.codes.double().reshape(x.shape[0], -1, 32)
    d = q.d.double().unsqueeze(-1)
    if fmt.has_min:  # d * q is exact (in float32 too); the sum is rounded once to float32
        want = (d * codes + q.m.double().unsqueeze(-1)).float().double()
    else:  # exact
        want = d * (codes - fmt.zero)
    assert torch.equal(legacy_dequantize(q, fmt).double().reshape(want.shape), want)
    # each value within a step of x (half a step but for the ends of the grid and the float16 scale)
    err = (want - x.double().reshape(want.shape)).abs()
    assert bool((err <= d.abs() * 1.01).all())


def test_signed_zero_minimum_is_the_only_difference():
    """For a ``_1`` block whose minimum is a zero present with both signs, numpy's reduction (gguf) and
    torch's may keep different zeros: the stored minimum's sign bit, never a decoded value."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(8, 32, generator=g)
    x[:, ::3] = 0.0
    x[:, 1::6] = -0.0
    for name in ("q4_1", "q5_1"):
        qtype, fmt = getattr(GGMLQuantizationType, name.upper()), GGUF_LEGACY_FORMATS[name]
        ref, mine = quants.quantize(x.numpy(), qtype), gguf_quantize_bytes(x, name).numpy()
        diff = (ref ^ mine).reshape(8, -1, GGUF_TYPE_SIZES[name])
        assert not diff[..., :3].any() and not diff[..., 4:].any() and set(np.unique(diff[..., 3])) <= {0, 0x80}
        decoded = legacy_dequantize(legacy_quantize(x, fmt), fmt).numpy()
        assert np.array_equal(_bits(decoded), _bits(quants.dequantize(ref, qtype)))


def test_gguf_blocks_checks_its_arguments():
    codes, d = torch.zeros(2, 64, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.float16)
    assert gguf_blocks("q4_0", codes, d).shape == (2, 36)
    with pytest.raises(ValueError, match="needs block minimums"):
        gguf_blocks("q4_1", codes, d)
    with pytest.raises(ValueError, match="takes no block minimums"):
        gguf_blocks("q5_0", codes, d, d)
    with pytest.raises(ValueError, match="no GGUF layout"):
        gguf_blocks("q2_k", codes, d)
    with pytest.raises(ValueError, match="multiple of 32"):
        gguf_blocks("q4_0", codes[:, :40], d)


def test_registry_and_recipes():
    for name in NAMES:
        fmt = parse_format(name.upper())
        assert fmt is GGUF_LEGACY_FORMATS[name] and fmt.block == 32 and fmt.kind == "block"
        assert fmt.bits == int(name[1]) and fmt.eight_bit == "q8_0" and fmt.learnable_rounding == name.endswith("_0")
        assert WeightQuantConfig(bits=fmt.bits, format=name).spec == ("block", fmt.bits, name)
    PTQConfig(weights=WeightQuantConfig(bits=4, format="q4_0"), rounding=RoundingConfig(method="adaround"))
    with pytest.raises(RecipeError, match="round-to-nearest"):
        PTQConfig(weights=WeightQuantConfig(bits=4, format="q4_1"), rounding=RoundingConfig(method="adaround"))
    with pytest.raises(RecipeError, match="bits"):
        WeightQuantConfig(bits=4, format="q5_0")


@pytest.mark.parametrize("name", NAMES)
def test_round_to_nearest_is_a_fixed_point(name):
    """Export re-encodes the on-grid weight with the reference encoder: it must give the same values."""
    fmt = GGUF_LEGACY_FORMATS[name]
    adversarial = _adversarial()
    finite = torch.isfinite(fmt.fake_quantize_blocks(adversarial)).all(dim=1)  # not the scales beyond float16
    x = torch.cat([_random()[8:30, :96], adversarial[finite].repeat(1, 3)])
    once = fmt.fake_quantize_blocks(x)
    assert torch.equal(fmt.fake_quantize_blocks(once), once)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layer", [nn.Linear(40, 8), nn.Conv2d(6, 4, 3)])  # rows of 40 and 54: padded blocks
def test_layer_packs_and_decodes_bit_identical(name, layer):
    fmt = GGUF_LEGACY_FORMATS[name]
    m = make_quant_module(layer, {"weight_format": name, "group_size": 0, "split": 0})
    packed, entry = pack_layer(m)
    assert packed is not None, entry
    part = entry["parts"][0]
    assert part["storage"] == name and entry["summary"] == name and part["padded_row"] == 64
    assert torch.equal(packed.quantized_weight(), m.quantized_weight())
    n = layer.weight.shape[0] * part["padded_row"]
    assert entry["packed_bytes"] * 8 == n * BITS_PER_WEIGHT[name]  # codes + float16 d (+ float16 m)
    assert fmt.check_stored(packed._part_tensors(0), part) is None
    if fmt.has_min:
        assert "wzero missing" in fmt.check_stored({"qweight": packed.qweight0, "wscale": packed.wscale0}, part)
    assert fmt.check_part({**part, "bits": 8}) is not None and fmt.check_part({**part, "storage": "q8_0"}) is not None


def test_rest_grid_hard_rounds_as_round_to_nearest():
    """Learned rounding's rest values are multiples of 2^-9 (2^-8 for Q5): their hard rounding at
    initialization (V >= 0) is exactly rest >= 1/2."""
    rest = torch.arange(512, dtype=torch.float32) / 512
    assert torch.equal(inverse_rectified_sigmoid(rest) >= 0, rest >= 0.5)


def _weights() -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(12, 40) * 0.2
    w[0, :5] = 0.0  # pruned
    w[1] = 0.0  # an all-zero row
    w[2] = 1e-40  # 1/d overflows: a zero float16 scale
    w[3, :32] = torch.cat([torch.tensor([-8.0]), torch.arange(31) % 16 - 7.5]) * 0.125  # ties
    w[4, :32] = torch.cat([torch.tensor([-16.0]), torch.arange(31) - 15.5]) * 0.0625
    w[5, :2] = torch.tensor([0.9, -0.9])  # equal magnitudes
    return w


@pytest.mark.parametrize("name", SYMMETRIC)
def test_learned_rounding_at_its_initialization_is_round_to_nearest(name):
    w = _weights()
    q = WeightQuantizer(name, tuple(w.shape))  # rows of 40: padded to 64
    rtn = q(w)
    q.init_rounding(w)
    assert q.alpha.shape == w.shape and bool(torch.isfinite(q.alpha).all())
    soft = q(w).detach()
    step = (rtn - w).abs().max()
    assert float((soft - w).abs().max()) <= float(step) + 1e-6  # the soft weight is w, except clipped values
    hard = q.finalize_rounding(w)
    assert torch.equal(hard.view(torch.int32), rtn.view(torch.int32))  # bit for bit, signed zeros included


@pytest.mark.parametrize("name", SYMMETRIC)
def test_learned_rounding_never_leaves_the_grid(name):
    fmt = GGUF_LEGACY_FORMATS[name]
    w = _weights()
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1))
    q = WeightQuantizer(name, tuple(w.shape))
    rtn = q(w)
    q.init_rounding(w)
    opt = torch.optim.Adam([q.alpha], lr=0.05)
    for step in range(20):
        loss = ((x @ q(w).T - x @ w.T) ** 2).mean() + 1e-3 * rounding_regularizer(q.alpha, 20.0 - step * 0.8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q.alpha[6:] += torch.randn_like(q.alpha[6:]) * 4  # and rounding variables anywhere
    hard = q.finalize_rounding(w)
    assert not torch.equal(hard, rtn) and torch.all(hard[0, :5] == 0)
    assert torch.equal(q(hard), hard)  # on the grid, with the reference encoder's scales: export keeps it
    pad = lambda t: torch.nn.functional.pad(t, (0, 24))  # noqa: E731
    got, ref = legacy_quantize(pad(hard), fmt), legacy_quantize(pad(w), fmt)
    assert torch.equal(got.d, ref.d)  # the scales the reference encoder chose for w (a zero's sign aside)
    live = (ref.d != 0).repeat_interleave(32, dim=1)  # (a zero scale decodes to zeros whatever the codes)
    assert int(got.codes.max()) <= fmt.top and int((got.codes.int() - ref.codes.int())[live].abs().max()) <= 1


@pytest.mark.parametrize("name", ["q4_0"])
def test_ptq_run_with_learned_rounding_exports_and_reloads(tmp_path, name):
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.quant.nn.packed import PackedMixin
    from tests.helpers import reload_and_check_pixels, run_tiny_ptq

    fmt = GGUF_LEGACY_FORMATS[name]
    run = run_tiny_ptq(tmp_path, {"weights": {"bits": 4, "format": name},
                                  "rounding": {"method": "adaround", "iters": 2, "batch_size": 2},
                                  "include": ["down_blocks.0.*", "conv_in", "conv_out"]})  # a few units: fast
    layers = json.loads((run / "model" / "diffsqueeze.json").read_text())["quantization"]["components"]["unet"]["layers"]
    parts = [(e, p) for e in layers.values() for p in e.get("parts", [])]
    assert parts and {p["storage"] for _, p in parts} == {name}
    assert all(e["packed_bytes"] * 8 == sum(p["shape"][0] * p["padded_row"] for p in e["parts"]) * 4.5
               for e in layers.values() if e.get("parts"))
    pipe = load_pipeline(str(run / "model"))
    packed = [m for m in pipe.unet.modules() if isinstance(m, PackedMixin)]
    assert packed
    qtype = getattr(GGMLQuantizationType, name.upper())
    for m in packed:
        for i, part in enumerate(m.packed_spec["parts"]):
            stored = m._part_tensors(i)
            w = fmt.decode(stored, part)
            rows = torch.nn.functional.pad(w.reshape(w.shape[0], -1), (0, part["padded_row"] - part["numel"] // w.shape[0]))
            _, again = fmt.encode(rows.reshape(rows.shape[0], 1, -1), {}, "float32", tuple(w.shape))
            assert all(torch.equal(again[k], stored[k]) for k in stored)  # the stored codes are a fixed point
            blocks = gguf_quantize_bytes(rows, name).numpy()  # what a .gguf file of the weight holds
            decoded = quants.dequantize(blocks, qtype)[:, : w[0].numel()].reshape(w.shape)
            assert np.array_equal(decoded, w.numpy())
    reload_and_check_pixels(run)
