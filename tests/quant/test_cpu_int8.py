"""W8A8 INT on oneDNN's int8 kernels: each layer against the simulated (decode + float) layer it
replaces, float64 reference included; timestep-group scales; the plan's reasons; a builtin:fashion
W8A8 INT run loaded with real kernels against the same run simulated (images)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffsqueeze.quant.export.kernels.onednn_w8a8 import (
    OneDNNW8A8,
    onednn_int8_available,
    onednn_int8_exact,
    onednn_w8a8,
    w8a8_int_problem,
)
from diffsqueeze.quant.export.kernels import decode_weights_once, kernel_plan, use_real_kernels
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.routing import TimestepContext
from diffsqueeze.quant.primitives.formats import int_qparams

pytestmark = pytest.mark.skipif(not onednn_int8_available(), reason="no oneDNN int8 ops in this torch build")
# The kernel's numerics, where the CPU computes them exactly (some AVX2 CPUs without VNNI saturate
# 16-bit pair sums: there the kernel is never chosen, test_saturating_cpu_keeps_layers_simulated)
exact_kernels = pytest.mark.skipif(onednn_int8_available() and not onednn_int8_exact(),
                                   reason="oneDNN int8 saturates 16-bit pair sums on this CPU: the real kernel is not used")


class Holder(nn.Module):
    def __init__(self, **layers):
        super().__init__()
        self.net = nn.ModuleDict(layers)

    @property
    def components(self):
        return {"net": self.net}


def packed(layer: nn.Module, wfmt: str, afmt: str, groups: int = 1, act_shape=(1,), group_size: int = 0,
           split: int = 0):
    torch.manual_seed(0)
    act = {"format": afmt, "shape": list(act_shape), "groups": groups, "n_timesteps": groups}
    q = make_quant_module(layer, {"weight_format": wfmt, "group_size": group_size, "act": act, "split": split})
    for wq, sl in q.weight_parts():
        g = wq.grouped(q.weight.detach()[:, sl])
        s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), wq.fmt.bits, wq.fmt.symmetric)
        wq.set_params(scale=s, zero_point=z)
    tctx = TimestepContext()
    for j, aq in enumerate(q.act_quantizers()):
        for k in range(groups):
            zero = None if aq.fmt.symmetric else torch.full(aq.param_shape, 5.0 + 60 * k + j)
            aq.set_params(k, torch.full(aq.param_shape, 0.02 * (k + 1) + 0.01 * j), zero)
        if groups > 1:
            aq.set_routing([900.0, 100.0], [0, 1])
            aq.tctx = tctx
    layer_packed, entry = pack_layer(q)
    assert layer_packed is not None, entry
    return layer_packed


LAYERS = {"linear": (lambda: nn.Linear(64, 48), (2, 5, 64)),
          "conv": (lambda: nn.Conv2d(32, 16, 3, padding=1, stride=2), (2, 32, 9, 9)),
          "conv1x1": (lambda: nn.Conv2d(32, 16, 1), (2, 32, 6, 6))}


@exact_kernels
@pytest.mark.parametrize("split", [0, 24])
@pytest.mark.parametrize("afmt", ["int8", "int8_sym"])
@pytest.mark.parametrize("wfmt", ["int8", "int8_sym"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_real_layer_equals_simulated_and_float64(kind, wfmt, afmt, split):
    """Whole weights and shortcut-split ones (two input-channel ranges, two scales each)."""
    make, shape = LAYERS[kind]
    m = packed(make(), wfmt, afmt, split=split)
    assert w8a8_int_problem(m) is None
    x = torch.randn(*shape) * 3
    real = onednn_w8a8(m)
    with torch.no_grad():
        ref, y = m(x), real(x)
        # float64: the simulated layer's quantized input and decoded weight, summed exactly
        x_hat = m.quantized_input(x).double()
        w = m.quantized_weight().double()
        b = m.bias.double()
        exact = (nn.functional.linear(x_hat, w, b) if kind == "linear"
                 else nn.functional.conv2d(x_hat, w, b, m.stride, m.padding))
    assert y.dtype == torch.float32 and y.shape == ref.shape
    torch.testing.assert_close(y.double(), exact, rtol=0, atol=2e-5 * float(exact.abs().max()))
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-5 * float(ref.abs().max()))


@exact_kernels
def test_timestep_groups_switch_the_scale():
    m = packed(nn.Linear(64, 32), "int8_sym", "int8", groups=2)
    real = onednn_w8a8(m)
    x = torch.randn(4, 64)
    for t in (900.0, 100.0):
        m.act_quant.tctx.t = t
        with torch.no_grad():
            torch.testing.assert_close(real(x), m(x), rtol=0, atol=1e-5)
    assert real.parts[0].qparams[0] != real.parts[0].qparams[1]


@pytest.mark.parametrize("case,reason", [
    (lambda: packed(nn.Linear(64, 32), "int4", "int8"), "8-bit INT weights"),
    (lambda: packed(nn.Linear(64, 32), "int8", "int8", act_shape=(64,)), "per-channel activation"),
    (lambda: packed(nn.Linear(64, 32), "int8", "int8", group_size=32), "group-wise"),
    (lambda: packed(nn.Linear(64, 32), "int8", "int4"), "8-bit INT activations"),
])
def test_ineligible_layers_stay_simulated_with_the_reason(case, reason):
    m = case()
    pipe = Holder(a=m)
    plan = use_real_kernels(pipe, device="cpu")
    assert plan["net/a"]["compute"] == "simulated" and reason in plan["net/a"]["reason"], plan
    assert pipe.net["a"] is m


def test_saturating_cpu_keeps_layers_simulated(monkeypatch):
    """Where oneDNN's int8 kernels would saturate, an eligible W8A8 layer stays simulated and the
    plan says why; where they are exact, the same layer runs the real kernel."""
    from diffsqueeze.quant.export.kernels import onednn_w8a8

    for exact, compute in ((False, "simulated"), (True, "real")):
        monkeypatch.setattr(onednn_w8a8, "onednn_int8_exact", lambda exact=exact: exact)
        plan = kernel_plan(Holder(a=packed(nn.Linear(64, 32), "int8", "int8")), device="cpu")["net/a"]
        assert plan["compute"] == compute, plan
        assert exact or "saturate 16-bit pair sums" in plan["reason"]


@exact_kernels
def test_plan_swap_and_decode_once():
    lin, conv = packed(nn.Linear(64, 32), "int8", "int8"), packed(nn.Linear(64, 32), "int4", "int8")
    pipe = Holder(a=lin, b=conv)
    assert kernel_plan(pipe, device="cpu")["net/a"]["compute"] == "real"
    use_real_kernels(pipe, device="cpu")
    assert isinstance(pipe.net["a"], OneDNNW8A8)
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = pipe.net["b"](x)
    assert decode_weights_once(pipe) == 1
    assert "decoded once" in kernel_plan(pipe, device="cpu")["net/b"]["kernel"]
    with torch.no_grad():
        assert torch.equal(pipe.net["b"](x), before)


@exact_kernels
def test_fashion_w8a8_real_kernels_against_simulated(tmp_path):
    """A W8A8 INT run of builtin:fashion (short calibration, two timestep groups), loaded with
    real kernels: the images against the same model simulated, same prompts and seeds.

    The kernels are exact per layer (above); over a 10-step trajectory, float-order differences
    of ~1e-6 flip single activation codes at rounding boundaries and the flips grow, so the images
    agree to ~35 dB, not bit for bit (docs/BENCHMARKS.md, bench_speed). 30 dB guards against a
    real error (a wrong scale or zero point costs > 10 dB)."""
    pytest.importorskip("diffsqueeze.models.fashion")
    import diffsqueeze
    from diffsqueeze.metrics.fidelity import per_image_fidelity
    from diffsqueeze.metrics.grid import generate_images
    from diffsqueeze.models.prompts import load_prompts
    from diffsqueeze.run.runner import run_recipe
    from diffsqueeze.recipe import recipe_from_dict

    recipe = {"model": "builtin:fashion", "output_dir": str(tmp_path / "run"),
              "calibration": {"prompts": "builtin:fashion", "num_samples": 4, "timesteps": 2, "num_inference_steps": 10,
                              "guidance_scale": 2.0, "batch_size": 4},
              "stages": [{"ptq": {"weights": {"bits": 8, "format": "int"},
                                  "activations": {"bits": 8, "format": "int", "timestep_groups": 2}}}],
              "export": {"kernels": "real"},
              "eval": {"prompts": "builtin:fashion", "seeds": [0], "grid_prompts": 2, "num_images": 0}}
    run = run_recipe(recipe_from_dict(recipe))
    metrics = json.loads((run / "metrics.json").read_text())
    assert "kernels=real" in metrics["compute"] and metrics["fidelity"]["psnr"] > 20
    prompts = load_prompts("builtin:fashion")[:4]
    seeds = [0, 1, 2, 3]
    sim = diffsqueeze.load(str(run))
    real = diffsqueeze.load(str(run), kernels="real")
    plan = kernel_plan(real, device="cpu")
    assert sum(v["compute"] == "real" for v in plan.values()) > 0.8 * len(plan)
    a = generate_images(sim, prompts, seeds, 10, 2.0)
    b = generate_images(real, prompts, seeds, 10, 2.0)
    assert float(per_image_fidelity(b, a)["psnr"].mean()) >= 30.0
