"""The ``ptq`` stage end to end on both builtin architectures (SD UNet, SD3 transformer):
calibration, RTN and learned rounding, timestep-aware activations, first/last layers at 8 bits,
shortcut splitting, softmax quantization, masks kept, reload gives identical images."""

from __future__ import annotations

import json

import pytest
import torch

from diffsqueeze.errors import RecipeError
from diffsqueeze.loading import load_pipeline
from diffsqueeze.models import save_pipeline
from diffsqueeze.pipelines.calibration import CalibrationError
from tests.helpers import generate, make_ctx, quant_layers
from diffsqueeze.prune.stage import PruneStage
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.ptq.stage import PTQStage


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One run directory per module: the calibration recording is made once and reused."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def sd_run(shared):
    """tiny-sd: prune 50% then W4A4 INT RTN (per-channel activations), 2 timestep groups, softmax 8 bits."""
    tmp = shared
    stages = [{"prune": {"targets": {"unet": 0.5}}},
              {"ptq": {"weights": {"bits": 4, "format": "int"},
                       "activations": {"bits": 4, "format": "int", "granularity": "channel",
                                       "timestep_groups": 2, "search_values": 8192},
                       "softmax_bits": 8}}]
    recipe, ctx = make_ctx("builtin:tiny-sd", tmp, stages)
    pipe = load_pipeline("builtin:tiny-sd")
    PruneStage(recipe.stages[0].config).apply(pipe, ctx)
    stage = PTQStage(recipe.stages[1].config)
    stage.check(pipe)
    summary = stage.apply(pipe, ctx)
    return pipe, ctx, summary, tmp


def test_sd_layers_swapped_and_recorded(sd_run):
    pipe, ctx, summary, _ = sd_run
    layers = quant_layers(pipe.unet)
    assert len(layers) == summary["quantized_layers"] == 83
    for name in layers:
        rec = ctx.state.modules[f"unet/{name}"]
        assert rec["kind"] in ("QuantLinear", "QuantConv2d")
    json.dumps(ctx.state.modules)  # JSON-able records
    assert summary["softmax_quantized_attention_modules"] > 0
    assert summary["calibration"]["steps"] == [0, 1]


def test_sd_first_and_last_conv_activations_at_8_bits_and_splits(sd_run):
    pipe, _, summary, _ = sd_run
    layers = summary["layers"]
    assert layers["conv_in"]["activations"] == ["int8"] and "first/last" in " ".join(layers["conv_in"]["notes"])
    assert layers["conv_out"]["activations"] == ["int8"]
    assert layers["conv_in"]["weights"] == ["int4"]
    split = {n: v["split"] for n, v in layers.items() if "split" in v}
    # up-block resnets take cat([deep, skip]): their conv1 and conv_shortcut are split
    assert split and all(n.startswith("up_blocks.") for n in split)
    assert any(n.endswith("conv_shortcut") for n in split) and any(n.endswith("conv1") for n in split)
    name, at = next(iter(split.items()))
    m = pipe.unet.get_submodule(name)
    assert m.act_quant.param_shape == (1, at, 1, 1)
    assert m.act_quant_2.param_shape == (1, m.in_channels - at, 1, 1)
    assert m.weight_quant.weight_shape[1] == at


def test_sd_timestep_groups_have_their_own_scales(sd_run):
    pipe, _, _, _ = sd_run
    q = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1").act_quant
    assert q.groups == 2 and q.scale.shape[0] == 2
    assert not torch.equal(q.scale[0], q.scale[1])
    assert q.group_of.tolist() == [0, 1]


def test_pruned_weights_stay_zero_through_quantization(sd_run):
    pipe, ctx, _, _ = sd_run
    assert ctx.state.masks
    n_checked = 0
    for key, mask in ctx.state.masks.items():
        name = key.split("/", 1)[1].rsplit(".", 1)[0]
        m = pipe.unet.get_submodule(name)
        assert isinstance(m, QuantMixin)
        with torch.no_grad():
            wq = m.quantized_weight()
        assert torch.all(wq[~mask] == 0) and torch.all(m.weight[~mask] == 0)
        n_checked += 1
    assert n_checked > 10


def test_sd_reload_gives_identical_images(sd_run):
    pipe, ctx, _, tmp = sd_run
    before = generate(pipe)
    save_pipeline(pipe, tmp / "model", ctx.state)
    again = load_pipeline(str(tmp / "model"))
    assert len(quant_layers(again.unet)) == 83
    # no prepare_pipeline: the reload attaches timestep routing itself (the artifact format's after_placement)
    assert torch.equal(generate(again), before)
    ref = generate(load_pipeline("builtin:tiny-sd"))
    assert not torch.equal(ref, before)  # quantization did change the model


def test_sd_bad_settings_fail_before_work(tmp_path, tiny_sd):  # fresh dir: nothing recorded
    recipe, ctx = make_ctx("builtin:tiny-sd", tmp_path, [{"ptq": {"activations": {"timestep_groups": 3}}}])
    with pytest.raises(RecipeError, match="timestep_groups.*calibration.timesteps"):
        PTQStage(recipe.stages[0].config).apply(tiny_sd, ctx)
    assert not (tmp_path / "run" / "calibration").exists()
    recipe, _ = make_ctx("builtin:tiny-sd", tmp_path, [{"ptq": {"include": ["nothing.*"]}}])
    with pytest.raises(RecipeError, match="include"):
        PTQStage(recipe.stages[0].config).check(tiny_sd)
    recipe, _ = make_ctx("builtin:tiny-sd", tmp_path, [{"ptq": {"component": "transformer"}}])
    with pytest.raises(RecipeError, match="component"):
        PTQStage(recipe.stages[0].config).check(tiny_sd)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.ptq\.weights\.format: format 'fp8_e4m3' has 8 bits"):
        make_ctx("builtin:tiny-sd", tmp_path, [{"ptq": {"weights": {"bits": 4, "format": "fp8_e4m3"}}}])


def test_inf_weight_names_the_layer(shared):
    recipe, ctx = make_ctx("builtin:tiny-sd", shared, [{"ptq": {"weights": {"bits": 8}, "activations": None,
                                                                      "include": ["conv_out", "conv_in"]}}])
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="weight of layer 'conv_out'.*NaN"):
        PTQStage(recipe.stages[0].config).apply(pipe, ctx)


def test_inf_activation_names_layer_and_timestep(shared):
    recipe, ctx = make_ctx("builtin:tiny-sd", shared, [{"ptq": {"weights": {"bits": 8}}}])
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_in.bias[0] = float("inf")  # the student diverges, the FP teacher does not
    with pytest.raises(CalibrationError, match=r"NaN/Inf in the input of layer '[\w.]+' at timestep \d+"):
        PTQStage(recipe.stages[0].config).apply(pipe, ctx)


def test_output_search_needs_inputs_that_span_the_layer():
    """Rank-deficient calibration inputs (time embeddings, a few prompts) fall back to the weight error."""
    from diffsqueeze.quant.ptq.tracing import PTQLayerPlan, spans_inputs

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    plan = PTQLayerPlan("lin", "fp8_e4m3", None, None, None)
    few = torch.randn(3, 16).repeat(4, 1)  # 12 rows, 3 distinct vectors
    assert not spans_inputs(lin, few, plan)
    assert "span 3 of 16" in plan.notes[0]
    assert spans_inputs(lin, torch.randn(64, 16), PTQLayerPlan("lin", "fp8_e4m3", None, None, None))
    assert not spans_inputs(lin, torch.randn(10, 16), PTQLayerPlan("lin", "fp8_e4m3", None, None, None))
    one_by_one = torch.nn.Conv2d(4, 4, 1)
    assert spans_inputs(one_by_one, torch.randn(2, 4, 5, 5), PTQLayerPlan("c", None, None, None, None))
    flat = torch.randn(2, 4, 1, 1).expand(2, 4, 5, 5)  # the same vector at every position
    assert not spans_inputs(one_by_one, flat, PTQLayerPlan("c", None, None, None, None))
    three = torch.nn.Conv2d(4, 4, 3)
    assert spans_inputs(three, flat, PTQLayerPlan("c", None, None, None, None))  # k x k: patches, kept
