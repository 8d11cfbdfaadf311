"""Calibration data (docs/methods.md §1): timesteps uniform over the trajectory, cond + uncond inputs,
safetensors in the run directory, streamed in batches, reused, clear errors."""

from __future__ import annotations

import pytest
import torch

from diffsqueeze.errors import RecipeError
from diffsqueeze.pipelines.calibration import (
    CalibrationError,
    calibration_steps,
    record_calibration,
)
from diffsqueeze.recipe import CalibrationConfig, recipe_from_dict


def test_calibration_steps_follow_q_diffusion():
    assert calibration_steps(20, 4) == [0, 5, 10, 15]
    assert calibration_steps(50, 25) == list(range(0, 50, 2))
    assert calibration_steps(10, 3) == [0, 3, 6]
    assert calibration_steps(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        calibration_steps(4, 5)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_sd):
    calib = CalibrationConfig(num_samples=3, timesteps=2, num_inference_steps=4, batch_size=2, guidance_scale=7.5)
    folder = tmp_path_factory.mktemp("calib")
    return record_calibration(tiny_sd, calib, folder, seed=0), calib, folder


def test_records_cond_and_uncond_at_the_scheduler_timesteps(recorded, tiny_sd):
    data, calib, folder = recorded
    assert data.steps == [0, 2]
    tiny_sd.scheduler.set_timesteps(calib.num_inference_steps)
    expected = [float(tiny_sd.scheduler.timesteps[s]) for s in data.steps]
    assert data.timesteps == expected
    # 3 samples in batches of 2 and 1, each doubled by classifier-free guidance, at 2 timesteps
    assert sorted(f["n"] for f in data.files) == [2, 2, 4, 4]
    assert data.num_samples == 12
    assert all((folder / f["file"]).suffix == ".safetensors" for f in data.files)
    b = next(data.batches())
    assert set(b.kwargs) >= {"sample", "timestep", "encoder_hidden_states"}
    assert b.kwargs["timestep"].shape == (b.size,)
    assert torch.all(b.kwargs["timestep"] == b.timestep)
    # conditional and unconditional halves differ in their text embeddings
    enc = b.kwargs["encoder_hidden_states"]
    assert not torch.allclose(enc[: b.size // 2], enc[b.size // 2:])


def test_streams_in_batches_limits_and_reuses(recorded, tiny_sd):
    data, calib, folder = recorded
    sizes = [b.size for b in data.batches(batch_size=3)]
    assert sum(sizes) == 12 and max(sizes) <= 3
    assert sum(b.size for b in data.batches(steps=[1])) == 6
    assert sum(b.size for b in data.batches(limit=2)) == 4
    again = record_calibration(tiny_sd, calib, folder, seed=0)  # finished recording: reused
    assert again.files == data.files


def test_shuffled_batches_mix_timesteps_and_cover_each_epoch(recorded):
    data, _, _ = recorded
    stream = data.shuffled_batches(batch_size=4, seed=3)
    epoch = [next(stream) for _ in range(3)]  # 12 samples: one epoch
    assert all(b["sample"].shape[0] == 4 for b in epoch)
    assert any(len(set(b["timestep"].tolist())) > 1 for b in epoch)  # timesteps mixed in a batch
    # every recorded input exactly once per epoch (cond and uncond share their latents: compare
    # latents, text embeddings and timestep together)
    def rows(kwargs_list):
        return torch.cat([torch.cat([k["sample"].flatten(1), k["encoder_hidden_states"].flatten(1),
                                     k["timestep"].float()[:, None]], 1) for k in kwargs_list])

    recorded_rows = rows([b.kwargs for b in data.batches()])
    drawn = rows(epoch)
    match = (drawn[:, None, :] == recorded_rows[None, :, :]).all(-1)
    assert torch.equal(match.sum(1), torch.ones(12, dtype=torch.long))
    assert torch.equal(match.sum(0), torch.ones(12, dtype=torch.long))
    # same seed, same order; the static arguments come along
    again = next(data.shuffled_batches(batch_size=4, seed=3))
    assert torch.equal(again["sample"], epoch[0]["sample"])
    assert set(epoch[0]) >= {"sample", "timestep", "encoder_hidden_states"}


def test_denoiser_replay_matches_recorded_call(recorded, tiny_sd):
    data, _, _ = recorded
    b = next(data.batches())
    out = tiny_sd.unet(**b.kwargs, return_dict=False)[0]
    assert out.shape == b.kwargs["sample"].shape and torch.isfinite(out).all()


def test_nan_inputs_name_the_timestep(tmp_path):
    from diffsqueeze.loading import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))  # latents turn NaN after the first step
    calib = CalibrationConfig(num_samples=1, timesteps=2, num_inference_steps=2, batch_size=1)
    with pytest.raises(CalibrationError, match=r"NaN/Inf at timestep \d+"):
        record_calibration(pipe, calib, tmp_path / "c", seed=0)


def test_empty_prompt_file_fails_at_recipe_load(tmp_path):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(RecipeError, match="calibration.prompts.*holds no prompt"):
        recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": str(tmp_path / "r"),
                          "calibration": {"prompts": str(empty)}})
    with pytest.raises(RecipeError, match="calibration.sampler"):
        recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": str(tmp_path / "r"),
                          "calibration": {"sampler": "fast"}})


def test_other_sampler_is_used_and_restored(tmp_path, tiny_sd):
    calib = CalibrationConfig(num_samples=1, timesteps=2, num_inference_steps=4, batch_size=1,
                              sampler="EulerDiscreteScheduler")
    before = type(tiny_sd.scheduler)
    data = record_calibration(tiny_sd, calib, tmp_path / "c", seed=0)
    assert type(tiny_sd.scheduler) is before
    assert len(data.timesteps) == 2
