"""Real kernels: bitsandbytes int8/fp4/nf4 for weight-only packed Linear layers (CPU), shapes that
bitsandbytes rejects stay simulated with a reason, float8 storage, GPU paths behind ``gpu``
(W8A8 INT on oneDNN: test_cpu_int8.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffsqueeze.quant.export.kernels.onednn_w8a8 import onednn_int8_available, onednn_int8_exact
from diffsqueeze.quant.export.kernels import layer_plan, is_two_four, use_real_kernels
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.binary_layers import make_binary_module
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.primitives.formats import int_qparams


class Holder(nn.Module):
    """A minimal 'pipeline' exposing one component for module_components()."""

    def __init__(self, **layers):
        super().__init__()
        self.net = nn.ModuleDict(layers)

    @property
    def components(self):
        return {"net": self.net}


def packed_linear(fmt: str, inn: int, out: int, act: dict | None = None):
    torch.manual_seed(0)
    layer = nn.Linear(inn, out)
    q = make_quant_module(layer, {"weight_format": fmt, **({"act": act} if act else {})})
    wq = q.weight_quant
    g = wq.grouped(q.weight.detach())
    if (wq.fmt.kind == "int"):
        s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), wq.fmt.bits, wq.fmt.symmetric)
        wq.set_params(scale=s, zero_point=z)
    else:
        wq.set_params(bias=torch.full_like(wq.bias, float(wq.fmt.standard_bias)))
    for a in q.act_quantizers():
        a.set_params(0, torch.tensor(0.05))
    packed, _ = pack_layer(q)
    return packed


@pytest.mark.parametrize("fmt,kernel", [("int8_sym", "Linear8bitLt"), ("fp4_e2m1", "Linear4bit"), ("int4", "Linear4bit")])
def test_bnb_kernels_on_cpu(fmt, kernel):
    m = packed_linear(fmt, 64, 64)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = m(x)
    pipe = Holder(a=m)
    plan = use_real_kernels(pipe, device="cpu")
    assert plan["net/a"]["compute"] == "real", plan
    assert type(pipe.net["a"]).__name__ == kernel
    with torch.no_grad():
        y = pipe.net["a"](x)
    # bitsandbytes re-quantizes on its own grid: close, not equal
    assert (y - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_bnb_4bit_in_features_32_stays_simulated():
    m = packed_linear("int4", 32, 64)
    pipe = Holder(a=m)
    plan = use_real_kernels(pipe, device="cpu")
    assert plan["net/a"]["compute"] == "simulated" and "in_features=32" in plan["net/a"]["reason"]
    assert pipe.net["a"] is m


def test_fp8_storage_binary_and_acts_are_simulated_with_reasons():
    fp8 = packed_linear("fp8_e4m3_hw", 64, 64)
    assert fp8.qweight0.dtype == torch.float8_e4m3fn
    plan = layer_plan(fp8, torch.device("cpu"), None)
    assert plan["compute"] == "simulated" and "fp8_e4m3_hw" in plan["kernel"]
    w8a8_fp8 = packed_linear("fp8_e4m3_hw", 64, 64, act={"format": "fp8_e4m3_hw", "shape": [1]})
    assert "activations" in layer_plan(w8a8_fp8, torch.device("cpu"), None)["reason"]
    w8a8_int = packed_linear("int8_sym", 64, 64, act={"format": "int8", "shape": [1]})
    int8_plan = layer_plan(w8a8_int, torch.device("cpu"), None)  # oneDNN int8 (test_cpu_int8.py)
    exact = onednn_int8_available() and onednn_int8_exact()
    assert int8_plan["compute"] == ("real" if exact else "simulated"), int8_plan
    b = make_binary_module(nn.Linear(64, 64), {"order": 2})
    b.weight_quant.init_from(b.weight)
    pb, _ = pack_layer(b)
    assert layer_plan(pb, torch.device("cpu"), None)["compute"] == "simulated"


def test_two_four_detection():
    m = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool)
    assert is_two_four(m)
    assert not is_two_four(torch.ones(1, 8, dtype=torch.bool))
    dense = nn.Linear(8, 1)
    plan = layer_plan(dense, torch.device("cpu"), m)
    assert plan["compute"] == "simulated" and "GPU" in plan["reason"]


@pytest.mark.gpu
def test_fp8_scaled_mm_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = packed_linear("fp8_e4m3_hw", 64, 64, act={"format": "fp8_e4m3_hw", "shape": [1]}).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        ref = m(x)
    pipe = Holder(a=m)
    plan = use_real_kernels(pipe, device="cuda")
    if plan["net/a"]["compute"] != "real":
        pytest.skip(f"no FP8 matmul on this GPU: {plan['net/a'].get('reason')}")
    with torch.no_grad():
        y = pipe.net["a"](x)
    torch.testing.assert_close(y, ref, rtol=0.02, atol=0.02)


@pytest.mark.gpu
def test_two_four_sparse_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lin = nn.Linear(128, 128).half().cuda()
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool, device="cuda").repeat(128, 32)
    with torch.no_grad():
        lin.weight.mul_(mask)
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    ref = lin(x)

    class State:
        masks = {"net/a.weight": mask}

    pipe = Holder(a=lin)
    plan = use_real_kernels(pipe, State(), device="cuda")
    assert plan["net/a"]["compute"] == "real", plan
    torch.testing.assert_close(pipe.net["a"](x), ref, rtol=1e-2, atol=1e-2)
