"""A recipe's ``export.formats``: the run writes ``export-<format>/`` beside ``model/`` (as
``diffsqueeze export`` would) before it says ``complete``; what a format cannot take is refused at
``export.formats`` before any file is written; a resumed run whose model changed replaces the
stale export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffsqueeze.cli import main
from tests.helpers import manifest, one_error_line

pytest.importorskip("gguf")

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}


def _recipe(tmp_path: Path, model: str, ptq: dict, export: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": model, "output_dir": str(tmp_path / "run"), "device": "cpu",
                                    "calibration": CALIB, "stages": [{"ptq": ptq}], "export": export}))
    return path


WEIGHT_ONLY = {"weights": {"bits": 4, "format": "q4_0"}, "activations": None, "rounding": {"method": "nearest"}}


def test_the_run_writes_each_format_before_it_is_complete(tmp_path, capsys):
    recipe = _recipe(tmp_path, "builtin:tiny-dit", WEIGHT_ONLY, {"formats": ["gguf"]})
    assert main(["run", str(recipe)]) == 0
    run = tmp_path / "run"
    m = manifest(run)
    assert m["status"] == "complete"
    entry = m["export"]["formats"]["gguf"]
    out = run / entry["path"]
    assert out.name == "export-gguf" and (out / "transformer" / "diffusion_pytorch_model.gguf").is_file()
    assert entry["bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    report = json.loads((out / "gguf_export.json").read_text())
    assert report["components"]["transformer"]["quantized_layers"]["q4_0"] > 0
    assert str(out) in (out / "LOAD.md").read_text()  # the lines load it from where it is
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0 and "q4_0" in capsys.readouterr().out

    # the model changes (another format): the stale export goes, the new one replaces it
    recipe.write_text(recipe.read_text().replace("q4_0", "q8_0").replace("bits: 4", "bits: 8"))
    assert main(["run", str(recipe), "--resume", "--overwrite"]) == 0
    report = json.loads((out / "gguf_export.json").read_text())
    stored = set(report["components"]["transformer"]["quantized_layers"])
    assert "q8_0" in stored and "q4_0" not in stored  # (the patch-embedding convolution stays float32)
    assert not (run / "export-gguf.old").exists()


@pytest.mark.parametrize("model,ptq,export,words", [
    ("builtin:tiny-dit", {**WEIGHT_ONLY, "activations": {"bits": 8, "format": "int8_sym"}}, {"formats": ["gguf"]},
     ["export.formats", "gguf stores weights only", "stages[0].ptq quantizes activations", "allow_float"]),
    ("builtin:tiny-pixart", WEIGHT_ONLY, {"formats": ["gguf"]},
     ["export.formats", "from_single_file", "PixArtTransformer2DModel"]),
    ("builtin:tiny-dit", WEIGHT_ONLY, {"formats": ["gguf", "gguf"]}, ["export.formats", "listed twice"]),
    ("builtin:tiny-dit", WEIGHT_ONLY, {"formats": ["onnx"]}, ["export.formats[0]", "'gguf', 'torchao'"]),
])
def test_what_a_format_cannot_take_is_refused_before_any_file(tmp_path, capsys, model, ptq, export, words):
    recipe = _recipe(tmp_path, model, ptq, export)
    assert main(["run", str(recipe)]) == 1
    one_error_line(capsys.readouterr().err, *words)
    assert not (tmp_path / "run").exists()


def test_the_command_the_recipe_and_the_exporters_know_the_same_formats():
    import argparse
    import typing

    from diffsqueeze.cli import build_parser
    from diffsqueeze.recipe import ExportConfig
    from diffsqueeze.run.target_exports import EXPORT_FORMATS

    recipe_formats = typing.get_args(typing.get_args(typing.get_type_hints(ExportConfig)["formats"])[0])
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    command = next(a for a in sub.choices["export"]._actions if a.dest == "format").choices
    assert tuple(recipe_formats) == tuple(command) == EXPORT_FORMATS
