"""Quantizer modules against float64 references: weights (INT/FP, channel/group, AdaRound),
activations (INT/FP, per tensor/channel, timestep groups, LSQ), softmax quantization."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.nn.attention import explicit_sdpa, quantize_probs
from diffsqueeze.quant.nn.layers import QuantConv2d, QuantLinear, make_quant_module
from diffsqueeze.quant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.nn.routing import TimestepContext, group_assignment
from diffsqueeze.quant.primitives.formats import (
    E2M1,
    E4M3,
    fp_grid,
    fp_quantize,
    parse_format,
)
from diffsqueeze.quant.primitives.rounding import (
    inverse_rectified_sigmoid,
    rectified_sigmoid,
    rounding_regularizer,
)
from diffsqueeze.quant.ptq.config import (
    ActQuantConfig,
    PTQConfig,
    RoundingConfig,
    WeightQuantConfig,
)
from diffsqueeze.quant.ptq.reconstruct import beta_at


def ref_int(x, scale, zp, bits, symmetric):
    x, scale, zp = x.double(), scale.double(), zp.double()
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return (torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp) * scale


def test_weight_int_per_channel_matches_reference():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    q = WeightQuantizer("int4", tuple(w.shape))
    scale = torch.rand(6, 1, 1) * 0.2 + 0.05
    zp = torch.randint(0, 16, (6, 1, 1)).float()
    q.set_params(scale=scale, zero_point=zp)
    ref = ref_int(w.reshape(6, 1, -1), scale, zp, 4, False).reshape(w.shape)
    torch.testing.assert_close(q(w).double(), ref, rtol=0, atol=1e-6)


def test_weight_int_per_group_shapes_and_reference():
    torch.manual_seed(1)
    w = torch.randn(5, 16)
    q = WeightQuantizer("int3_sym", tuple(w.shape), group_size=4)
    assert q.scale.shape == (5, 4, 1)
    scale = torch.rand(5, 4, 1) * 0.3 + 0.1
    q.set_params(scale=scale, zero_point=torch.zeros(5, 4, 1))
    ref = ref_int(w.reshape(5, 4, 4), scale, torch.zeros(()), 3, True).reshape(5, 16)
    torch.testing.assert_close(q(w).double(), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        WeightQuantizer("int4", (5, 16), group_size=5)


def test_weight_fp_values_on_grid_of_each_channel_bias():
    torch.manual_seed(2)
    w = torch.randn(3, 32)
    q = WeightQuantizer("fp4_e2m1", tuple(w.shape))
    bias = torch.tensor([1.0, 1.7, 2.3]).reshape(3, 1, 1)
    q.set_params(bias=bias)
    out = q(w).double()
    for c in range(3):
        grid = fp_grid(E2M1, float(bias[c]))
        dist = (out[c].reshape(-1, 1) - grid.reshape(1, -1)).abs().min(dim=1).values
        assert float(dist.max()) < 1e-6
        # nearest: no grid value closer than the chosen one (float64 reference)
        err = (w[c].double() - out[c]).abs()
        best = (w[c].double().reshape(-1, 1) - grid.reshape(1, -1)).abs().min(dim=1).values
        assert torch.all(err <= best + 1e-6)


def test_rectified_sigmoid_inverse_and_regularizer():
    r = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(rectified_sigmoid(inverse_rectified_sigmoid(r)), r)
    v = torch.tensor([-100.0, 100.0])  # hard 0 and 1: no penalty
    assert float(rounding_regularizer(v, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(rounding_regularizer(inverse_rectified_sigmoid(torch.tensor([0.5])), 2.0)) == pytest.approx(1.0)


def test_beta_schedule():
    cfg = RoundingConfig(iters=100, warmup=0.2)
    assert beta_at(0, 100, cfg) == (20.0, False)
    assert beta_at(19, 100, cfg) == (20.0, False)
    b, on = beta_at(20, 100, cfg)
    assert on and b == pytest.approx(20.0)
    assert beta_at(100, 100, cfg)[0] == pytest.approx(2.0)


@pytest.mark.parametrize("fmt", ["int4", "int4_sym", "fp4_e2m1", "fp8_e4m3", "fp6_e3m2"])
def test_adaround_soft_init_reproduces_weight_and_hard_is_a_neighbour(fmt):
    torch.manual_seed(3)
    w = torch.randn(4, 24) * 0.5
    w[0, :5] = 0.0  # pruned weights
    q = WeightQuantizer(fmt, tuple(w.shape))
    if (q.fmt.kind == "int"):
        q.set_params(scale=torch.full((4, 1, 1), 0.15), zero_point=torch.full((4, 1, 1), 0.0 if "sym" in fmt else 8.0))
    else:
        q.set_params(bias=torch.full((4, 1, 1), 1.5))
    rtn = q(w)
    q.init_rounding(w)
    soft = q(w)
    if (q.fmt.kind == "int"):  # not clipped
        lo, hi = (-8, 7) if "sym" in fmt else (0, 15)
        z = 0.0 if "sym" in fmt else 8.0
        inside = (w >= (lo - z) * 0.15) & (w <= (hi - z) * 0.15)
    else:
        inside = w.abs() <= float(fp_grid(parse_format(fmt), 1.5).max())
    torch.testing.assert_close(soft[inside], w[inside], rtol=0, atol=1e-5)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 3)
        q.alpha[0, :5] = 50.0  # rounding up would revive the pruned zeros
    hard = q.finalize_rounding(w)
    assert q.alpha is None
    assert torch.all(hard[0, :5] == 0)
    # on the grid: RTN of the hard result is itself; each value is floor or ceil of w on the grid
    torch.testing.assert_close(q(hard), hard, rtol=0, atol=1e-6)
    if (q.fmt.kind == "int"):
        s = 0.15
        ok = ((hard - torch.floor(w / s) * s).abs() < 1e-5) | ((hard - (torch.floor(w / s) + 1) * s).abs() < 1e-5)
        clipped = (rtn - w).abs() > s
        assert torch.all(ok | clipped)
    else:
        grid = fp_grid(parse_format(fmt), 1.5)
        wc = w.double().clamp(float(grid.min()), float(grid.max()))
        lo = grid[torch.searchsorted(grid, wc.reshape(-1), right=True).clamp(max=len(grid)) - 1]
        hi = grid[torch.searchsorted(grid, wc.reshape(-1), right=False).clamp(max=len(grid) - 1)]
        hd = hard.double().reshape(-1)
        assert torch.all(((hd - lo).abs() < 1e-6) | ((hd - hi).abs() < 1e-6) | (hd == 0))


def test_adaround_gradient_reaches_rounding_variables_only():
    w = torch.randn(3, 8)
    q = WeightQuantizer("int4", tuple(w.shape))
    q.set_params(scale=torch.full((3, 1, 1), 0.2), zero_point=torch.full((3, 1, 1), 8.0))
    q.init_rounding(w)
    q(w).sum().backward()
    assert q.alpha.grad is not None and float(q.alpha.grad.abs().sum()) > 0


def test_act_int_per_tensor_and_per_channel_reference():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 5, 5) * 2
    q = ActQuantizer("int8", (1,))
    q.set_params(0, torch.tensor([0.05]), torch.tensor([128.0]))
    torch.testing.assert_close(q(x).double(), ref_int(x, torch.tensor(0.05), torch.tensor(128.0), 8, False),
                               rtol=0, atol=1e-6)
    qc = ActQuantizer("int4", (1, 3, 1, 1))
    s = torch.tensor([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)
    z = torch.tensor([7.0, 8.0, 9.0]).reshape(1, 3, 1, 1)
    qc.set_params(0, s, z)
    torch.testing.assert_close(qc(x).double(), ref_int(x, s, z, 4, False), rtol=0, atol=1e-6)


def test_act_fp_scale_is_real_bias():
    torch.manual_seed(5)
    x = torch.randn(1000)
    q = ActQuantizer("fp8_e4m3", (1,))
    bias = 9.3
    q.set_params(0, torch.tensor([2.0 ** (E4M3.standard_bias - bias)]))
    torch.testing.assert_close(q(x), fp_quantize(x, E4M3, bias), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", ["int4", "fp8_e4m3"])
def test_lsq_forward_equals_plain_and_gradient_formula(fmt):
    torch.manual_seed(6)
    x = torch.randn(64) * 3
    q = ActQuantizer(fmt, (1,))
    q.set_params(0, torch.tensor([0.4]), torch.tensor([8.0]) if (q.fmt.kind == "int") else None)
    plain = q(x).detach()
    q.lsq = True
    y = q(x)
    torch.testing.assert_close(y.detach(), plain, rtol=1e-6, atol=1e-6)
    y.sum().backward()
    s = 0.4
    if (q.fmt.kind == "int"):  # LSQ: d x_hat / d s = round(u) - u inside, clip bound outside; times 1/sqrt(N Qp)
        u = x.double() / s
        lo, hi = -8, 7
        d = torch.where(u < lo, torch.tensor(float(lo), dtype=torch.float64),
                        torch.where(u > hi, torch.tensor(float(hi), dtype=torch.float64), torch.round(u) - u))
        expect = float(d.sum()) / math.sqrt(64 * 15)
        assert float(q.scale.grad) == pytest.approx(expect, rel=1e-4, abs=1e-6)
    else:
        assert torch.isfinite(q.scale.grad).all()


def test_timestep_groups_route_to_nearest_calibration_timestep():
    q = ActQuantizer("int8", (1,), groups=2, n_timesteps=4)
    q.set_routing([901.0, 601.0, 301.0, 1.0], group_assignment(4, 2))
    q.set_params(0, torch.tensor([1.0]), torch.tensor([128.0]))
    q.set_params(1, torch.tensor([0.01]), torch.tensor([128.0]))
    x = torch.tensor([0.3])
    with pytest.raises(RuntimeError, match="without a timestep"):
        q(x)
    q.tctx = TimestepContext()
    for t, group in [(999.0, 0), (640.0, 0), (420.0, 1), (460.0, 0), (0.0, 1)]:
        q.tctx.t = t
        assert q.current_group() == group
    q.tctx.t = 950.0
    assert float(q(x).detach()) == 0.0  # scale 1: rounds to 0
    q.tctx.t = 10.0
    assert float(q(x).detach()) == pytest.approx(0.3)


def test_group_assignment_is_contiguous():
    assert group_assignment(5, 2) == [0, 0, 0, 1, 1]
    assert group_assignment(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        group_assignment(2, 3)


def test_quant_modules_share_parameters_and_round_trip_state_dict():
    lin = torch.nn.Linear(8, 4)
    record = {"weight_format": "int8", "group_size": 0, "act": {"format": "int8", "shape": [1], "groups": 1}}
    q = make_quant_module(lin, record)
    assert isinstance(q, QuantLinear) and isinstance(q, torch.nn.Linear)
    assert q.weight is lin.weight
    q.weight_quant.set_params(scale=torch.full((4, 1, 1), 0.01), zero_point=torch.full((4, 1, 1), 128.0))
    sd = q.state_dict()
    assert {"weight", "bias", "weight_quant.scale", "weight_quant.zero_point", "act_quant.scale"} <= set(sd)
    fresh = make_quant_module(torch.nn.Linear(8, 4), record)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), q(x))
    conv = make_quant_module(torch.nn.Conv2d(6, 4, 3, padding=1), {**record, "split": 2,
                             "act": {"format": "int8", "shape": [1, 6, 1, 1], "groups": 1}})
    assert isinstance(conv, QuantConv2d)
    assert conv.weight_quant.weight_shape == (4, 2, 3, 3) and conv.weight_quant_2.weight_shape == (4, 4, 3, 3)
    assert conv.act_quant.param_shape == (1, 2, 1, 1) and conv.act_quant_2.param_shape == (1, 4, 1, 1)
    assert conv(torch.randn(1, 6, 5, 5)).shape == (1, 4, 5, 5)


def test_softmax_quantization_matches_sdpa_at_16_bits_and_lies_on_grid():
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 4, 10, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(explicit_sdpa(q, k, v, bits=16), ref, rtol=1e-3, atol=1e-3)
    p = torch.rand(100)
    pq = quantize_probs(p, 4)
    assert torch.all((pq * 15 - torch.round(pq * 15)).abs() < 1e-6)
    assert float((pq - p).abs().max()) <= 0.5 / 15 + 1e-7


BAD = [
    (lambda: WeightQuantConfig(bits=4, format="fp5"), ["format", "unknown format 'fp5'"]),
    (lambda: WeightQuantConfig(bits=9, format="int"), ["bits", "out of range"]),
    (lambda: WeightQuantConfig(bits=1, format="int"), ["bits", "out of range"]),
    (lambda: WeightQuantConfig(bits=4, format="fp8_e4m3"), ["format", "8 bits", "bits is 4"]),
    (lambda: WeightQuantConfig(bits=5, format="fp"), ["bits", "no FP format with 5 bits"]),
    (lambda: ActQuantConfig(bits=8, format="int4"), ["format", "4 bits"]),
    (lambda: ActQuantConfig(timestep_groups=0), ["timestep_groups"]),
    (lambda: PTQConfig(softmax_bits=1), ["softmax_bits"]),
    (lambda: RoundingConfig(balance_cap=0.5), ["balance_cap", "must be >= 1"]),
]


@pytest.mark.parametrize("make,words", BAD)
def test_bad_configs_fail_with_the_key(make, words):
    with pytest.raises(RecipeError) as info:
        make()
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("fmt", ["int3", "fp4_e2m1"])
def test_adaround_beats_round_to_nearest_on_layer_output(fmt):
    """Learned rounding (docs/methods.md §4) lowers the output error of a layer below round-to-nearest."""
    import random
    from types import SimpleNamespace

    from diffsqueeze.quant.primitives.search import fp_bias_search, int_scale_search
    from diffsqueeze.quant.ptq.reconstruct import adaround_unit, output_loss

    torch.manual_seed(8)
    lin = torch.nn.Linear(32, 16)
    q = make_quant_module(lin, {"weight_format": fmt})
    g = q.weight_quant.grouped(q.weight.detach())
    if (q.weight_quant.fmt.kind == "int"):
        s, z = int_scale_search(g, 3, False, axis=(0, 1))
        q.weight_quant.set_params(scale=s, zero_point=z)
    else:
        q.weight_quant.set_params(bias=fp_bias_search(g, E2M1, axis=(0, 1)))
    x = torch.randn(256, 32) * torch.linspace(0.2, 3.0, 32)  # uneven input scales: rounding matters
    with torch.no_grad():
        target = F.linear(x, lin.weight, lin.bias)
        rtn = float(output_loss(q(x), target))
    inputs, targets = [((x,), {})], [target]
    cfg = RoundingConfig(iters=300, batch_size=256, lr=1e-2)
    adaround_unit(q, [q], inputs, targets, [SimpleNamespace(timestep=0.0)], TimestepContext(), cfg, random.Random(0), "t")
    with torch.no_grad():
        learned = float(output_loss(q(x), target))
    assert learned < rtn


def test_timestep_weights_balance_relative_error_and_cap():
    """Each timestep counts by its relative error; the weighted reference keeps its mean."""
    from diffsqueeze.quant.ptq.reconstruct import timestep_weights, weighted_mean

    ref = {999.0: 1.0, 499.0: 3.0, 99.0: 8.0}
    w = timestep_weights(ref, cap=100.0)
    mean = 4.0
    assert w == pytest.approx({t: mean / v for t, v in ref.items()})
    assert weighted_mean(ref, w) == pytest.approx(mean)
    # a timestep with (near) zero reference error gets at most cap times the even weight
    w0 = timestep_weights({999.0: 0.0, 99.0: 2.0}, cap=10.0)
    assert w0[999.0] == pytest.approx(10.0) and w0[99.0] == pytest.approx(0.5)
    assert timestep_weights({1.0: 0.0}, cap=10.0) == {1.0: 1.0}


def test_adaround_keeps_round_to_nearest_when_learning_does_not_help(monkeypatch):
    """A unit whose hard learned rounding is worse than RTN on the calibration data keeps RTN."""
    import random
    from types import SimpleNamespace

    import diffsqueeze.quant.ptq.reconstruct as rec

    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 8)
    q = make_quant_module(lin, {"weight_format": "int4"})
    x = torch.randn(64, 16)
    with torch.no_grad():
        target = F.linear(x, lin.weight, lin.bias)
        rtn_weight = q.weight_quant.quantize_rtn(q.weight.detach()).clone()

    def round_everything_up(module, parts, *args, **kwargs):  # a deliberately bad "learned" rounding
        for _, wq, _ in parts:
            wq.alpha.data.fill_(10.0)
        return {}

    monkeypatch.setattr(rec, "_optimize_rounding", round_everything_up)
    cfg = RoundingConfig(iters=1, batch_size=64)
    out = rec.adaround_unit(q, [q], [((x,), {})], [target], [SimpleNamespace(timestep=0.0)], TimestepContext(), cfg,
                        random.Random(0), "t")
    assert out["kept"] == "nearest" and out["learned_loss"] > out["nearest_loss"]
    assert out["per_timestep"]["0"]["learned"] > out["per_timestep"]["0"]["nearest"]
    torch.testing.assert_close(q.weight.detach(), rtn_weight, rtol=0, atol=0)
    assert q.weight_quant.alpha is None
    # with the guard off the bad rounding stays
    q2 = make_quant_module(torch.nn.Linear(16, 8), {"weight_format": "int4"})
    cfg_off = RoundingConfig(iters=1, batch_size=64, keep_better=False)
    out2 = rec.adaround_unit(q2, [q2], [((x,), {})], [target], [SimpleNamespace(timestep=0.0)], TimestepContext(),
                         cfg_off, random.Random(0), "t")
    assert out2["kept"] == "adaround"
