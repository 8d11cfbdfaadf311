"""Every pipeline family through every stage: SD3 (tiny-dit), SDXL, Flux, PixArt, an unconditional
DDPM UNet and a class-conditional DiT, each a tiny random-weight build of diffusers' own classes.

Each (family, recipe) pair runs the real runner: calibration recording, the stages, the one-image
check after each stage, export, the grid and an evaluation job (2 images, tiny-random features)
whose images are kept; the exported model is then reloaded and must generate the same pixels.
"""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.evaluate import EvalJob, torch_threads
from diffsqueeze.metrics.grid import generate_images
from diffsqueeze.models.conditioning import conditioning_of, pipeline_prompts
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.recipe import recipe_from_dict

# families whose default image size is large get a small one (Flux's default is 256 px)
FAMILIES = {"tiny-dit": None, "tiny-sdxl": None, "tiny-flux": 32, "tiny-pixart": None, "tiny-ddpm": None,
            "tiny-class-dit": None}

W8A8 = {"ptq": {"weights": {"bits": 8, "format": "int"}, "activations": {"bits": 8, "format": "int"}}}
RECIPES = {
    "prune": [{"prune": {"targets": {"denoiser": 0.3}}}],
    "prune-2:4": [{"prune": {"targets": {"denoiser": 0.5}, "pattern": "2:4"}}],
    "w8a8-int": [W8A8],
    "w4a8-fp-learned": [{"ptq": {"weights": {"bits": 4, "format": "fp", "search_steps": 8},
                                 "activations": {"bits": 8, "format": "fp8_e4m3", "lsq_iters": 2,
                                                 "search_values": 2048},
                                 "rounding": {"method": "adaround", "iters": 3, "batch_size": 2},
                                 "softmax_bits": 8}}],
    "quest": [{"ptq": {"weights": {"bits": 4, "format": "int"}, "activations": {"bits": 4, "format": "int"},
                       "softmax_bits": 8}},
              {"quest": {"time_layers": ["auto"], "sensitive_layers": {"select": "sensitivity", "top_k": 2, "samples": 1},
                         "stage1": {"epochs": 1, "samples": 2, "batch_size": 2},
                         "stage2": {"epochs": 1, "samples": 2, "batch_size": 2}}}],
    "binarize": [{"binarize": {"train": {"iters": 2, "batch_size": 2}}}],
    "prune-then-ptq": [{"prune": {"targets": {"denoiser": 0.2}}}, W8A8],
}
STEPS = 3


def family_recipe(model: str, stages: list, out, size: int | None) -> dict:
    sized = {"height": size, "width": size} if size else {}
    return {"model": f"builtin:{model}", "output_dir": str(out), "seed": 0,
            "calibration": {"num_samples": 2, "timesteps": 2, "num_inference_steps": 4, "batch_size": 2,
                            "guidance_scale": 2.0, **sized},
            "stages": stages,
            "eval": {"num_images": 2, "batch_size": 2, "seeds": [0], "grid_prompts": 1, "num_inference_steps": STEPS,
                     "guidance_scale": 2.0, "fidelity": True, "features": "tiny-random", "save_images": True,
                     **sized}}


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_goes_through_stage_exports_and_reloads_bit_identical(family, recipe, tmp_path):
    size = FAMILIES[family]
    run = run_recipe(recipe_from_dict(family_recipe(family, RECIPES[recipe], tmp_path / "run", size)))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and all(s["status"] == "done" for s in manifest["stages"])
    assert (run / "grids" / "compressed-vs-original.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fid"]["value"] is not None and metrics["fidelity"]["psnr"] is not None

    # the exported model, reloaded, generates the pixels the in-memory model generated for eval
    pipe = load_pipeline(str(run / "model"))
    prompts = pipeline_prompts(pipe, "builtin")
    with torch_threads(EvalJob.threads):  # the evaluation's thread count: its float sums in its order
        images = generate_images(pipe, [prompts[i % len(prompts)] for i in range(2)], [0, 1], STEPS, 2.0,
                                 height=size, width=size)
    saved = [np.asarray(PIL.Image.open(run / "eval" / "images" / f"{i:06d}.png").convert("RGB")) for i in range(2)]
    assert torch.equal(images, torch.from_numpy(np.stack(saved)).permute(0, 3, 1, 2))


def test_conditioning_is_read_from_the_call_signature():
    kinds = {name: conditioning_of(load_pipeline(f"builtin:{name}")).kind for name in FAMILIES}
    assert kinds == {"tiny-dit": "text", "tiny-sdxl": "text", "tiny-flux": "text", "tiny-pixart": "text",
                     "tiny-ddpm": "none", "tiny-class-dit": "class"}
