"""GGUF K-quants Q4_K, Q5_K, Q6_K as number formats.

What is checked, since the ``gguf`` package cannot quantize K-quants and ggml's C source is not
at hand: the vectorised encoder equals a literal scalar port of ggml's reference (float32 one
operation at a time, ggml's magic-number ``nearest_int``), byte for byte; the bytes dequantize
through ``gguf.quants.dequantize`` and diffusers' own GGUF dequantizers bit for bit to the
format's decoded values; the search beats a plain min/max choice on Gaussian weights; round to
nearest is a fixed point (ggml's own encoder is not); the packed storage; and a ptq run that
exports and reloads pixel for pixel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.primitives.formats import parse_format
from diffsqueeze.quant.primitives.gguf_bytes import GGUF_BLOCK_SIZES, GGUF_TYPE_SIZES, gguf_kquant_blocks, gguf_quantize_bytes
from diffsqueeze.quant.primitives.gguf_kquants import GGUF_KQUANT_FORMATS, kquant_dequantize, kquant_quantize
from diffsqueeze.quant.primitives.gguf_kref import KQUANT_SPECS, KQuantCodes, kquant_ref_quantize
from diffsqueeze.quant.ptq.config import PTQConfig, RoundingConfig, WeightQuantConfig

quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

NAMES = sorted(GGUF_KQUANT_FORMATS)
BITS_PER_WEIGHT = {"q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
F = np.float32


# ---- a literal scalar port of ggml's reference (the C loops as written, float32 throughout) ----------


def _c_nearest_int(fval) -> int:
    val = np.array(F(fval) + F(12582912.0), dtype=np.float32)
    return (int(val.view(np.int32)) & 0x007FFFFF) - 0x00400000


def _c_make_qkx2_quants(nmax, x, weights, rmin, rdelta, nstep):
    n, mn, mx = len(x), x[0], x[0]
    sum_w = weights[0]
    sum_x = F(sum_w * x[0])
    for i in range(1, n):
        mn, mx = (x[i] if x[i] < mn else mn), (x[i] if x[i] > mx else mx)
        sum_w = F(sum_w + weights[i])
        sum_x = F(sum_x + F(weights[i] * x[i]))
    if mn > 0:
        mn = F(0)
    if mx == mn:
        return [0] * n, F(0), F(-mn)
    iscale = F(F(nmax) / F(mx - mn))
    scale = F(F(1) / iscale)
    L, best = [], F(0)
    for i in range(n):
        L.append(max(0, min(nmax, _c_nearest_int(F(iscale * F(x[i] - mn))))))
        diff = F(F(F(scale * F(L[i])) + mn) - x[i])
        best = F(best + F(weights[i] * F(diff * diff)))
    for step in range(nstep + 1):
        iscale = F(F(F(F(rmin) + F(F(rdelta) * F(step))) + F(nmax)) / F(mx - mn))
        laux, sum_l, sum_l2, sum_xl = [], F(0), F(0), F(0)
        for i in range(n):
            li = max(0, min(nmax, _c_nearest_int(F(iscale * F(x[i] - mn)))))
            laux.append(li)
            wl = F(weights[i] * F(li))
            sum_l, sum_l2, sum_xl = F(sum_l + wl), F(sum_l2 + F(wl * F(li))), F(sum_xl + F(wl * x[i]))
        big_d = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if big_d > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / big_d)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / big_d)
            if this_min > 0:
                this_min, this_scale = F(0), F(sum_xl / sum_l2)
            cur = F(0)
            for i in range(n):
                diff = F(F(F(this_scale * F(laux[i])) + this_min) - x[i])
                cur = F(cur + F(weights[i] * F(diff * diff)))
            if cur < best:
                L, best, scale, mn = laux, cur, this_scale, this_min
    return L, scale, F(-mn)


def _c_quantize_with_min(x, name):
    spec = KQUANT_SPECS[name]
    L, scales, mins = [], [], []
    for j in range(8):
        sub = [F(v) for v in x[32 * j: 32 * j + 32]]
        sum_x2 = F(0)
        for v in sub:
            sum_x2 = F(sum_x2 + F(v * v))
        av_x = F(np.sqrt(F(sum_x2 / F(32))))
        lj, s, m = _c_make_qkx2_quants(spec.top, sub, [F(av_x + F(abs(v))) for v in sub], spec.rmin, spec.rdelta,
                                       spec.nstep)
        L += lj
        scales.append(s)
        mins.append(m)
    max_scale, max_min = F(0), F(0)
    for s, m in zip(scales, mins):
        max_scale, max_min = (s if s > max_scale else max_scale), (m if m > max_min else max_min)
    inv_scale = F(F(63) / max_scale) if max_scale > 0 else F(0)
    inv_min = F(F(63) / max_min) if max_min > 0 else F(0)
    ls = [min(63, _c_nearest_int(F(inv_scale * s)) & 0xFF) for s in scales]
    lm = [min(63, _c_nearest_int(F(inv_min * m)) & 0xFF) for m in mins]
    d, dmin = np.float16(F(max_scale / F(63))), np.float16(F(max_min / F(63)))
    for j in range(8):
        dd = F(F(d) * F(ls[j]))
        if not dd:
            continue
        dm = F(F(dmin) * F(lm[j]))
        for i in range(32 * j, 32 * j + 32):
            L[i] = max(0, min(spec.top, _c_nearest_int(F(F(F(x[i]) + dm) / dd))))
    return KQuantCodes(torch.tensor(L, dtype=torch.uint8), torch.tensor(ls, dtype=torch.uint8),
                       torch.tensor(d), torch.tensor(lm, dtype=torch.uint8), torch.tensor(dmin))


def _c_make_qx_quants(nmax, x):
    mx, amax = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = F(abs(v)), v
    if amax < F(1e-15):
        return [0] * len(x), F(0)

    def sums(iscale):
        ls, sumlx, suml2 = [], F(0), F(0)
        for v in x:
            li = max(-nmax, min(nmax - 1, _c_nearest_int(F(iscale * v))))
            ls.append(li + nmax)
            w = F(v * v)
            sumlx, suml2 = F(sumlx + F(F(w * v) * F(li))), F(suml2 + F(F(w * F(li)) * F(li)))
        return ls, sumlx, suml2

    L, sumlx, suml2 = sums(F(F(-nmax) / mx))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for step in range(-9, 10):
        if step:
            ls, sumlx, suml2 = sums(F(-F(F(nmax) + F(F(0.1) * F(step))) / mx))
            if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
                L, scale = ls, F(sumlx / suml2)
                best = F(scale * sumlx)
    return L, scale


def _c_quantize_q6_k(x):
    L, scales = [], []
    for j in range(16):
        lj, s = _c_make_qx_quants(32, [F(v) for v in x[16 * j: 16 * j + 16]])
        L += lj
        scales.append(s)
    max_scale, max_abs = F(0), F(0)
    for s in scales:
        if abs(s) > max_abs:
            max_abs, max_scale = F(abs(s)), s
    if max_abs < F(1e-15):
        return KQuantCodes(torch.zeros(256, dtype=torch.uint8), torch.zeros(16, dtype=torch.int8),
                           torch.tensor(np.float16(0)))
    iscale = F(F(-128) / max_scale)
    d = np.float16(F(F(1) / iscale))
    sc = [min(127, _c_nearest_int(F(iscale * s))) for s in scales]
    for j in range(16):
        dd = F(F(d) * F(sc[j]))
        if not dd:
            continue
        for i in range(16 * j, 16 * j + 16):
            L[i] = max(-32, min(31, _c_nearest_int(F(F(x[i]) / dd)))) + 32
    return KQuantCodes(torch.tensor(L, dtype=torch.uint8), torch.tensor(sc, dtype=torch.int8), torch.tensor(d))


def _c_reference(x: np.ndarray, name: str) -> KQuantCodes:
    return _c_quantize_q6_k(x) if name == "q6_k" else _c_quantize_with_min(x, name)


# ---- data -----------------------------------------------------------------------------------------


def _edge_blocks() -> torch.Tensor:
    """Super-blocks (one per row) at the edges of the search: zeros, constants, ties, signs, sparsity."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.zeros(256), torch.full((256,), 0.3), torch.full((256,), -0.7),
            torch.arange(256.0) % 16 - 7.5, (torch.arange(256.0) % 32 - 16) / 8, torch.rand(256, generator=g) + 2,
            -torch.rand(256, generator=g), torch.randn(256, generator=g) * torch.logspace(-3, 0, 8).repeat_interleave(32)]
    sparse = torch.randn(256, generator=g)
    sparse[torch.rand(256, generator=g) < 0.9] = 0
    rows += [sparse, torch.randn(256, generator=g).pow(5), torch.cat([torch.zeros(128), torch.randn(128, generator=g)])]
    rows += [torch.randn(256, generator=g) * s for s in (1e-6, 3e-5, 1e3)]
    return torch.stack(rows)


def _gauss(n_rows: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_rows, 1024, generator=torch.Generator().manual_seed(seed)) * 0.05


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


# ---- the encoder ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_vectorised_encoder_equals_the_scalar_port_of_ggml(name):
    x = torch.cat([_edge_blocks()[:, :256], _gauss(2, seed=5).reshape(-1, 256)[:3]])
    ours = kquant_ref_quantize(x, name)
    for r in range(x.shape[0]):
        ref = _c_reference(x[r].numpy(), name)
        mine = KQuantCodes(ours.codes[r], ours.sc[r], ours.d[r], None if ours.m is None else ours.m[r],
                           None if ours.dmin is None else ours.dmin[r])
        assert torch.equal(gguf_kquant_blocks(name, mine), gguf_kquant_blocks(name, _one(ref))), (name, r)


def _one(q: KQuantCodes) -> KQuantCodes:
    """A scalar port's super-block in :class:`KQuantCodes` shapes (codes (256,), scales (1, n_sub), d (1,))."""
    n_sub = q.sc.numel()
    return KQuantCodes(q.codes.reshape(256), q.sc.reshape(1, n_sub), q.d.reshape(1).to(torch.float16),
                       None if q.m is None else q.m.reshape(1, n_sub),
                       None if q.dmin is None else q.dmin.reshape(1).to(torch.float16))


@pytest.mark.parametrize("name", NAMES)
def test_bytes_dequantize_through_gguf_and_diffusers_to_the_format_values(name):
    from diffusers.quantizers.gguf import utils as dq

    x = torch.cat([_gauss(8).reshape(-1, 1024), _edge_blocks().repeat(1, 4)])
    qtype = getattr(GGMLQuantizationType, name.upper())
    blocks = gguf_quantize_bytes(x, name)
    assert blocks.dtype == torch.uint8 and blocks.shape == (x.shape[0], 4 * GGUF_TYPE_SIZES[name])
    assert quants.GGML_QUANT_SIZES[qtype] == (GGUF_BLOCK_SIZES[name], GGUF_TYPE_SIZES[name])
    ours = kquant_dequantize(kquant_quantize(x, name), name)
    fake = GGUF_KQUANT_FORMATS[name].fake_quantize(x.reshape(x.shape[0], 1, -1), {}).reshape(x.shape)
    assert torch.equal(fake, ours)  # (a row of zeros: -0 from ggml's Q6_K, +0 kept where the row is already exact)
    from_gguf = torch.from_numpy(quants.dequantize(blocks.numpy(), qtype))
    assert torch.equal(_bits(from_gguf), _bits(ours))  # signed zeros included
    fn = getattr(dq, f"dequantize_blocks_{name.upper()}")
    from_diffusers = fn(blocks.reshape(-1, GGUF_TYPE_SIZES[name]), 256, GGUF_TYPE_SIZES[name], dtype=torch.float32)
    assert torch.equal(_bits(from_diffusers.reshape(x.shape)), _bits(ours))


@pytest.mark.parametrize("name", NAMES)
def test_the_search_beats_a_plain_min_max_choice(name):
    x = _gauss(64)
    mse = float(((kquant_dequantize(kquant_quantize(x, name), name) - x) ** 2).mean())
    assert mse < 0.95 * _minmax_mse(x, name), name  # measured on 4M weights: 0.83, 0.90, 0.64 of it
    rel = mse / float((x ** 2).mean())
    assert rel < {"q4_k": 6e-3, "q5_k": 1.6e-3, "q6_k": 4e-4}[name]  # measured 5.1e-3, 1.3e-3, 3.2e-4


def _minmax_mse(x: torch.Tensor, name: str) -> float:
    """The same super-block layout with each sub-block's scale (and min) from its own range."""
    spec = KQUANT_SPECS[name]
    xs = x.reshape(-1, spec.n_sub, spec.sub)
    if spec.has_min:
        lo = xs.amin(-1).clamp(max=0)
        scale = (xs.amax(-1) - lo) / spec.top
        d = (scale.amax(-1) / 63).half().float()[:, None]
        dmin = ((-lo).amax(-1) / 63).half().float()[:, None]
        a, b = d * torch.round(scale / d).clamp(1, 63), dmin * torch.round(-lo / dmin).clamp(0, 63)
        q = torch.round((xs + b[..., None]) / a[..., None]).clamp(0, spec.top)
        y = a[..., None] * q - b[..., None]
    else:
        scale = xs.abs().amax(-1) / 32
        d = (scale.amax(-1) / 127).half().float()[:, None]
        a = d * torch.round(scale / d).clamp(1, 127)
        y = a[..., None] * torch.round(xs / a[..., None]).clamp(-32, 31)
    return float(((y.reshape(x.shape) - x) ** 2).mean())


@pytest.mark.parametrize("name", NAMES)
def test_round_to_nearest_is_a_fixed_point(name):
    """ggml's encoder moves some decoded super-blocks (the search misses a grid whose codes leave the top
    unused); kquant_quantize keeps every one, so export and the GGUF writer store the run's weight."""
    g = torch.Generator().manual_seed(2)
    sparse = torch.randn(16, 1024, generator=g)
    sparse[torch.rand(16, 1024, generator=g) < 0.9] = 0
    x = torch.cat([_gauss(64), sparse, torch.randn(8, 1024, generator=g).pow(3), _edge_blocks().repeat(1, 4)])
    ref = kquant_ref_quantize(x[:88], name)
    assert all(torch.equal(getattr(ref, k), getattr(kquant_quantize(x[:88], name), k)) for k in ("codes", "sc", "d"))
    once = kquant_dequantize(kquant_quantize(x, name), name)
    moved = kquant_dequantize(kquant_ref_quantize(once, name), name)
    if name == "q5_k":
        assert not torch.equal(_bits(moved), _bits(once))  # ggml's encoder is not idempotent
    twice = kquant_dequantize(kquant_quantize(once, name), name)
    assert torch.equal(_bits(twice), _bits(once))


@pytest.mark.parametrize("name", NAMES)
def test_padded_rows_quantize_to_themselves(name):
    """A row padded to whole super-blocks: ggml's search sees the padding's zeros, and the codes of the
    on-grid row need reproduce only its values (trailing zeros of it included): QuEST's write-back
    quantizes to itself, and export (which knows the row length) stores it exactly."""
    from diffsqueeze.quant.nn.quantizers import WeightQuantizer

    g = torch.Generator().manual_seed(4)
    for shape in [(8, 40), (4, 54), (8, 600)]:
        w = torch.randn(*shape, generator=g) * 0.05
        w[::2, -3:] = 0  # zeros at the end of a row: pruned weights, indistinguishable from padding
        q = WeightQuantizer(name, shape)
        once = q(w)
        assert torch.equal(q(once), once)
        fmt = GGUF_KQUANT_FORMATS[name]
        rows = torch.nn.functional.pad(once, (0, q.padded_row - shape[1]))
        spec, stored = fmt.encode(rows[:, None], {}, "float32", shape)
        part = {**spec, "shape": list(shape), "numel": once.numel(), "bits": fmt.bits}
        assert torch.equal(_bits(fmt.decode(stored, part)), _bits(once))


# ---- the format -----------------------------------------------------------------------------------


def test_registry_and_recipes():
    for name in NAMES:
        fmt = parse_format(name.upper())
        assert fmt is GGUF_KQUANT_FORMATS[name] and fmt.block == 256 and fmt.kind == "block"
        assert fmt.bits == int(name[1]) and fmt.eight_bit == "q8_0" and fmt.learnable_rounding
        assert WeightQuantConfig(bits=fmt.bits, format=name).spec == ("block", fmt.bits, name)
        PTQConfig(weights=WeightQuantConfig(bits=fmt.bits, format=name), rounding=RoundingConfig(method="adaround"))
    with pytest.raises(RecipeError, match="bits"):
        WeightQuantConfig(bits=4, format="q6_k")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layer", [nn.Linear(40, 8), nn.Conv2d(6, 4, 3), nn.Linear(512, 3)])  # rows 40, 54: padded
def test_layer_packs_and_decodes_bit_identical(name, layer):
    fmt = GGUF_KQUANT_FORMATS[name]
    m = make_quant_module(layer, {"weight_format": name, "group_size": 0, "split": 0})
    packed, entry = pack_layer(m)
    assert packed is not None, entry
    part = entry["parts"][0]
    assert part["storage"] == name and entry["summary"] == name and part["padded_row"] % 256 == 0
    assert torch.equal(packed.quantized_weight(), m.quantized_weight())
    n = layer.weight.shape[0] * part["padded_row"]
    assert entry["packed_bytes"] * 8 == n * BITS_PER_WEIGHT[name]  # as in a GGUF file
    stored = packed._part_tensors(0)
    assert fmt.check_stored(stored, part) is None
    assert "missing" in fmt.check_stored({k: v for k, v in stored.items() if k != "wscale_t"}, part)
    assert fmt.check_part({**part, "bits": 8}) is not None and fmt.check_part({**part, "padded_row": 96}) is not None
    # the stored codes are the GGUF blocks of the decoded weight
    rows = torch.nn.functional.pad(packed.quantized_weight().reshape(n // part["padded_row"], -1),
                                   (0, part["padded_row"] - part["numel"] // layer.weight.shape[0]))
    assert torch.equal(_bits(fmt.decode(stored, part)), _bits(packed.quantized_weight()))
    assert torch.equal(gguf_quantize_bytes(rows, name), gguf_quantize_bytes(gguf_values(rows, name), name))


def gguf_values(rows: torch.Tensor, name: str) -> torch.Tensor:
    qtype = getattr(GGMLQuantizationType, name.upper())
    return torch.from_numpy(quants.dequantize(gguf_quantize_bytes(rows, name).numpy(), qtype))


def test_gguf_kquant_blocks_checks_its_arguments():
    q = kquant_quantize(torch.randn(2, 512), "q4_k")
    assert gguf_kquant_blocks("q4_k", q).shape == (2, 288)
    with pytest.raises(ValueError, match="no K-quant layout"):
        gguf_kquant_blocks("q2_k", q)
    with pytest.raises(ValueError, match="multiple of 256"):
        gguf_kquant_blocks("q4_k", KQuantCodes(q.codes[:, :300], q.sc, q.d, q.m, q.dmin))
    with pytest.raises(ValueError, match="mins"):
        gguf_kquant_blocks("q5_k", KQuantCodes(q.codes, q.sc, q.d))
    with pytest.raises(ValueError, match="multiple of 256"):
        kquant_quantize(torch.randn(2, 288), "q6_k")


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])  # (q5_k: q4_k's code with 5-bit codes)
def test_ptq_run_exports_and_reloads(tmp_path, name):
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.quant.nn.packed import PackedMixin
    from tests.helpers import reload_and_check_pixels, run_tiny_ptq

    fmt = GGUF_KQUANT_FORMATS[name]
    run = run_tiny_ptq(tmp_path, {"weights": {"bits": fmt.bits, "format": name},
                                  "include": ["down_blocks.0.*", "conv_in", "conv_out"]})  # a few units: fast
    layers = json.loads((run / "model" / "diffsqueeze.json").read_text())["quantization"]["components"]["unet"]["layers"]
    parts = [(e, p) for e in layers.values() for p in e.get("parts", [])]
    assert parts and {p["storage"] for _, p in parts} == {name}
    assert all(e["packed_bytes"] * 8 == sum(p["shape"][0] * p["padded_row"] for p in e["parts"]) * BITS_PER_WEIGHT[name]
               for e in layers.values() if e.get("parts"))
    pipe = load_pipeline(str(run / "model"))
    packed = [m for m in pipe.unet.modules() if isinstance(m, PackedMixin)]
    assert packed
    for m in packed:
        for i, part in enumerate(m.packed_spec["parts"]):
            stored = m._part_tensors(i)
            w = fmt.decode(stored, part)
            rows = torch.nn.functional.pad(w.reshape(w.shape[0], -1), (0, part["padded_row"] - part["numel"] // w.shape[0]))
            _, again = fmt.encode(rows.reshape(rows.shape[0], 1, -1), {}, "float32", tuple(w.shape))
            assert all(torch.equal(again[k], stored[k]) for k in stored)  # the stored codes are a fixed point
            blocks = gguf_kquant_blocks(name, fmt.stored_codes(stored, part))
            decoded = torch.from_numpy(quants.dequantize(blocks.numpy(), getattr(GGMLQuantizationType, name.upper())))
            assert torch.equal(_bits(decoded[:, : w[0].numel()].reshape(w.shape)), _bits(w))  # a .gguf of the codes
            if part["padded_row"] == w[0].numel():  # a row GGUF can hold: re-encoded from the values alone
                assert torch.equal(_bits(gguf_values(rows, name)), _bits(rows))
    reload_and_check_pixels(run)


# ---- learned rounding -----------------------------------------------------------------------------


def _learnable_weights(cols: int = 300) -> torch.Tensor:
    w = torch.randn(12, cols, generator=torch.Generator().manual_seed(3)) * 0.05  # rows of 300: padded to 512
    w[0, :40] = 0  # pruned weights
    w[1] = w[1].abs()  # a row of one sign (Q4_K/Q5_K: minimum at 0)
    w[2, 100:] *= 1e-4  # sub-blocks whose scale rounds to 0 against the super-block's largest
    return w


@pytest.mark.parametrize("name", NAMES)
def test_learned_rounding_at_its_initialization_is_round_to_nearest(name):
    from diffsqueeze.quant.nn.quantizers import WeightQuantizer

    w = _learnable_weights()
    q = WeightQuantizer(name, tuple(w.shape))
    rtn = q(w)
    q.init_rounding(w)
    assert q.alpha.shape == w.shape and bool(torch.isfinite(q.alpha).all())
    hard = q.finalize_rounding(w)
    assert torch.equal(hard.view(torch.int32), rtn.view(torch.int32))  # bit for bit, signed zeros included


@pytest.mark.parametrize("cols", [300, 512])
@pytest.mark.parametrize("name", NAMES)
def test_learned_rounding_stays_on_a_grid_that_encodes_and_exports_exactly(name, cols):
    """Learned codes anywhere (a trained start, then random rounding variables): the weight is on a
    K-quant grid, round-to-nearest keeps it, it packs and decodes bit for bit, and (rows a multiple of
    256, as a GGUF tensor needs) its GGUF bytes read back through the gguf package as exactly it."""
    from diffsqueeze.quant.nn.quantizers import WeightQuantizer
    from diffsqueeze.quant.primitives.rounding import rounding_regularizer

    w = nn.Parameter(_learnable_weights(cols))
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(4))
    q = WeightQuantizer(name, tuple(w.shape))
    rtn = q(w).detach()
    q.init_rounding(w)
    opt = torch.optim.Adam([q.alpha], lr=0.05)
    for step in range(10):
        loss = ((x @ q(w).T - x @ w.detach().T) ** 2).mean() + 1e-3 * rounding_regularizer(q.alpha, 20.0 - step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert q._grid is not None  # the grid was searched once, not per step
    with torch.no_grad():
        q.alpha[4:] += torch.randn_like(q.alpha[4:]) * 4
        hard = q.finalize_rounding(w)
    assert not torch.equal(hard, rtn) and torch.all(hard[0, :40] == rtn[0, :40])  # pruned: the reference's code
    kept = q(hard)  # on a grid: encoding keeps it (the values; a Q6_K super-block whose float16 scale is 0
    assert torch.equal(kept, hard)  # decodes to zeros of one sign, which learned codes may not have)
    assert torch.equal(kept.view(torch.int32)[hard != 0], hard.view(torch.int32)[hard != 0])
    assert torch.equal(q(kept).view(torch.int32), kept.view(torch.int32))
    layer = nn.Linear(cols, 12, bias=False)
    m = make_quant_module(layer, {"weight_format": name, "group_size": 0, "split": 0})
    with torch.no_grad():
        m.weight.copy_(hard)
    packed, entry = pack_layer(m)
    assert packed is not None, entry
    assert torch.equal(packed.quantized_weight().view(torch.int32), kept.view(torch.int32))
    if cols % 256 == 0:
        back = quants.dequantize(gguf_quantize_bytes(kept, name).numpy(), GGMLQuantizationType[name.upper()])
        assert np.array_equal(back.view(np.uint32), kept.numpy().view(np.uint32))
