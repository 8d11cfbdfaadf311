"""What keeps a large model's run within memory: calibration recorded from the loaded pipeline
before the first stage (no teacher for round-to-nearest), a teacher that reads only the
components a stage changes, per-phase peaks in the manifest, and the streamed packed export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import diffsqueeze.run.runner as runner
from diffsqueeze.loading import load_pipeline
from diffsqueeze.models import save_pipeline
from diffsqueeze.models.streamed import is_streamed, tensor_value
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.run.teacher import load_teacher
from diffsqueeze.prune.magnitude import smallest_k_mask
from diffsqueeze.quant.export.safetensors_writer import write_streamed
from diffsqueeze.recipe import load_recipe

CALIB = {"num_samples": 2, "batch_size": 2, "timesteps": 2, "num_inference_steps": 2, "guidance_scale": 2.0}


def test_round_to_nearest_loads_no_teacher_and_records_per_phase_costs(write_recipe, monkeypatch):
    def no_teacher(*_):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(runner, "load_teacher", no_teacher)
    recipe = write_recipe({"model": "builtin:tiny-sd", "seed": 0, "device": "cpu", "calibration": CALIB,
                           "stages": [{"prune": {"targets": {"denoiser": 0.3}}},
                                      {"ptq": {"weights": {"bits": 8}, "activations": {"bits": 8}}}]})
    run = run_recipe(load_recipe(recipe))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["calibration"]["peak_rss_mb"] > 0 and manifest["calibration"]["wall_time_s"] >= 0
    assert manifest["export"]["peak_rss_mb"] > 0 and all(s["peak_rss_mb"] > 0 for s in manifest["stages"])


def test_teacher_reads_only_the_components_stages_change(tmp_path, tiny_sd, write_recipe):
    folder = tmp_path / "model"
    save_pipeline(tiny_sd, folder)
    student = load_pipeline(str(folder))
    for setting in ("resident", "auto"):  # auto streams the changed components on the CPU
        recipe = load_recipe(write_recipe({"model": str(folder), "teacher": setting,
                                           "stages": [{"ptq": {"weights": {"bits": 8}}}]}))
        record: dict = {}
        teacher = load_teacher(recipe, student, {"unet"}, torch.device("cpu"), record)
        assert teacher.text_encoder is student.text_encoder and teacher.vae is student.vae
        assert teacher.unet is not student.unet
        assert record["streamed"] == ([] if setting == "resident" else ["unet"]) and is_streamed(teacher.unet) == (setting == "auto")
        for (k, a), b in zip(teacher.unet.state_dict().items(), student.unet.state_dict().values()):
            assert torch.equal(tensor_value(teacher.unet, k, a), b), k


def test_streamed_file_is_a_safetensors_file(tmp_path):
    tensors = {"f32": torch.randn(3, 4), "u8": torch.arange(7, dtype=torch.uint8), "f16": torch.randn(5).half(),
               "bf16": torch.randn(2, 2).bfloat16(), "empty": torch.zeros(0), "bool": torch.tensor([True, False])}
    nbytes = write_streamed(tmp_path / "x.safetensors", iter(tensors.items()), {"format": "test"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert nbytes == (tmp_path / "x.safetensors").stat().st_size
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".*.data"))
    with pytest.raises(ValueError, match="tensor 'a' given twice"):
        write_streamed(tmp_path / "y.safetensors", [("a", torch.ones(1)), ("a", torch.ones(1))])


def test_magnitude_masks_from_weights_equal_masks_from_scores():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(9, 7, generator=g).round(decimals=1), torch.zeros(6), torch.randn(4, 3, 3, generator=g)]
    for k in (0, 1, 20, 50, sum(w.numel() for w in weights)):
        by_scores = smallest_k_mask([w.abs() for w in weights], k)
        by_weights = smallest_k_mask(weights, k, absolute=True)
        assert all(torch.equal(a, b) for a, b in zip(by_scores, by_weights))
        assert sum(int((~m).sum()) for m in by_weights) == k
