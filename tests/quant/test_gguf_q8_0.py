"""GGUF Q8_0 as a number format: the grid against a float64 reference of ggml's definition and
against the gguf package, and the format through the protocol alone: quantize (the ptq stage),
export packed, reload bit-identical, ``inspect``, and refused by the int8 kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from diffsqueeze.quant.export.kernels import layer_plan
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.primitives.formats import parse_format
from diffsqueeze.quant.primitives.gguf_q8_0 import q8_0_dequantize, q8_0_quantize


def _reference(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 in float64 where it is exact: d = amax / 127 (float32), q = roundf(x * (1/d)), x_hat = q * f16(d)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d == 0, np.float32(0), (np.float32(1) / np.where(d == 0, 1, d)).astype(np.float32)).astype(np.float32)
    v = (blocks * inv).astype(np.float64)
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # half away from zero, exact in float64
    return (q * d.astype(np.float16).astype(np.float64)).reshape(x.shape)


def _values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g) * torch.logspace(-3, 2, 6).unsqueeze(1)
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, :32] = torch.arange(32) * (127 / 31) / 2  # many exact halves: roundf rounds them away from zero
    return x


def test_grid_matches_the_float64_reference():
    x = _values()
    codes, scales = q8_0_quantize(x)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float16 and int(codes.abs().max()) <= 127
    got = q8_0_dequantize(codes, scales).double().numpy()
    np.testing.assert_array_equal(got, _reference(x.numpy()))
    fmt = parse_format("q8_0")
    assert torch.equal(fmt.fake_quantize(x.reshape(6, 1, 96), {}).reshape(6, 96), q8_0_dequantize(codes, scales))


def test_bit_identical_to_the_gguf_package():
    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    x = _values()
    codes, scales = q8_0_quantize(x)
    raw = quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0).reshape(-1, 34)
    assert np.array_equal(raw[:, :2].copy().view(np.float16).reshape(-1), scales.reshape(-1).numpy())
    assert np.array_equal(raw[:, 2:].copy().view(np.int8).reshape(-1), codes.reshape(-1).numpy())
    decoded = quants.dequantize(raw.reshape(6, -1), GGMLQuantizationType.Q8_0)
    assert np.array_equal(decoded, q8_0_dequantize(codes, scales).numpy())


@pytest.mark.parametrize("layer", [nn.Linear(40, 8), nn.Conv2d(6, 4, 3)])  # rows of 40 and 54: padded blocks
def test_layer_packs_and_decodes_bit_identical(layer):
    m = make_quant_module(layer, {"weight_format": "q8_0", "group_size": 0, "split": 0})
    packed, entry = pack_layer(m)
    assert packed is not None, entry
    assert entry["parts"][0]["storage"] == "q8_0" and entry["summary"] == "q8_0"
    assert torch.equal(packed.quantized_weight(), m.quantized_weight())
    assert packed.packed_nbytes() == packed.qweight0.numel() + 2 * packed.wscale0.numel()


def test_int8_kernel_refuses_it():
    m = make_quant_module(nn.Linear(64, 32), {"weight_format": "q8_0", "group_size": 0, "split": 0,
                                              "act": {"format": "int8", "shape": [1]}})
    packed, _ = pack_layer(m)
    plan = layer_plan(packed, torch.device("cpu"), None)
    assert plan["compute"] == "simulated" and "weights q8_0" in plan["reason"], plan


def test_ptq_run_exports_reloads_and_inspects(tmp_path, capsys):
    from diffsqueeze.cli import main
    from tests.helpers import reload_and_check_pixels, run_tiny_ptq

    run = run_tiny_ptq(tmp_path, {"weights": {"bits": 8, "format": "q8_0"},
                                  "activations": {"bits": 8, "format": "q8_0", "granularity": "group"},
                                  "rounding": {"method": "nearest"}})
    reload_and_check_pixels(run)
    for device in ("cpu", "cuda"):  # the plan for either device, on any machine
        assert main(["inspect", str(run / "model"), "--json", "--device", device]) == 0
        desc = json.loads(capsys.readouterr().out)["model"]
        layers = [r for r in desc["components"]["unet"]["layers"].values() if "compute" in r]
        assert desc["kernel_device"] == device and layers
        assert all(r["compute"].startswith("simulated") and set(r["storage"].split("+")) == {"q8_0"}  # split layers: 2 parts
                   for r in layers), layers


def test_learned_rounding_starts_at_round_to_nearest_and_re_encodes_to_itself():
    from diffsqueeze.quant.nn.quantizers import WeightQuantizer

    w = torch.randn(8, 80, generator=torch.Generator().manual_seed(5)) * 0.1  # rows of 80: padded to 96
    w[0, :32] = 0  # a block of zeros
    w[1, :32] *= 1e-9  # a block whose float16 scale is 0
    q = WeightQuantizer("q8_0", tuple(w.shape))
    rtn = q(w)
    q.init_rounding(w)
    assert bool(torch.isfinite(q.alpha).all())
    hard = q.finalize_rounding(w)
    assert torch.equal(hard.view(torch.int32), rtn.view(torch.int32))
    q.init_rounding(w)
    with torch.no_grad():
        q.alpha += torch.randn_like(q.alpha) * 4  # codes anywhere
    hard = q.finalize_rounding(w)
    assert not torch.equal(hard, rtn)
    codes, scales = q8_0_quantize(torch.nn.functional.pad(hard, (0, 16)))
    _, ref_scales = q8_0_quantize(torch.nn.functional.pad(w, (0, 16)))
    assert torch.equal(scales, ref_scales)  # the block scales the reference chose for w
    back = q8_0_dequantize(codes, scales)[:, :80]
    assert torch.equal(back, hard)  # bit for bit but the zeros of a block whose scale is 0 (all +0 once encoded)
    assert torch.equal(back.view(torch.int32)[hard != 0], hard.view(torch.int32)[hard != 0])
    live = (ref_scales != 0).repeat_interleave(32, dim=1)  # (a zero scale decodes to zeros whatever the codes)
    ref_codes = q8_0_quantize(torch.nn.functional.pad(w, (0, 16)))[0]
    assert int((codes.int() - ref_codes.int())[live].abs().max()) == 1  # each code at most one step away
