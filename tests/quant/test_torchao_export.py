"""`diffsqueeze export RUN --format torchao`: int8 weight-only runs of SD3-, Flux- and PixArt-class
models, an int8 dynamic-activation run and float8 runs load in plain diffusers (a subprocess that
never imports diffsqueeze: ``DiffusionPipeline.from_pretrained`` reads the ``TorchAoConfig`` from
the denoiser's config.json and torchao tensors from safetensors) and generate the images of
``diffsqueeze.load`` of the run; the written bytes read back through torchao as the run's weights;
what torchao cannot express is refused by name before a file is written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchao", minversion="0.18")

from diffsqueeze.cli import main  # noqa: E402
from diffsqueeze.quant.export.torchao_export import LAYOUTS, Layout  # noqa: E402
from diffsqueeze.recipe import recipe_from_dict  # noqa: E402
from diffsqueeze.run.runner import run_recipe  # noqa: E402
from tests.helpers import one_error_line  # noqa: E402

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}
INT8 = {"weights": {"bits": 8, "format": "int_sym"}, "activations": None, "rounding": {"method": "nearest"}}
FP8 = {"weights": {"bits": 8, "format": "fp8_e4m3_hw"}, "activations": None, "rounding": {"method": "nearest"}}
PER_TOKEN = {"granularity": "group", "group_size": 4096}  # one dynamic group wider than any row: per token
# the patch-embedding convolution stays float: torchao quantizes linear layers only, and a float weight
# would drop the convolution's activation quantizer
NO_CONV = {"exclude": ["pos_embed.*"]}
LAYOUT = {lo.name: lo for lo in LAYOUTS}


def _run(tmp_path: Path, model: str, ptq: dict, name: str = "run") -> Path:
    return run_recipe(recipe_from_dict({"model": model, "output_dir": str(tmp_path / name), "device": "cpu",
                                        "calibration": CALIB, "stages": [{"ptq": ptq}]}))


def _cpu_runs_float8_matmul() -> bool:
    """Whether torchao's float8 dynamic-activation matmul (``torch._scaled_mm``) runs on this CPU."""
    try:
        x = torch.randn(2, 16)
        w = LAYOUT["float8_dynamic_activation_float8_weight"].tensor(
            torch.ones(16, 16).to(torch.float8_e4m3fn), torch.ones(16, 1))
        torch.nn.functional.linear(x, w)
    except (RuntimeError, NotImplementedError, AssertionError):
        return False
    return True


PLAIN_DIFFUSERS = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    folder, out, comp = sys.argv[1], sys.argv[2], sys.argv[3]
    load = json.load(open(folder + "/torchao_export.json"))["load"]
    scope = {}
    exec(load, scope)  # the export's own LOAD.md lines
    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a cat"], num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.save(out, images)
    assert not any(m == "diffsqueeze" or m.startswith("diffsqueeze.") for m in sys.modules), "imported diffsqueeze"
    from torchao.utils import TorchAOBaseTensor
    den = getattr(pipe, comp)
    print("torchao weights:", sum(isinstance(p, TorchAOBaseTensor) for p in den.parameters()))
""")


def _read_back(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as torchao rebuilds them (its own unflatten, called as diffusers calls it:
    tensors at the model root, PixArt's ``scale_shift_table``, bypass it)."""
    from safetensors import safe_open
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(str(path), framework="pt") as f:
        flat, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    names = [n for n in json.loads(metadata["tensor_names"]) if "." in n]
    tensors, leftover = unflatten_tensor_state_dict({k: v for k, v in flat.items() if "." in k},
                                                    {**metadata, "tensor_names": json.dumps(names)})
    assert not leftover
    return tensors


@pytest.mark.parametrize("model,comp,ptq,layout", [
    ("builtin:tiny-dit", "transformer", INT8, "int8_weight_only"),
    ("builtin:tiny-flux", "transformer", INT8, "int8_weight_only"),
    ("builtin:tiny-pixart", "transformer", INT8, "int8_weight_only"),
    ("builtin:tiny-dit", "transformer", {**INT8, **NO_CONV, "activations": {"bits": 8, "format": "int", **PER_TOKEN}},
     "int8_dynamic_activation_int8_weight"),
    ("builtin:tiny-dit", "transformer", FP8, "float8_weight_only"),
    ("builtin:tiny-dit", "transformer", {**FP8, **NO_CONV, "activations": {"bits": 8, "format": "fp8_e4m3_hw", **PER_TOKEN}},
     "float8_dynamic_activation_float8_weight"),
])
def test_plain_diffusers_loads_the_export_and_generates_the_run_s_images(tmp_path, capsys, model, comp, ptq, layout):
    import diffsqueeze

    run = _run(tmp_path, model, ptq)
    out = tmp_path / "torchao"
    assert main(["export", str(run), "--format", "torchao", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0  # bytes per stored kind, read from the safetensors header
    stored = json.loads(capsys.readouterr().out)["components"][comp]["stored"]["by_type"]
    codes = "torchao int8" if layout.startswith("int8") else "torchao float8_e4m3fn"
    entry = json.loads((out / "torchao_export.json").read_text())["components"][comp]
    assert stored[codes]["tensors"] == entry["quantized_layers"][layout]
    assert stored[codes]["bytes"] == entry["quantized_layer_bytes"][layout]  # codes, scales (and zero points)
    assert stored[codes]["bits_per_value"] > 8
    entry = json.loads((out / "torchao_export.json").read_text())["components"][comp]
    assert entry["layout"] == layout and entry["quantized_layers"][layout] > 0
    assert all(f["why"] and f["same_computation"] for f in entry["float_layers"])  # each says why; none changes the images
    config = json.loads((out / comp / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao" and config["quant_type"]["default"]["_type"] == LAYOUT[layout].config

    # the bytes: every torchao weight read back from the file dequantizes to the run's weight bit for bit
    pipe = diffsqueeze.load(str(run))
    den = getattr(pipe, comp)
    written = _read_back(out / comp / "diffusion_pytorch_model.safetensors")
    torchao_weights = {k: t for k, t in written.items() if type(t) is not torch.Tensor}
    assert len(torchao_weights) == entry["quantized_layers"][layout]
    for key, tensor in torchao_weights.items():
        run_weight = den.get_submodule(key.removesuffix(".weight")).weight.detach()
        assert torch.equal(tensor.dequantize().view(torch.int32), run_weight.view(torch.int32)), key

    if layout.startswith("float8") and not _cpu_runs_float8_matmul():
        pytest.skip("this CPU/torch cannot run torchao's float8 matmul (torch._scaled_mm); the bytes were checked")
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_DIFFUSERS)
    proc = subprocess.run([sys.executable, "-I", str(script), str(out), str(tmp_path / "plain.npy"), comp],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split("torchao weights:")[1].split()[0]) == entry["quantized_layers"][layout], proc.stdout
    want = pipe(prompt=["a cat"], num_inference_steps=2, guidance_scale=2.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images
    got = np.load(tmp_path / "plain.npy")
    mse = float(np.mean((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse else float("inf")
    assert psnr >= 40, psnr  # same weights and activation grids; torchao's matmuls sum in another order


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lo: lo.name)
def test_the_written_tensors_carry_the_attributes_torchao_s_own_config_gives(layout: Layout, monkeypatch):
    """Built from the run's codes, not by torchao's quantizer: their non-tensor attributes (block size,
    activation quantization, matmul config) must be what torchao's config itself would give."""
    import torchao.quantization.quant_api as quant_api
    from torchao.quantization import quantize_

    # float8 configs assert a float8 GPU and (row-wise) bfloat16 weights when they quantize; the
    # attributes they give do not depend on either
    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    dtype = torch.bfloat16 if layout.act_format and layout.weight_format.startswith("fp8") else torch.float32
    linear = torch.nn.Linear(32, 16).to(dtype)
    quantize_(linear, layout.torchao_config())
    theirs = linear.weight
    ours = layout.tensor(torch.zeros(16, 32, dtype=theirs.qdata.dtype), torch.ones(16, 1))
    assert type(ours) is type(theirs)
    our_names, our_attrs = ours.__tensor_flatten__()
    their_names, their_attrs = theirs.__tensor_flatten__()
    assert our_names == their_names
    assert {k: v for k, v in our_attrs.items() if k != "dtype"} == {k: v for k, v in their_attrs.items() if k != "dtype"}


@pytest.mark.parametrize("ptq,words", [
    # static activation scales (calibrated per timestep group): torchao quantizes activations per token
    ({**INT8, **NO_CONV, "activations": {"bits": 8, "format": "int"}}, ["static activation scales"]),
    # torchao's symmetric per-token scale is amax/127.5, the run's amax/127
    ({**INT8, **NO_CONV, "activations": {"bits": 8, "format": "int_sym", **PER_TOKEN}}, ["amax/127.5"]),
    # asymmetric int8 weights: torchao's int8 linear ignores the zero point
    ({**INT8, "weights": {"bits": 8, "format": "int"}}, ["weight format int8", "ignores a weight zero point"]),
    # the run's int4 grouped asymmetric weights: integer zero points, float32 scales
    ({**INT8, "weights": {"bits": 4, "format": "int", "granularity": "group", "group_size": 16}},
     ["weight format int4", "Int4WeightOnlyConfig"]),
])
def test_what_torchao_cannot_express_is_refused_by_name_before_any_file(tmp_path, capsys, ptq, words):
    run = _run(tmp_path, "builtin:tiny-dit", ptq)
    out = tmp_path / "torchao"
    capsys.readouterr()  # the run's progress lines
    assert main(["export", str(run), "--format", "torchao", "--out", str(out)]) == 1
    one_error_line(capsys.readouterr().err, "cannot be expressed in torchao", "timestep_embedder.linear_1", "--allow-float", *words)
    assert not out.exists() and not (tmp_path / ".torchao.tmp").exists()


def test_allow_float_writes_the_refused_layers_in_float_and_says_what_changes(tmp_path, capsys):
    run = _run(tmp_path, "builtin:tiny-dit", {**INT8, "activations": {"bits": 8, "format": "int", **PER_TOKEN}})
    out = tmp_path / "torchao"
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torchao", "--out", str(out)]) == 1  # the conv's activations
    one_error_line(capsys.readouterr().err, "pos_embed.proj", "a convolution", "its activations are quantized")
    assert main(["export", str(run), "--format", "torchao", "--out", str(out), "--allow-float"]) == 0
    entry = json.loads((out / "torchao_export.json").read_text())["components"]["transformer"]
    [conv] = entry["float_layers"]
    assert conv["layer"] == "pos_embed.proj" and not conv["same_computation"] and conv["bytes"] > 0


def test_versions_that_cannot_load_the_export_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import torchao.prototype.safetensors.safetensors_utils as utils

    run = _run(tmp_path, "builtin:tiny-dit", INT8)
    capsys.readouterr()
    monkeypatch.setattr(utils, "ALLOWED_TENSORS_SUBCLASSES", ["Float8Tensor"])  # a torchao without Int8Tensor support
    assert main(["export", str(run), "--format", "torchao", "--out", str(tmp_path / "torchao")]) == 1
    one_error_line(capsys.readouterr().err, "cannot read Int8Tensor from safetensors", "tested: torchao 0.18.0")
    monkeypatch.setitem(sys.modules, "torchao", None)  # torchao not installed
    assert main(["export", str(run), "--format", "torchao", "--out", str(tmp_path / "torchao")]) == 1
    one_error_line(capsys.readouterr().err, "torchao with safetensors support is not installed")
    assert not (tmp_path / "torchao").exists()


def test_torchao_is_an_export_format(capsys):
    assert main(["export", "nowhere", "--format", "torchao"]) == 1
    one_error_line(capsys.readouterr().err, "holds no exported model")
