"""What a run leaves is reproducible and reloads as it ran: identical runs give byte-identical
model/ folders, a reloaded model is in eval mode and gives the run's images bit for bit (on a
denoiser with dropout), and NaN weights are named by layer when a model is loaded."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from diffsqueeze.cli import main
from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.evaluate import EvalJob, torch_threads
from diffsqueeze.metrics.grid import generate_images
from diffsqueeze.models import save_pipeline
from diffsqueeze.models.prompts import load_prompts

W8A8 = {"ptq": {"weights": {"bits": 8, "format": "int", "granularity": "channel", "search": "mse"},
                "activations": {"bits": 8, "format": "int", "granularity": "tensor", "timestep_groups": 2},
                "rounding": {"method": "nearest"}, "softmax_bits": 8}}
CALIB = {"num_samples": 2, "timesteps": 2, "num_inference_steps": 2, "batch_size": 2}


def _recipe(tmp_path: Path, model: str, out: str, **extra) -> Path:
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp_path / out), "device": "cpu",
                                    "calibration": CALIB, "stages": [W8A8], **extra}), encoding="utf-8")
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_identical_runs_write_byte_identical_models(tmp_path):
    # separate processes: the safetensors writer's header order and the timings differ between them
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    for out in ("a", "b"):
        cmd = [sys.executable, "-m", "diffsqueeze", "run", str(_recipe(tmp_path, "builtin:tiny-sd", out))]
        subprocess.run(cmd, check=True, env=env, capture_output=True)
    a, b = _digests(tmp_path / "a" / "model"), _digests(tmp_path / "b" / "model")
    assert "unet/diffsqueeze_packed.safetensors" in a
    assert a == b


def test_reload_is_in_eval_mode_and_gives_the_run_images(tmp_path):
    pipe = load_pipeline("builtin:tiny-sd")
    unet = type(pipe.unet).from_config({**pipe.unet.config, "dropout": 0.5})  # dropout in every ResNet block
    unet.load_state_dict(pipe.unet.state_dict())
    pipe.unet = unet
    src = tmp_path / "with-dropout"
    save_pipeline(pipe, src)
    # the run's own evaluation scores the in-memory compressed model: its image digests are the reference
    run_eval = {"prompts": "builtin", "num_images": 2, "batch_size": 2, "num_inference_steps": 2, "guidance_scale": 5.0,
                "features": "tiny-random", "grid": False, "fidelity": False, "score_stages": False}
    assert main(["run", str(_recipe(tmp_path, str(src), "run", eval=run_eval))]) == 0
    reloaded = load_pipeline(str(tmp_path / "run"))
    assert not any(m.training for c in reloaded.components.values() if isinstance(c, torch.nn.Module)
                   for m in c.modules())

    def images(p):
        return p("a photo", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    run_digests = load_file(str(tmp_path / "run" / "eval" / "shards" / "batch-000000.safetensors"))["image_sha256"]
    prompts = load_prompts("builtin")
    with torch_threads(EvalJob.threads):  # the evaluation's thread count: its float sums in its order
        again_images = generate_images(reloaded, [prompts[0], prompts[1 % len(prompts)]], [0, 1], 2, 5.0, batch_size=2)
    reload_digests = [hashlib.sha256(x.contiguous().numpy().tobytes()).digest() for x in again_images]
    assert [bytes(d.tolist()) for d in run_digests] == reload_digests  # the run's images, bit for bit

    first = images(reloaded)
    assert torch.equal(first, images(reloaded))  # dropout off: the same seed gives the same image
    again = load_pipeline(str(tmp_path / "run"))
    assert torch.equal(first, images(again))


def test_nan_weights_are_named_by_layer_at_load(tmp_path, capsys):
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("inf")
    src = tmp_path / "damaged"
    save_pipeline(pipe, src)
    assert main(["run", str(_recipe(tmp_path, str(src), "run"))]) == 1
    err = capsys.readouterr().err
    assert "weight unet/down_blocks.0.resnets.0.conv1.weight holds 0 NaN and 1 Inf" in err and "Traceback" not in err


def test_a_layer_that_cannot_be_packed_fails_the_export_unless_allowed(tmp_path, capsys):
    recipe = _recipe(tmp_path, "builtin:tiny-sd", "half")
    assert main(["run", str(recipe), "dtype=float16"]) == 1  # float16 weights are not exactly on the INT8 grid
    err = capsys.readouterr().err
    assert "cannot be stored packed" in err and "export.allow_unpacked" in err and "Traceback" not in err
    manifest = (tmp_path / "half" / "manifest.json").read_text()
    assert '"status": "complete"' not in manifest
    assert main(["run", str(recipe), "dtype=float16", "export.allow_unpacked=true", "--overwrite"]) == 0
