"""Plain helpers shared by test modules (fixtures are in conftest.py): import them with
``from tests.helpers import ...``, never from another test module.

- :func:`stage_context`, :func:`make_ctx`: the StageContext the runner gives a stage of a recipe.
- :func:`generate`, :func:`quant_layers`: final latents of a tiny pipeline; its quantized layers.
- :func:`run_tiny_ptq`, :func:`reload_and_check_pixels`: a ptq recipe on builtin:tiny-sd that exports
  and saves its evaluation images, and the check that the exported model reloads and generates
  those images pixel for pixel (shared by the tests of the ptq options).
- :func:`snapshot`, :func:`is_lock`, :func:`one_error_line`, :func:`manifest`: every file of a folder
  with its hash (lock files aside), the one-line error check, a run's manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from diffsqueeze.loading import load_pipeline
from diffsqueeze.models.state import CompressionState
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.recipe import recipe_from_dict

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}


def stage_context(recipe, **kwargs) -> StageContext:
    """A StageContext for a stage of ``recipe``: what the runner gives it of the recipe (its model,
    seed and calibration section) plus ``kwargs`` (index, run_dir, device, seed, state, teacher_factory)."""
    return StageContext(model_spec=recipe.model, recipe_seed=recipe.seed, calibration=recipe.calibration, **kwargs)


def make_ctx(model: str, tmp_path, stages: list, calibration: dict | None = None):
    """A recipe and a stage context; runs in the same ``tmp_path`` share the recorded calibration data."""
    recipe = recipe_from_dict({"model": model, "output_dir": str(tmp_path / "run"), "device": "cpu",
                               "calibration": calibration or CALIB, "stages": stages})
    ctx = stage_context(recipe, index=0, run_dir=tmp_path / "run", device=torch.device("cpu"), seed=0,
                        state=CompressionState(), teacher_factory=lambda: load_pipeline(model))
    return recipe, ctx


def generate(pipe, seed: int = 0, output_type: str = "latent"):
    """Final latents (the denoiser's work; a plain save/reload already changes the VAE decode by ~3e-7)."""
    out = pipe(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, output_type=output_type,
               generator=torch.Generator().manual_seed(seed))
    images = out.images
    return images if torch.is_tensor(images) else torch.from_numpy(images)


def quant_layers(module):
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantMixin)}


def run_tiny_ptq(tmp_path: Path, ptq: dict) -> Path:
    """Run one ptq stage with ``ptq`` as its config; returns the run folder."""
    from diffsqueeze.run.runner import run_recipe

    recipe = {"model": "builtin:tiny-sd", "output_dir": str(tmp_path / "run"),
              "calibration": {"num_samples": 2, "timesteps": 2, "num_inference_steps": 4, "batch_size": 2,
                              "guidance_scale": 2.0},
              "stages": [{"ptq": ptq}],
              "eval": {"num_images": 2, "batch_size": 2, "seeds": [0], "grid_prompts": 1, "num_inference_steps": 3,
                       "guidance_scale": 2.0, "features": "tiny-random", "save_images": True}}
    return run_recipe(recipe_from_dict(recipe))


def reload_and_check_pixels(run: Path):
    """Reload ``run``'s exported model, assert it regenerates the saved eval images exactly; returns it."""
    from diffsqueeze.metrics.evaluate import EvalJob, torch_threads
    from diffsqueeze.metrics.grid import generate_images

    pipe = load_pipeline(str(run / "model"))
    with torch_threads(EvalJob.threads):  # the evaluation's thread count: the float sums in its order
        images = generate_images(pipe, ["a photo of a cat", "a red car on a street"], [0, 1], 3, 2.0)
    saved = [np.asarray(PIL.Image.open(run / "eval" / "images" / f"{i:06d}.png").convert("RGB")) for i in range(2)]
    assert torch.equal(images, torch.from_numpy(np.stack(saved)).permute(0, 3, 1, 2))
    return pipe


# ---- run directories: what a failed or refused command must leave as it was -------------------


def is_lock(p: Path) -> bool:
    """A run's lock file beside its output_dir (pipelines/run_lock.py): created by any run on the
    folder, refused or not, and left in place by design."""
    return p.name.startswith(".") and p.name.endswith(".lock")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones included, lock files not) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not is_lock(p)}


def one_error_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffsqueeze: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    return lines[0]


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())
