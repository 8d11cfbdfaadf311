"""The ``ptq`` stage on the SD3 transformer builtin (tiny-dit): FP format search per layer,
learned rounding with block-wise reconstruction, LSQ, reload; and through the runner."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from diffsqueeze.loading import load_pipeline
from diffsqueeze.models import save_pipeline
from diffsqueeze.prune.stage import PruneStage
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.nn.routing import prepare_pipeline
from diffsqueeze.quant.primitives.formats import formats_for_bits, fp_quantize
from diffsqueeze.quant.ptq.reconstruct import reconstruction_units
from diffsqueeze.quant.ptq.stage import PTQStage
from tests.helpers import generate, make_ctx, quant_layers


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """tiny-dit: prune 30%, W4 FP (format searched per layer) with AdaRound, A8 FP8 + LSQ, 2 groups."""
    tmp = tmp_path_factory.mktemp("dit")
    stages = [{"prune": {"targets": {"transformer": 0.3}}},
              {"ptq": {"weights": {"bits": 4, "format": "fp", "search_steps": 20},
                       "activations": {"bits": 8, "format": "fp8_e4m3", "timestep_groups": 2, "lsq_iters": 3,
                                       "search_values": 8192},
                       "rounding": {"method": "adaround", "iters": 6, "batch_size": 2},
                       "softmax_bits": 8}}]
    recipe, ctx = make_ctx("builtin:tiny-dit", tmp, stages)
    pipe = load_pipeline("builtin:tiny-dit")
    PruneStage(recipe.stages[0].config).apply(pipe, ctx)
    stage = PTQStage(recipe.stages[1].config)
    stage.check(pipe)
    summary = stage.apply(pipe, ctx)
    return pipe, ctx, summary, tmp


def test_units_are_transformer_blocks_and_lone_layers():
    pipe = load_pipeline("builtin:tiny-dit")
    from diffsqueeze.quant.nn.layers import make_quant_module

    for name, m in list(pipe.transformer.named_modules()):
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            parent, _, child = name.rpartition(".")
            setattr(pipe.transformer.get_submodule(parent) if parent else pipe.transformer, child,
                    make_quant_module(m, {"weight_format": "int8"}))
    units = reconstruction_units(pipe.transformer, ("JointTransformerBlock",))
    assert "transformer_blocks.0" in units and "transformer_blocks.1" in units
    assert "proj_out" in units and not any(u.startswith("transformer_blocks.0.") for u in units)


def test_dit_formats_rounding_and_reconstruction(dit_run):
    pipe, ctx, summary, _ = dit_run
    fp4 = {f.name for f in formats_for_bits(4)}
    layers = summary["layers"]
    assert all(set(v["weights"]) <= fp4 for v in layers.values())
    assert layers["pos_embed.proj"]["activations"] == ["fp8_e4m3"]  # first layer: already 8 bits
    rec = summary["reconstruction"]
    assert rec["units"] >= 3 and "transformer_blocks.0" in rec["losses"]
    assert "adaround" in rec["losses"]["transformer_blocks.0"] and "lsq" in rec["losses"]["transformer_blocks.0"]
    # hard rounding wrote on-grid weights: quantizing them again changes nothing
    for name, m in quant_layers(pipe.transformer).items():
        q = m.weight_quant
        assert q.alpha is None
        g = q.grouped(m.weight.detach())
        torch.testing.assert_close(fp_quantize(g, q.fmt, q.bias).reshape(m.weight.shape), m.weight.detach(),
                                   rtol=0, atol=0)


def test_dit_pruned_weights_stay_zero_through_learned_rounding(dit_run):
    pipe, ctx, _, _ = dit_run
    assert ctx.state.masks
    for key, mask in ctx.state.masks.items():
        m = pipe.transformer.get_submodule(key.split("/", 1)[1].rsplit(".", 1)[0])
        assert isinstance(m, QuantMixin)
        with torch.no_grad():
            assert torch.all(m.quantized_weight()[~mask] == 0)


def test_dit_reload_gives_identical_latents(dit_run):
    pipe, ctx, _, tmp = dit_run
    before = generate(pipe)
    save_pipeline(pipe, tmp / "model", ctx.state)
    again = prepare_pipeline(load_pipeline(str(tmp / "model")))
    assert torch.equal(generate(again), before)
    assert torch.isfinite(before).all()


def test_runner_writes_records_and_run_dir_reloads(tmp_path, write_recipe):
    from diffsqueeze.run.runner import run_recipe
    from diffsqueeze.recipe import load_recipe

    path = write_recipe({"model": "builtin:tiny-dit", "device": "cpu",
                         "calibration": {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1},
                         "stages": [{"ptq": {"weights": {"bits": 8, "format": "int", "search": "output"},
                                             "activations": {"bits": 8, "format": "int", "search_values": 4096}}}]})
    run_dir = run_recipe(load_recipe(path))
    manifest = json.loads((run_dir / "manifest.json").read_text())
    entry = manifest["stages"][0]
    assert entry["status"] == "done" and entry["summary"]["quantized_layers"] == 33
    assert "wall_time_s" in entry and "peak_rss_mb" in entry
    state = json.loads((run_dir / "model" / "diffsqueeze.json").read_text())
    assert sum(r["kind"] == "QuantLinear" for r in state["modules"].values()) == 32
    assert list((run_dir / "calibration").glob("*/*.safetensors"))
    pipe = load_pipeline(str(run_dir))  # one timestep group: runs without routing
    assert len(quant_layers(pipe.transformer)) == 33
    latents = generate(pipe)
    assert torch.isfinite(latents).all()
    # --resume with one more stage: the ptq checkpoint is rebuilt from its records and reused
    data = yaml.safe_load(path.read_text())
    data["stages"].append({"prune": {"targets": {"transformer": 0.1}, "include": ["proj_out"]}})
    path.write_text(yaml.safe_dump(data))
    run_dir = run_recipe(load_recipe(path), resume=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"][0]["started"] == entry["started"]  # not rerun
    resumed = load_pipeline(str(run_dir))
    assert len(quant_layers(resumed.transformer)) == 33
    assert float((resumed.transformer.proj_out.weight == 0).float().mean()) > 0.09
