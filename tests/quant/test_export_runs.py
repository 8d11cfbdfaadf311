"""Packed export of real runs (slow): the ptq and binarize stages on builtin:tiny-sd, exported by the
runner's ``export_model``, reload through ``load_pipeline(run_dir)`` with bit-identical images."""

from __future__ import annotations

import json

import pytest
import torch

from diffsqueeze.loading import load_pipeline
from diffsqueeze.models.state import CompressionState
from tests.helpers import stage_context
from diffsqueeze.run.runner import export_model
from diffsqueeze.quant.nn.packed import PackedWeightMixin
from diffsqueeze.recipe import recipe_from_dict
from diffsqueeze.stages import STAGES

pytestmark = pytest.mark.slow
CALIB = {"num_samples": 2, "timesteps": 2, "num_inference_steps": 2, "batch_size": 2, "guidance_scale": 1.0}


def images(pipe) -> torch.Tensor:
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    out = pipe(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return torch.from_numpy(out.images)


def run_and_export(tmp_path, stages):
    run_dir = tmp_path / "run"
    recipe = recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": str(run_dir), "device": "cpu",
                               "calibration": CALIB, "stages": stages})
    ctx = stage_context(recipe, index=0, run_dir=run_dir, device=torch.device("cpu"), seed=0,
                       state=CompressionState(), teacher_factory=lambda: load_pipeline("builtin:tiny-sd"))
    pipe = load_pipeline("builtin:tiny-sd")
    registry = STAGES
    for i, s in enumerate(recipe.stages):
        ctx.index = i
        registry[s.name].stage_cls(s.config).apply(pipe, ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps({"status": "running"}))
    manifest: dict = {}
    export_model(pipe, ctx, run_dir, manifest)
    return pipe, run_dir, manifest


@pytest.mark.parametrize("stages", [
    [{"prune": {"targets": {"unet": 0.5}}},
     {"ptq": {"weights": {"bits": 4, "format": "fp4_e2m1"}, "activations": {"bits": 8, "format": "int"},
              "softmax_bits": 8}}],
    [{"prune": {"targets": {"unet": 0.5}}}, {"binarize": {"train": {"iters": 2, "batch_size": 2, "lr": 0.001}}}],
], ids=["ptq_w4a8_pruned", "binarize_w1a4_pruned"])
def test_run_export_reloads_bit_identical(tmp_path, stages):
    pipe, run_dir, manifest = run_and_export(tmp_path, stages)
    before = images(pipe)
    again = load_pipeline(str(run_dir))
    assert any(isinstance(m, PackedWeightMixin) for m in again.unet.modules())
    assert torch.equal(images(again), before)
    fp32 = sum(p.numel() * 4 for p in load_pipeline("builtin:tiny-sd").unet.parameters())
    assert manifest["export"]["packed"]["unet"] < fp32 / 3
