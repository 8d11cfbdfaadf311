"""A ptq recipe on builtin:tiny-sd that exports and saves its evaluation images, and the check that
the exported model reloads and generates those images pixel for pixel (shared by the tests of
the ptq options)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch


def run_tiny_ptq(tmp_path: Path, ptq: dict) -> Path:
    """Run one ptq stage with ``ptq`` as its config; returns the run folder."""
    from diffsqueeze.pipelines.runner import run_recipe
    from diffsqueeze.recipe import recipe_from_dict

    recipe = {"model": "builtin:tiny-sd", "output_dir": str(tmp_path / "run"),
              "calibration": {"num_samples": 2, "timesteps": 2, "num_inference_steps": 4, "batch_size": 2,
                              "guidance_scale": 2.0},
              "stages": [{"ptq": ptq}],
              "eval": {"num_images": 2, "batch_size": 2, "seeds": [0], "grid_prompts": 1, "num_inference_steps": 3,
                       "guidance_scale": 2.0, "features": "tiny-random", "save_images": True}}
    return run_recipe(recipe_from_dict(recipe))


def reload_and_check_pixels(run: Path):
    """Reload ``run``'s exported model, assert it regenerates the saved eval images exactly; returns it."""
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.metrics.grid import generate_images

    pipe = load_pipeline(str(run / "model"))
    images = generate_images(pipe, ["a photo of a cat", "a red car on a street"], [0, 1], 3, 2.0)
    saved = [np.asarray(PIL.Image.open(run / "eval" / "images" / f"{i:06d}.png").convert("RGB")) for i in range(2)]
    assert torch.equal(images, torch.from_numpy(np.stack(saved)).permute(0, 3, 1, 2))
    return pipe
