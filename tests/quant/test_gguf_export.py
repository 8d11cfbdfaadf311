"""`diffsqueeze export RUN --format gguf`: a weight-only GGUF run of an SD3-, Flux- and SD-class
model loads in plain diffusers (a subprocess that never imports diffsqueeze, through
``from_single_file`` with ``GGUFQuantizationConfig``) and generates the same images as
``diffsqueeze.load`` of the run; what GGUF cannot express is refused by name before a file is
written (PixArt among them: diffusers 0.42.1 reads GGUF only through ``from_single_file``, which
its transformer class lacks)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsqueeze.cli import main
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.recipe import recipe_from_dict
from tests.helpers import one_error_line

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}


def _run(tmp_path: Path, model: str, ptq: dict, name: str = "run") -> Path:
    return run_recipe(recipe_from_dict({"model": model, "output_dir": str(tmp_path / name), "device": "cpu",
                                        "calibration": CALIB, "stages": [{"ptq": ptq}]}))


PLAIN_DIFFUSERS = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    folder, out = sys.argv[1], sys.argv[2]
    load = json.load(open(folder + "/gguf_export.json"))["load"]
    scope = {}
    exec(load, scope)  # the export's own LOAD.md lines
    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a cat"], num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.save(out, images)
    assert not any(m == "diffsqueeze" or m.startswith("diffsqueeze.") for m in sys.modules), "imported diffsqueeze"
    print(type(pipe.{comp}).__name__, "gguf tensors:", sum(type(p).__name__ == "GGUFParameter" for p in pipe.{comp}.parameters()))
""")


@pytest.mark.parametrize("model,comp,fmt,rounding", [
    ("builtin:tiny-dit", "transformer", "q4_0", "nearest"),
    ("builtin:tiny-flux", "transformer", "q5_1", "nearest"),
    ("builtin:tiny-sd", "unet", "q8_0", "nearest"),
    # K-quants (rows of 256: one tiny-dit layer, two tiny-flux layers), learned rounding included: the
    # learned codes must re-encode to themselves through ggml's super-block scales
    ("builtin:tiny-flux", "transformer", "q4_k", "nearest"),
    ("builtin:tiny-dit", "transformer", "q5_k", "adaround"),
])
def test_plain_diffusers_loads_the_export_and_generates_the_run_s_images(tmp_path, capsys, model, comp, fmt, rounding):
    import diffsqueeze

    learned = {"method": "adaround", "iters": 4, "batch_size": 2} if rounding == "adaround" else {"method": rounding}
    run = _run(tmp_path, model, {"weights": {"bits": int(fmt[1]), "format": fmt}, "activations": None,
                                 "rounding": learned})
    out = tmp_path / "gguf"
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 0
    report = json.loads((out / "gguf_export.json").read_text())
    entry = report["components"][comp]
    assert fmt in entry["quantized_layer_bytes"] and (out / comp / "diffusion_pytorch_model.gguf").is_file()
    assert all(f["why"] and f["same_computation"] for f in entry["float_layers"])  # each says why; none changes the images
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0  # bytes per stored format, read from the .gguf file itself
    stored = json.loads(capsys.readouterr().out)["components"][comp]["stored"]["by_type"][fmt]
    assert stored["tensors"] == entry["quantized_layers"][fmt] and stored["bytes"] == entry["quantized_layer_bytes"][fmt]
    assert stored["bits_per_value"] == {"q4_0": 4.5, "q5_1": 6.0, "q8_0": 8.5, "q4_k": 4.5, "q5_k": 5.5}[fmt]
    assert main(["inspect", str(out), "--layers"]) == 0 and f"{fmt} " in capsys.readouterr().out
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS.replace("{comp}", comp))
    proc = subprocess.run([sys.executable, "-I", str(script), str(out), str(tmp_path / "plain.npy")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_gguf = int(proc.stdout.split("gguf tensors:")[1].split()[0])
    assert n_gguf == entry["quantized_layers"][fmt] > 0, proc.stdout  # GGUF tensors, dequantized by diffusers
    pipe = diffsqueeze.load(str(run))
    want = pipe(prompt=["a cat"], num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    got = np.load(tmp_path / "plain.npy")
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse else float("inf")
    assert psnr >= 40, psnr  # same weights; diffusers' GGUF linear dequantizes then matmuls (same grid, same dtype)


def test_a_model_class_diffusers_cannot_read_gguf_for_is_refused_before_any_file(tmp_path, capsys):
    run = _run(tmp_path, "builtin:tiny-pixart", {"weights": {"bits": 8, "format": "q8_0"}, "activations": None,
                                                 "rounding": {"method": "nearest"}})
    capsys.readouterr()  # the run's progress lines
    assert main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 1
    one_error_line(capsys.readouterr().err, "transformer: diffusers", "loads GGUF only through from_single_file",
                   "PixArtTransformer2DModel does not have")
    assert not (tmp_path / "gguf").exists() and not (tmp_path / ".gguf.tmp").exists()


def test_what_gguf_cannot_express_is_refused_by_name_before_any_file(tmp_path, capsys):
    run = _run(tmp_path, "builtin:tiny-dit", {"weights": {"bits": 8, "format": "q8_0"},
                                              "activations": {"bits": 8, "format": "int8_sym"},
                                              "rounding": {"method": "nearest"}})
    out = tmp_path / "gguf"
    capsys.readouterr()  # the run's progress lines
    assert main(["export", str(run), "--format", "gguf", "--out", str(out)]) == 1
    one_error_line(capsys.readouterr().err, "cannot be expressed in GGUF", "activations quantized", "--allow-float")
    assert not out.exists() and not (tmp_path / ".gguf.tmp").exists()
    assert main(["export", str(run), "--format", "gguf", "--out", str(out), "--allow-float"]) == 0
    capsys.readouterr()
    floats = json.loads((out / "gguf_export.json").read_text())["components"]["transformer"]["float_layers"]
    assert any(not f["same_computation"] and "activations quantized" in f["why"] for f in floats)


@pytest.mark.parametrize("argv,words", [
    (["export", "{tmp}/nothing", "--format", "gguf"], ["holds no exported model"]),
    (["export", "builtin:tiny-dit", "--format", "gguf"], ["holds no exported model"]),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, words):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    one_error_line(capsys.readouterr().err, *words)


def test_an_unknown_format_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["export", "somewhere", "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
