"""The streamed teacher (models/streamed.py, run/teacher.py): a component whose weights stay
in its safetensors files computes what the loaded one does, bit for bit, and a run whose teacher
streams writes the model a run with a resident teacher writes. What cannot stream loads whole and
the teacher record says why; a deep copy of a streamed component is resident, so a checkpoint
loaded into it counts. (Every pipeline family from a saved folder: tests/pipelines/test_streamed_families.py.)"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsqueeze.loading import load_with_state, plain_model_folder
from diffsqueeze.models import save_pipeline
from diffsqueeze.models.streamed import NotStreamable, is_streamed, streamed_component
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.recipe import recipe_from_dict
from diffsqueeze.run.teacher import load_teacher


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    save_pipeline(load_with_state("builtin:tiny-sd")[0], folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_unet_is_the_loaded_unet(tiny_folder, dtype):
    name = str(dtype).removeprefix("torch.")
    loaded = load_with_state(str(tiny_folder), dtype=name)[0].unet
    streamed = streamed_component(tiny_folder, "unet", torch.device("cpu"), dtype)
    assert is_streamed(streamed) and not is_streamed(loaded)
    assert all(p.device.type == "meta" for p in streamed.parameters())
    g = torch.Generator().manual_seed(0)
    cfg = loaded.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g).to(dtype)
    c = torch.randn(2, 77, cfg.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        want = loaded(x, t, encoder_hidden_states=c).sample
        got = streamed(x, t, encoder_hidden_states=c).sample
    assert torch.equal(want, got)
    assert all(p.device.type == "meta" for p in streamed.parameters()), "weights were kept after the forward"


def test_what_cannot_stream_says_why(tiny_folder):
    assert plain_model_folder("builtin:tiny-sd") is None
    assert plain_model_folder(str(tiny_folder)) == tiny_folder
    with pytest.raises(NotStreamable, match="transformers.CLIPTextModel is not a diffusers model"):
        streamed_component(tiny_folder, "text_encoder", torch.device("cpu"), torch.float32)
    with pytest.raises(NotStreamable, match="not a component folder"):
        streamed_component(tiny_folder, "no_such_component", torch.device("cpu"), torch.float32)


def _teacher(model, teacher: str, student):
    recipe = recipe_from_dict({"model": str(model), "teacher": teacher, "output_dir": "unused",
                               "stages": [{"prune": {"targets": {"denoiser": 0.1}}}]})
    record: dict = {}
    return load_teacher(recipe, student, {"unet"}, torch.device("cpu"), record), record


def test_auto_keeps_what_cannot_stream_resident_and_the_record_says_why(tiny_folder, tmp_path):
    student = load_with_state(str(tiny_folder))[0]
    _, record = _teacher("builtin:tiny-sd", "auto", student)
    assert record["streamed"] == [] and record["resident"] == ["unet"]
    assert "only a plain diffusers folder streams" in record["why_resident"]["unet"]

    # a folder whose files hold a tensor the model does not have (diffusers' loading skips it)
    extra = tmp_path / "extra"
    shutil.copytree(tiny_folder, extra)
    (weights,) = (extra / "unet").glob("*.safetensors")
    save_file({**load_file(str(weights)), "position_ids": torch.arange(4)}, str(weights))
    teacher, record = _teacher(extra, "auto", student)
    assert record["streamed"] == [] and record["resident"] == ["unet"] and not is_streamed(teacher.unet)
    assert "tensor names are not the model's" in record["why_resident"]["unet"]
    _, record = _teacher(tiny_folder, "resident", student)
    assert "why_resident" not in record  # nothing asked to stream


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_deep_copy_of_a_streamed_component_is_resident_and_takes_a_checkpoint(tiny_folder, dtype):
    """The evaluation scores an intermediate stage on a deep copy of the teacher with the stage's
    checkpoint loaded into it: a streamed copy would drop the checkpoint (its weights are read from
    the files at every forward) and score the original instead."""
    name = str(dtype).removeprefix("torch.")
    loaded = load_with_state(str(tiny_folder), dtype=name)[0].unet
    streamed = streamed_component(tiny_folder, "unet", torch.device("cpu"), dtype)
    copied, reference = copy.deepcopy(streamed), copy.deepcopy(loaded)
    assert is_streamed(streamed) and not is_streamed(copied)
    assert all(p.device.type == "cpu" and p.dtype == dtype for p in copied.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, loaded.config.in_channels, 16, 16, generator=g).to(dtype)
    c = torch.randn(2, 77, loaded.config.cross_attention_dim, generator=g).to(dtype)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        original = loaded(x, t, encoder_hidden_states=c).sample
        assert torch.equal(copied(x, t, encoder_hidden_states=c).sample, original)
        changed = {k: v * 0.5 for k, v in loaded.state_dict().items()}
        copied.load_state_dict(changed)
        reference.load_state_dict(changed)
        want = reference(x, t, encoder_hidden_states=c).sample
        assert not torch.equal(want, original) and torch.equal(copied(x, t, encoder_hidden_states=c).sample, want)
        assert torch.equal(streamed(x, t, encoder_hidden_states=c).sample, original)  # the original is untouched


def _run(tmp_path, model, teacher: str):
    recipe = recipe_from_dict({
        "model": str(model), "seed": 0, "device": "cpu", "teacher": teacher, "output_dir": str(tmp_path / teacher),
        "calibration": {"num_samples": 2, "batch_size": 2, "timesteps": 2, "num_inference_steps": 2},
        "stages": [{"ptq": {"weights": {"bits": 4, "format": "int"}, "activations": {"bits": 8, "format": "int"},
                            "rounding": {"method": "adaround", "iters": 4, "batch_size": 2}, "batch_size": 2}},
                   {"quest": {"time_layers": ["auto"], "sensitive_layers": {"select": "pattern", "patterns": ["*ff.net.*"]},
                              "stage1": {"epochs": 1, "samples": 2, "batch_size": 2},
                              "stage2": {"epochs": 1, "samples": 2, "batch_size": 2}}}],
        "eval": {"num_images": 2, "batch_size": 2, "num_inference_steps": 2}})
    return run_recipe(recipe)


def test_a_run_with_a_streamed_teacher_writes_the_same_model(tiny_folder, tmp_path):
    resident = _run(tmp_path, tiny_folder, "resident")
    streamed = _run(tmp_path, tiny_folder, "auto")  # auto streams on the CPU
    manifest = json.loads((streamed / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["teacher"]["streamed"] == ["unet"] and manifest["teacher"]["resident"] == []
    assert json.loads((resident / "manifest.json").read_text())["teacher"]["streamed"] == []
    a = load_file(str(resident / "model" / "unet" / "diffsqueeze_packed.safetensors"))
    b = load_file(str(streamed / "model" / "unet" / "diffsqueeze_packed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the evaluation's original-model images come from the teacher: the same images, the same scores
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (resident, streamed))
    assert ma["fid"]["fid"] == mb["fid"]["fid"]
    assert ma["fidelity"] == mb["fidelity"]


def test_time_layer_detection_on_a_streamed_teacher(tiny_folder):
    """QuEST's time-layer detection reads only the autograd graph's shape: the same layers on a
    streamed teacher, and it keeps none of the weights the forward loaded."""
    from diffsqueeze.quant.quest.time_layers import detect_time_layers

    loaded = load_with_state(str(tiny_folder))[0].unet
    streamed = streamed_component(tiny_folder, "unet", torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    kwargs = {"sample": torch.randn(1, loaded.config.in_channels, 16, 16, generator=g), "timestep": torch.tensor([50.0]),
              "encoder_hidden_states": torch.randn(1, 77, loaded.config.cross_attention_dim, generator=g)}
    want = detect_time_layers(loaded, kwargs, 700.0)
    assert want and detect_time_layers(streamed, kwargs, 700.0) == want
