"""Every pipeline family with its teacher streamed from a plain saved folder, the way a user's model
is read: the family tests (test_families.py) run builtins, which never stream.

The streamed teacher generates what the loaded pipeline generates, bit for bit, for every builtin
family saved with ``save_pretrained``; and a prune -> W8A8 INT run with an evaluation completes
with the teacher streamed (``teacher: auto`` on the CPU) and writes and scores what the same run
with a resident teacher does. The runs cover the families that failed at the evaluation with
"Cannot copy out of meta tensor": those whose pipeline lists the streamed denoiser first (the
unconditional DDPM UNet, the class-conditional DiT), where diffusers took the pipeline's device
from the denoiser's meta parameters.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffsqueeze.loading import load_with_state
from diffsqueeze.metrics.grid import generate_images
from diffsqueeze.metrics.pipeline_info import denoiser_name
from diffsqueeze.models import save_pipeline
from diffsqueeze.models.builtin import BUILTINS
from diffsqueeze.models.conditioning import pipeline_prompts
from diffsqueeze.models.streamed import is_streamed
from diffsqueeze.recipe import recipe_from_dict
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.run.teacher import load_teacher

SIZES = {"tiny-flux": 32}  # Flux's default is 256 px


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family)``: the builtin saved as a plain diffusers folder (once per module)."""
    folders = {}

    def save(family: str):
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(family)
            save_pipeline(load_with_state(f"builtin:{family}")[0], folders[family])
        return folders[family]

    return save


@pytest.mark.parametrize("family", sorted(BUILTINS))
def test_the_streamed_teacher_generates_what_the_loaded_pipeline_does(family, saved):
    folder = saved(family)
    student = load_with_state(str(folder))[0]
    name = denoiser_name(student)
    recipe = recipe_from_dict({"model": str(folder), "teacher": "auto", "output_dir": "unused",
                               "stages": [{"prune": {"targets": {"denoiser": 0.1}}}]})
    record: dict = {}
    teacher = load_teacher(recipe, student, {name}, torch.device("cpu"), record)
    assert record["streamed"] == [name] and is_streamed(getattr(teacher, name))
    prompt, size = pipeline_prompts(student, "builtin")[:1], SIZES.get(family)
    want = generate_images(student, prompt, [0], 2, 2.0, height=size, width=size)
    got = generate_images(teacher, prompt, [0], 2, 2.0, height=size, width=size)
    assert torch.equal(want, got)


def _run(model, out, teacher: str):
    return run_recipe(recipe_from_dict({
        "model": str(model), "output_dir": str(out), "seed": 0, "device": "cpu", "teacher": teacher,
        "calibration": {"num_samples": 1, "timesteps": 1, "num_inference_steps": 2, "batch_size": 1},
        "stages": [{"prune": {"targets": {"denoiser": 0.2}}},
                   {"ptq": {"weights": {"bits": 8, "format": "int"},
                            "activations": {"bits": 8, "format": "int", "init": "percentile", "search_values": 1024}}}],
        "eval": {"num_images": 2, "batch_size": 2, "seeds": [0], "grid_prompts": 1, "num_inference_steps": 2,
                 "guidance_scale": 2.0, "fidelity": True, "features": "tiny-random"}}))


@pytest.mark.parametrize("family", ["tiny-ddpm", "tiny-class-dit"])
def test_a_w8a8_run_with_an_eval_streams_its_teacher_and_scores_what_a_resident_one_does(family, saved, tmp_path):
    folder = saved(family)
    resident, streamed = _run(folder, tmp_path / "resident", "resident"), _run(folder, tmp_path / "auto", "auto")
    manifest = json.loads((streamed / "manifest.json").read_text())
    name = denoiser_name(load_with_state(str(folder))[0])
    assert manifest["status"] == "complete" and manifest["teacher"]["streamed"] == [name]
    a = load_file(str(resident / "model" / name / "diffsqueeze_packed.safetensors"))
    b = load_file(str(streamed / "model" / name / "diffsqueeze_packed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the original's images come from the teacher, the pruned stage's from a copy of it with the
    # stage's checkpoint: the same scores (a streamed copy scored the original: PSNR at its cap)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (resident, streamed))
    assert ma["fid"]["value"] == mb["fid"]["value"] and ma["fidelity"] == mb["fidelity"]
    assert ma["stages"][0]["fidelity"] == mb["stages"][0]["fidelity"]
    assert mb["stages"][0]["fidelity"]["psnr"] < 100
