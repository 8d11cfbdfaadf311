"""Loading by spec, saving and reloading, and clear errors for bad specs and damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.loading import load_pipeline
from diffsqueeze.models import check_model_spec, find_roles, save_pipeline


def generate(pipe, seed=3):
    return pipe("a red car", num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                output_type="np", guidance_scale=5.0).images


@pytest.mark.parametrize("name,denoiser,encoders", [
    ("tiny-sd", "unet", ("text_encoder",)),
    ("tiny-dit", "transformer", ("text_encoder", "text_encoder_2")),
])
def test_builtin_roles_and_round_trip(tmp_path, name, denoiser, encoders):
    pipe = load_pipeline(f"builtin:{name}")
    roles = find_roles(pipe)
    assert roles.denoiser == denoiser and roles.text_encoders == encoders and roles.vae == "vae"
    save_pipeline(pipe, tmp_path / name)
    again = load_pipeline(str(tmp_path / name))
    np.testing.assert_array_equal(generate(pipe), generate(again))


def test_builtin_is_deterministic():
    a, b = load_pipeline("builtin:tiny-sd"), load_pipeline("builtin:tiny-sd")
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("spec,message", [
    ("builtin:nope", "unknown builtin model .builtin:nope.; known: .*builtin:tiny-dit"),
    ("./missing-folder", "no such folder"),
    ("not a hub id", "not a hub id"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        check_model_spec(spec)


def test_folder_without_index_and_damaged_files(tmp_path, tiny_sd):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    folder = tmp_path / "saved"
    save_pipeline(tiny_sd, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load pipeline"):
        load_pipeline(str(folder))


def test_pickle_files_are_refused(tmp_path, tiny_sd):
    folder = tmp_path / "saved"
    save_pipeline(tiny_sd, folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pipeline(str(folder))


def test_damaged_state_file(tmp_path, tiny_sd):
    folder = tmp_path / "saved"
    save_pipeline(tiny_sd, folder)
    (folder / "diffsqueeze.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="diffsqueeze.json is not valid JSON"):
        load_pipeline(str(folder))
    (folder / "diffsqueeze.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ModelLoadError, match="unsupported state version"):
        load_pipeline(str(folder))
