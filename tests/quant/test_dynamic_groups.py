"""Dynamic per-token-group activation quantization (SVDQuant's activations, docs/methods.md §10): the
grids against a float64 element-by-element reference, the quantizer module (INT groups and the
block formats), the recipe checks, and a run that exports and reloads pixel for pixel."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.nn.quantizers import ActQuantizer
from diffsqueeze.quant.primitives.block_formats import NVFP4, block_fake_quantize
from diffsqueeze.quant.primitives.dynamic_groups import dynamic_group_fake_quantize
from diffsqueeze.quant.primitives.formats import parse_format
from diffsqueeze.quant.ptq.config import ActQuantConfig
from tests.helpers import reload_and_check_pixels, run_tiny_ptq


def reference_group(values: list[float], fmt) -> list[float]:
    """One group quantized in float64 arithmetic, written out element by element."""
    if fmt.kind == "int":
        if fmt.symmetric:
            qmax = 2 ** (fmt.bits - 1) - 1
            s = max(abs(v) for v in values) / qmax or 1.0
            return [max(-qmax - 1, min(qmax, round(v / s))) * s for v in values]
        lo, hi = min(min(values), 0.0), max(max(values), 0.0)
        s = (hi - lo) / (2 ** fmt.bits - 1) or 1.0
        z = -round(lo / s)
        return [(max(0, min(2 ** fmt.bits - 1, round(v / s) + z)) - z) * s for v in values]
    grid = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # E2M1 magnitudes, code i = grid[i]
    top = max(grid)
    s = max(abs(v) for v in values) / top or 1.0
    out = []
    for v in values:
        a = abs(v) / s
        best = min(grid, key=lambda g: (abs(g - a), (grid.index(g) % 2)))  # ties to the even code
        out.append(math.copysign(best, v) * s)
    return out


@pytest.mark.parametrize("fmt_name", ["int4_sym", "int4", "int8", "fp4_e2m1_hw"])
@pytest.mark.parametrize("layout", ["linear", "conv"])
def test_grid_equals_the_float64_reference(fmt_name, layout):
    torch.manual_seed(0)
    fmt = parse_format(fmt_name)
    c, gs = 40, 16  # 40 channels: groups of 16, 16 and a shorter last one of 8
    x = torch.randn(2, 3, c, dtype=torch.float64) * torch.linspace(0.1, 5.0, c, dtype=torch.float64)
    x[0, 1, 16:32] = 0.0  # an all-zero group stays exactly zero
    if layout == "conv":
        got = dynamic_group_fake_quantize(x.permute(0, 2, 1).reshape(2, c, 3, 1), fmt, gs, dim=1)
        got = got.reshape(2, c, 3).permute(0, 2, 1)
    else:
        got = dynamic_group_fake_quantize(x, fmt, gs, dim=-1)
    ref = torch.empty_like(x)
    for b in range(2):
        for t in range(3):
            for start in range(0, c, gs):
                vals = x[b, t, start:start + gs].tolist()
                ref[b, t, start:start + gs] = torch.tensor(reference_group(vals, fmt), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert torch.equal(got[0, 1, 16:32], torch.zeros(16, dtype=torch.float64))


def test_one_outlier_channel_costs_only_its_own_group():
    torch.manual_seed(1)
    x = torch.randn(64, 128)
    x[:, 5] *= 100.0
    fmt = parse_format("int4_sym")
    per_token = dynamic_group_fake_quantize(x, fmt, 128)
    grouped = dynamic_group_fake_quantize(x, fmt, 32)
    rest = slice(32, None)
    assert (grouped - x)[:, rest].pow(2).mean() < 0.05 * (per_token - x)[:, rest].pow(2).mean()


def test_quantizer_module_int_groups_block_formats_and_straight_through_gradient():
    torch.manual_seed(2)
    x = torch.randn(2, 48, 4, 4, requires_grad=True)
    q = ActQuantizer("int4_sym", dynamic_group=16, channel_dim=1)
    y = q(x)
    torch.testing.assert_close(y, dynamic_group_fake_quantize(x.detach(), q.fmt, 16, dim=1), rtol=0, atol=0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through, nothing clipped
    nv = ActQuantizer("nvfp4", channel_dim=-1)
    assert nv.dynamic_group == 16 and nv.format_name == "nvfp4"
    t = torch.randn(3, 40)  # 40 = 2.5 blocks: zero-padded to 48, then cut back
    padded = torch.nn.functional.pad(t, (0, 8))
    torch.testing.assert_close(nv(t), block_fake_quantize(padded, NVFP4)[:, :40], rtol=0, atol=0)
    with pytest.raises(ValueError, match="timestep groups"):
        ActQuantizer("int4", groups=2, n_timesteps=2, dynamic_group=16)


@pytest.mark.parametrize("bad,key", [
    ({"granularity": "group", "timestep_groups": 2}, "timestep_groups"),
    ({"granularity": "group", "lsq_iters": 5}, "lsq_iters"),
    ({"granularity": "group", "format": "fp"}, "format"),
    ({"granularity": "group", "group_size": 0}, "group_size"),
    ({"format": "nvfp4", "bits": 4}, "granularity"),
    ({"format": "mxfp8", "bits": 4, "granularity": "group"}, "bits"),
])
def test_config_errors_name_the_key(bad, key):
    with pytest.raises(RecipeError) as err:
        ActQuantConfig(**{"bits": 4, "format": "int", **bad})
    assert key in str(err.value)


def test_config_accepts_groups_and_block_formats():
    assert ActQuantConfig(bits=4, granularity="group").dynamic_group == 64
    assert ActQuantConfig(bits=4, format="mxfp4", granularity="group").spec == ("block", 4, "mxfp4")
    assert ActQuantConfig(bits=4).dynamic_group == 0


def test_run_with_dynamic_groups_exports_and_reloads_pixel_identical(tmp_path):
    run = run_tiny_ptq(tmp_path, {"weights": {"bits": 4, "format": "int"},
                                  "activations": {"bits": 4, "format": "int", "granularity": "group", "group_size": 16},
                                  "rounding": {"method": "adaround", "iters": 2, "batch_size": 2}})
    layers = json.loads((run / "manifest.json").read_text())["stages"][0]["summary"]["layers"]
    assert {a for v in layers.values() for a in v["activations"]} == {"int4", "int8"}  # first/last at 8 bits
    pipe = reload_and_check_pixels(run)
    dyn = [m for m in pipe.unet.modules() if isinstance(m, ActQuantizer) and m.dynamic_group]
    assert dyn and all(m.dynamic_group == 16 for m in dyn)
