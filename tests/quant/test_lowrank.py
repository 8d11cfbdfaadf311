"""The 16-bit low-rank branch of the ptq stage (SVDQuant, docs/methods.md §10): the split of a weight into
``up @ down`` plus a quantized residual, its config, and a run that exports, counts the branch's
bytes and reloads pixel for pixel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.primitives.formats import int_qparams
from diffsqueeze.quant.ptq.config import LowRankConfig
from tests.helpers import reload_and_check_pixels, run_tiny_ptq


@pytest.mark.parametrize("layer,x", [(nn.Linear(64, 48), torch.randn(3, 64)),
                                     (nn.Conv2d(16, 24, 3, padding=1, stride=2), torch.randn(2, 16, 9, 9))])
def test_branch_plus_residual_is_the_float_layer(layer, x):
    w = layer.weight.detach().clone().double()
    ref = layer(x).detach()
    q = make_quant_module(layer, {"weight_format": "int4", "lowrank": 4})
    q.init_lowrank()
    up, down = q.lowrank_up.detach(), q.lowrank_down.detach()
    assert torch.equal(up, up.half().float()) and torch.equal(down, down.half().float())  # float16 values
    rebuilt = (up.double() @ down.double()).reshape(w.shape) + q.weight.detach().double()
    assert (rebuilt - w).abs().max() < 1e-6
    # the top singular directions: the residual's largest singular value is the original's 5th
    s = torch.linalg.svdvals(w.reshape(w.shape[0], -1))
    s_res = torch.linalg.svdvals(q.weight.detach().double().reshape(w.shape[0], -1))
    assert abs(float(s_res[0]) - float(s[4])) < 1e-2 * float(s[0])
    q.quant_weights = False
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref, rtol=0, atol=2e-6)


def test_branch_absorbs_outliers_so_the_residual_quantizes_better():
    torch.manual_seed(0)
    out, inn = 64, 128
    outlier = 20 * torch.outer(torch.randn(out), torch.zeros(inn).index_fill_(0, torch.tensor([3, 77]), 1.0))
    w = (torch.randn(out, inn) * 0.05 + outlier).double()

    def rtn4(t):
        s, z = int_qparams(t.amin(1, keepdim=True), t.amax(1, keepdim=True), 4, False)
        return (torch.clamp(torch.round(t / s) + z, 0, 15) - z) * s

    plain = (rtn4(w) - w).pow(2).mean()
    q = make_quant_module(nn.Linear(inn, out, bias=False), {"weight_format": "int4", "lowrank": 2})
    q.weight.data.copy_(w.float())
    q.init_lowrank()
    branch = (q.lowrank_up.double() @ q.lowrank_down.double())
    with_branch = (branch + rtn4(q.weight.detach().double()) - w).pow(2).mean()
    assert with_branch < 0.05 * plain


def test_config():
    assert LowRankConfig().rank_for(64, 576) == 0
    assert LowRankConfig(rank=8).rank_for(64, 576) == 8 and LowRankConfig(rank=99).rank_for(64, 32) == 31
    assert LowRankConfig(fraction=0.05).rank_for(96, 864) == 5 and LowRankConfig(fraction=0.01).rank_for(32, 288) == 1
    for bad in ({"rank": -1}, {"fraction": 1.0}, {"rank": 2, "fraction": 0.1}):
        with pytest.raises(RecipeError):
            LowRankConfig(**bad)


def test_run_exports_the_branch_in_float16_and_reloads_pixel_identical(tmp_path):
    run = run_tiny_ptq(tmp_path, {"weights": {"bits": 4, "format": "int"}, "activations": {"bits": 8, "format": "int"},
                                  "rounding": {"method": "adaround", "iters": 2, "batch_size": 2},
                                  "lowrank": {"rank": 2}})
    summary = json.loads((run / "manifest.json").read_text())["stages"][0]["summary"]
    assert summary["lowrank"]["layers"] > 0
    qmap = json.loads((run / "model" / "diffsqueeze.json").read_text())["quantization"]
    layers = qmap["components"]["unet"]["layers"]
    name, entry = next((n, e) for n, e in layers.items() if e.get("lowrank"))
    out, row = entry["weight_shape"][0], int(np.prod(entry["weight_shape"][1:]))
    assert entry["packed_bytes"] >= 2 * 2 * (out + row)  # the float16 branch is counted
    with safe_open(str(run / "model" / qmap["components"]["unet"]["file"]), "pt") as f:
        assert f.get_tensor(f"{name}.lowrank_up").dtype == torch.float16
    reload_and_check_pixels(run)


def test_quest_trains_the_branch_and_leaves_float16_values():
    from diffsqueeze.quant.quest.training import branch_params, grid_weights

    torch.manual_seed(3)
    q = make_quant_module(nn.Linear(32, 16), {"weight_format": "int4", "lowrank": 2})
    q.init_lowrank()
    before = [p.detach().clone() for p in branch_params({"l": q})]
    x, target = torch.randn(64, 32), torch.randn(64, 16)
    with grid_weights({"l": q}, rounding=False):
        params = [q.weight, *branch_params({"l": q})]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-2)
        for _ in range(5):
            opt.zero_grad()
            (q(x) - target).pow(2).mean().backward()
            opt.step()
    after = branch_params({"l": q})
    assert all(not torch.equal(a.detach(), b) for a, b in zip(after, before))
    assert all(torch.equal(a.detach(), a.detach().half().float()) for a in after)
