"""The command line: run, inspect, overrides after options, errors on stderr with exit 1."""

from __future__ import annotations

import json

from diffsqueeze.cli import main

RECIPE = {"model": "builtin:tiny-sd", "device": "cpu",
          "stages": [{"prune": {"targets": {"unet": 0.35, "text_encoder": 0.475}}}]}


def test_run_then_inspect(write_recipe, capsys):
    path = write_recipe(RECIPE)
    assert main(["run", str(path), "stages.0.prune.targets.unet=0.25"]) == 0
    out = capsys.readouterr().out
    assert "run complete" in out
    run_dir = json.loads(json.dumps(str(path.parent / "run")))
    assert main(["inspect", run_dir]) == 0
    text = capsys.readouterr().out
    assert "unet: sparsity target 0.2500, achieved 0.2500" in text
    assert "text_encoder" in text and "MiB" in text
    assert main(["inspect", run_dir, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    unet = data["model"]["components"]["unet"]
    assert unet["role"] == "denoiser" and unet["bytes_on_disk"] > 0
    assert any("masked_sparsity" in layer for layer in unet["layers"].values())
    # overrides may also follow options
    assert main(["run", str(path), "--overwrite", "seed=3"]) == 0


def test_errors_go_to_stderr_with_exit_1(write_recipe, capsys):
    path = write_recipe({**RECIPE, "stages": [{"prune": {"targets": {"unet": 2.0}}}]})
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert "stages[0].prune.targets.unet" in err and "Traceback" not in err
    assert main(["inspect", "builtin:missing"]) == 1
    assert "unknown builtin" in capsys.readouterr().err


def test_inspect_builtin(capsys):
    assert main(["inspect", "builtin:tiny-dit", "--layers"]) == 0
    out = capsys.readouterr().out
    assert "transformer" in out and "denoiser" in out and "per layer" in out
