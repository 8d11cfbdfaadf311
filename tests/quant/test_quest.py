"""The ``quest`` stage (docs/methods.md §6) on tiny-sd: time-embedding layers found by measurement,
straight-through training on the grid, re-quantization, masks, hooks and flags restored,
the error against the FP teacher goes down; config validation."""

from __future__ import annotations

import pytest
import torch

from diffsqueeze.errors import RecipeError
from diffsqueeze.loading import load_pipeline
from diffsqueeze.models import save_pipeline
from diffsqueeze.prune.stage import PruneStage
from diffsqueeze.quant.nn.layers import QuantMixin, make_quant_module
from diffsqueeze.quant.nn.routing import prepare_pipeline
from diffsqueeze.quant.ptq.stage import PTQStage
from diffsqueeze.quant.quest.stage import QuestStage
from diffsqueeze.quant.quest.time_layers import detect_time_layers
from diffsqueeze.quant.quest.training import grid_weights as _grid_weights
from diffsqueeze.recipe import recipe_from_dict
from tests.helpers import make_ctx

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}
# a few layer kinds keep the PTQ part of the fixture quick; QuEST only needs its layers quantized
PTQ = {"weights": {"bits": 4, "search_steps": 10},
       "activations": {"bits": 4, "granularity": "channel", "timestep_groups": 2, "search_values": 4096},
       "include": ["*time_emb_proj", "*ff.net.*", "*attn1.to_q", "conv_out"]}
QUEST = {"stage1": {"epochs": 1, "samples": 1, "batch_size": 1, "lr": 1e-2, "act_lr": 1e-3},
         "stage2": {"epochs": 2, "samples": 2, "batch_size": 2, "lr": 1e-2, "act_lr": 1e-3},
         "gradient_checkpointing": True}


def sd_kwargs(unet, t: float = 500.0):
    g = torch.Generator().manual_seed(0)
    c = unet.config
    return {"sample": torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g),
            "timestep": torch.tensor([t]),
            "encoder_hidden_states": torch.randn(1, 8, c.cross_attention_dim, generator=g)}


def test_time_layers_found_by_measurement_on_unet(tiny_sd):
    names = detect_time_layers(tiny_sd.unet, sd_kwargs(tiny_sd.unet), 50.0)
    expected = [n for n, _ in tiny_sd.unet.named_modules() if n.endswith("time_emb_proj")]
    assert sorted(names) == sorted(expected) and len(names) == 8  # not time_embedding.linear_1/2


def test_grid_weights_straight_through_and_requantized():
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[0, :4] = 0.0  # "pruned"
    q = make_quant_module(lin, {"weight_format": "int4", "group_size": 0, "act": None, "split": 0})
    q.weight_quant.set_params(scale=q.weight.detach().abs().amax(1, keepdim=True) / 7,
                              zero_point=torch.full((8, 1, 1), 8.0))
    on_grid = q.weight_quant(q.weight).detach()
    q.weight.requires_grad_(True)
    with _grid_weights({"l": q}, rounding=True) as alphas:
        assert len(alphas) == 1
        w = q.quantized_weight()
        assert torch.equal(w, on_grid)  # the forward is the quantized one, exactly
        w.pow(2).sum().backward()
        assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0  # straight-through
        assert alphas[0].grad is not None
        with torch.no_grad():
            q.weight.add_(0.3 * torch.randn_like(q.weight))
            q.weight[0, :4] = 0.0
    assert q.weight_quant.alpha is None and isinstance(q.weight_quant, type(q.weight_quant))
    assert torch.equal(q.weight_quant.quantize_rtn(q.weight), q.weight)  # back on the grid
    assert torch.all(q.weight[0, :4] == 0)


def test_config_validation_names_the_key():
    base = {"model": "builtin:tiny-sd", "output_dir": "x"}
    with pytest.raises(RecipeError, match=r"stages\[0\]\.quest\.stage2\.batch_size"):
        recipe_from_dict({**base, "stages": [{"quest": {"stage2": {"batch_size": 0}}}]})
    with pytest.raises(RecipeError, match=r"stages\[0\]\.quest\.time_layers"):
        recipe_from_dict({**base, "stages": [{"quest": {"time_layers": ["auto", "*x"]}}]})
    with pytest.raises(RecipeError, match=r"sensitive_layers\.select"):
        recipe_from_dict({**base, "stages": [{"quest": {"sensitive_layers": {"select": "best"}}}]})


def test_check_rejects_patterns_that_match_nothing(tiny_sd):
    recipe = recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": "x",
                               "stages": [{"quest": {"sensitive_layers": {"patterns": ["nothing*"]}}}]})
    with pytest.raises(RecipeError, match="sensitive_layers.patterns"):
        QuestStage(recipe.stages[0].config).check(tiny_sd)
    recipe = recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": "x",
                               "stages": [{"quest": {"time_layers": ["nothing*"]}}]})
    with pytest.raises(RecipeError, match="time_layers"):
        QuestStage(recipe.stages[0].config).check(tiny_sd)


def test_quest_needs_quantized_layers(tmp_path):
    recipe, ctx = make_ctx("builtin:tiny-sd", tmp_path, [{"quest": QUEST}], CALIB)
    with pytest.raises(RecipeError, match="ptq stage before quest"):
        QuestStage(recipe.stages[0].config).apply(load_pipeline("builtin:tiny-sd"), ctx)


@pytest.fixture(scope="module")
def quest_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quest")
    stages = [{"prune": {"targets": {"unet": 0.3}}}, {"ptq": PTQ}, {"quest": QUEST}]
    recipe, ctx = make_ctx("builtin:tiny-sd", tmp, stages, CALIB)
    pipe = load_pipeline("builtin:tiny-sd")
    PruneStage(recipe.stages[0].config).apply(pipe, ctx)
    PTQStage(recipe.stages[1].config).apply(pipe, ctx)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    flags = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    stage = QuestStage(recipe.stages[2].config)
    stage.check(pipe)
    summary = stage.apply(pipe, ctx)
    return pipe, ctx, summary, before, flags, tmp


def test_quest_trains_the_selected_layers_only(quest_run):
    pipe, _, summary, before, _, _ = quest_run
    assert len(summary["time_layers"]) == 8
    assert summary["sensitive_layers"] and all(".ff.net." in n for n in summary["sensitive_layers"])
    trained = set(summary["time_layers"]) | set(summary["sensitive_layers"])
    for name, p in pipe.unet.named_parameters():
        layer = name.rsplit(".", 1)[0]
        if ".act_quant" in name:
            continue  # activation scales train in stage 2 (all of them)
        if layer in trained and name.endswith(".weight"):
            assert not torch.equal(p, before[name]), name
        elif layer not in trained:
            assert torch.equal(p, before[name]), name


def test_quest_weights_on_grid_and_masks_kept(quest_run):
    pipe, ctx, summary, _, _, _ = quest_run
    for name in summary["time_layers"] + summary["sensitive_layers"]:
        m = pipe.unet.get_submodule(name)
        assert isinstance(m, QuantMixin)
        assert torch.equal(m.quantized_weight(), m.weight), name  # stored weight is on the grid
    n = 0
    for key, mask in ctx.state.masks.items():
        layer = key.split("/", 1)[1].rsplit(".", 1)[0]
        if layer in summary["time_layers"] + summary["sensitive_layers"]:
            assert torch.all(pipe.unet.get_submodule(layer).weight[~mask] == 0)
            n += 1
    assert n > 0


def test_quest_restores_hooks_flags_and_lowers_error(quest_run):
    pipe, _, summary, _, flags, _ = quest_run
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags
    for m in pipe.unet.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks or m is pipe.unet
        if hasattr(m, "lsq"):
            assert m.lsq is False
    assert not pipe.unet.is_gradient_checkpointing
    assert summary["denoiser_mse_after"] < summary["denoiser_mse_before"]
    assert summary["stage2"]["epoch_times_s"] and summary["stage1"]["s_per_epoch"] > 0


def test_quest_result_reloads_identically(quest_run):
    pipe, ctx, _, _, _, tmp = quest_run
    kw = sd_kwargs(pipe.unet, 700.0)
    with torch.no_grad():
        a = pipe.unet(**kw).sample
    save_pipeline(pipe, tmp / "model", ctx.state)
    again = prepare_pipeline(load_pipeline(str(tmp / "model")))
    with torch.no_grad():
        b = again.unet(**kw).sample
    assert torch.equal(a, b)


def test_only_the_current_timestep_group_scales_move():
    from diffsqueeze.quant.nn.quantizers import ActQuantizer
    from diffsqueeze.quant.nn.routing import TimestepContext
    from diffsqueeze.quant.quest.training import GroupScales as _GroupScales

    q = ActQuantizer("int4", (1,), groups=2, n_timesteps=2)
    q.set_routing([900.0, 100.0], [0, 1])
    q.tctx = TimestepContext()
    q.lsq = True
    scales = _GroupScales([q])
    opt = torch.optim.Adam(scales.params, lr=0.1)
    start = q.scale.detach().clone()
    for t in (900.0, 100.0, 100.0):  # group 0 once (momentum), then group 1
        q.tctx.t = t
        loss = (q(torch.linspace(-3, 3, 64)) - torch.linspace(-3, 3, 64)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        snap = scales.snapshot()
        opt.step()
        scales.restore_others(snap)
        if t == 900.0:
            after_g0 = q.scale.detach().clone()
    assert not torch.equal(after_g0[0], start[0]) and torch.equal(after_g0[1], start[1])
    assert torch.equal(q.scale[0], after_g0[0])  # Adam momentum did not move group 0 later
    assert not torch.equal(q.scale[1], start[1])
