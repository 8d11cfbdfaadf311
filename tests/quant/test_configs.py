"""Shipped PTQ recipes load, and their names say what they do (bits of weights and activations)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffsqueeze.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
PTQ_CONFIGS = sorted((REPO / "configs").glob("w[48]a*.yaml"))


def test_all_five_recipes_ship_for_builtin_and_sd15():
    names = {p.stem for p in PTQ_CONFIGS}
    for base in ("w8a8_int", "w8a8_fp8", "w4a8_int", "w4a8_fp", "w4a16_fp"):
        assert base in names and f"{base}_sd15" in names


@pytest.mark.parametrize("path", PTQ_CONFIGS, ids=lambda p: p.name)
def test_ptq_recipe_matches_its_name(path):
    recipe = load_recipe(path)
    wbits, abits = map(int, re.match(r"w(\d+)a(\d+)", path.stem).groups())
    (spec,) = [s for s in recipe.stages if s.name == "ptq"]
    cfg = spec.config
    assert cfg.weights.bits == wbits
    if abits == 16:
        assert cfg.activations is None
    else:
        assert cfg.activations.bits == abits
    if "_fp" in path.stem:
        assert cfg.weights.format.startswith("fp")
    if path.stem.endswith("_sd15"):
        c = recipe.calibration
        assert (c.num_samples, c.timesteps, c.num_inference_steps) == (128, 25, 50)  # Q-Diffusion, SD
    else:
        assert recipe.model.startswith("builtin:")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w8a8_int", "w8a8_fp8", "w4a8_int", "w4a8_fp", "w4a16_fp"])
def test_builtin_recipe_runs_end_to_end(name, tmp_path):
    """Each builtin recipe as shipped (minutes on a laptop CPU)."""
    import json

    import torch

    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.run.runner import run_recipe
    from diffsqueeze.quant.nn.routing import prepare_pipeline

    recipe = load_recipe(REPO / "configs" / f"{name}.yaml", [f"output_dir={tmp_path / name}", "device=cpu"])
    run_dir = run_recipe(recipe)
    entry = json.loads((run_dir / "manifest.json").read_text())["stages"][0]
    assert entry["status"] == "done" and entry["summary"]["quantized_layers"] > 0
    pipe = prepare_pipeline(load_pipeline(str(run_dir)))
    out = pipe(prompt=["a photo of a bag"], num_inference_steps=4, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
