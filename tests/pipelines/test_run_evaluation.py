"""Scoring at the end of `diffsqueeze run` (diffsqueeze.run.evaluation.evaluate_run)."""

import json

import PIL.Image
import pytest
import torch

from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.clip_score import ClipScorer, tiny_clip
from diffsqueeze.metrics.config import EvalConfig
from diffsqueeze.run.evaluation import evaluate_run


def test_evaluate_run_without_fid(tmp_path):
    """evaluate_run with num_images 0: grid, fidelity and CLIP on the grid's images, reports."""
    teacher = load_pipeline("builtin:tiny-sd")
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(0.5)
    model, processor = tiny_clip()
    clip_dir = tmp_path / "clip"
    model.save_pretrained(clip_dir, safe_serialization=True)
    processor.save_pretrained(clip_dir)
    cfg = EvalConfig(seeds=(0,), num_inference_steps=1, guidance_scale=1.0, grid_prompts=1, num_images=0,
                     clip_model=str(clip_dir))
    summary = evaluate_run(pipe, teacher, cfg, tmp_path, [{"index": 0, "name": "prune", "summary": {}}])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["fid"] is None and "skipped" in m["fid"]["note"] and summary["psnr"] == m["fidelity"]["psnr"] < 100
    assert m["fidelity"]["n_pairs"] == 1 and m["clip_score"]["n"] == 1
    assert m["clip_score"]["weights_hash"] == ClipScorer(model, processor).weights_hash
    assert "clip_score" in m["baseline_scores"] and (tmp_path / m["grid"]).is_file()
    assert "| CLIP score |" in (tmp_path / "report.md").read_text() and (tmp_path / "report.html").is_file()


@pytest.mark.slow
def test_run_with_eval_section_scores_stages_and_writes_reports(tmp_path):
    """`diffsqueeze run` with an eval: section calls evaluate_run (real runner, two prune stages)."""
    from diffsqueeze.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: builtin:tiny-sd
output_dir: {tmp_path / 'run'}
device: cpu
stages:
  - prune: {{targets: {{unet: 0.2}}, scope: global, pattern: unstructured}}
  - prune: {{targets: {{unet: 0.5}}, scope: global, pattern: unstructured}}
eval:
  seeds: [0, 1]
  num_inference_steps: 2
  guidance_scale: 1.0
  grid_prompts: 1
  num_images: 2
  batch_size: 2
  features: tiny-random
""")
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["kind"] == "run" and m["fid"]["value"] > 0 and m["fid"]["num_generated"] == 2
    assert m["fid"]["reference"].startswith("fp:") and m["baseline_scores"]["fid"]["value"] == 0.0
    assert 0 < m["fidelity"]["psnr"] < 100 and m["size"]["measured"] == "disk"
    first, last = m["stages"]
    assert first["name"] == "prune" and first["size"]["measured"].startswith("disk") and "psnr" in first["fidelity"]
    assert "fidelity" not in last  # the last stage is the exported model, scored at the top level
    grid = PIL.Image.open(run / m["grid"])
    # one prompt row; per seed, the original and the compressed image (64-pixel cells for 32-pixel images)
    assert grid.height < 2 * 64 + 60 and grid.width > 4 * 64
    md = (run / "report.md").read_text()
    assert "| FID vs the original's images | – | n/a: 2 generated vs 2 reference images" in md  # too few for FID
    assert "| 0 | prune |" in md and (run / "report.html").is_file()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["eval"]["status"] == "done" and manifest["eval"]["metrics"]["fid"] == m["fid"]["value"]
