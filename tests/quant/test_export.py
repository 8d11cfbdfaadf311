"""Packed export and reload (fast): every weight format packed at its real width, reload
bit-identical, weights packed in memory; damaged or tampered artifacts fail clearly.

The quantized layers are built directly (module swaps with simple min/max parameters) so the
file stays fast; tests/quant/test_export_runs.py runs the real ptq and binarize stages (slow).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.loading import load_pipeline, load_with_state
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.export.save import PACKED_FILE, export_pipeline, pack_layer
from diffsqueeze.quant.nn.binary_layers import make_binary_module
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.packed import PackedWeightMixin
from diffsqueeze.quant.nn.swaps import swap_module
from diffsqueeze.quant.primitives.formats import FPFormat, int_qparams, parse_format
from diffsqueeze.quant.primitives.pack import packed_nbytes

FORMATS = ["int4", "int8_sym", "int3", "int2", "fp4_e2m1", "fp8_e4m3_hw", "fp6_e3m2", "fp8_e5m2_hw", "fp8_e4m3",
           "int6_sym"]


def fp_bias_for(fmt: FPFormat, absmax: torch.Tensor) -> torch.Tensor:
    """A real (non-integer) bias that puts ``absmax`` at the top of the grid (docs/methods.md §3)."""
    top = (2 ** fmt.man_bits + fmt.max_man_code) / 2 ** fmt.man_bits
    return fmt.max_exp_code + math.log2(top) - torch.log2(absmax.clamp(min=1e-8))


def set_weight_params(q, w: torch.Tensor) -> None:
    g = q.grouped(w.detach())
    if (q.fmt.kind == "int"):
        s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), q.fmt.bits, q.fmt.symmetric)
        q.set_params(scale=s, zero_point=z)
    else:
        q.set_params(bias=fp_bias_for(q.fmt, g.abs().amax(-1, keepdim=True)))


def quantize_unet(pipe, state: CompressionState) -> dict[str, str]:
    """Swap the UNet's conv/linear layers: formats in turn, some split, per group, with input
    quantizers, some binary (order 1/2); half of the layers pruned 50% first."""
    fc1 = pipe.text_encoder.encoder.layers[0].mlp.fc1
    keep = fc1.weight.abs() > fc1.weight.abs().median()
    with torch.no_grad():
        fc1.weight.mul_(keep)
    state.masks["text_encoder/encoder.layers.0.mlp.fc1.weight"] = keep
    unet = pipe.unet
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    chosen = {}
    for i, name in enumerate(names):
        layer = unet.get_submodule(name)
        if i % 2 == 0:  # prune half of the layers 50%
            w = layer.weight.detach()
            keep = w.abs() > w.abs().flatten().median()
            with torch.no_grad():
                layer.weight.mul_(keep)
            state.masks[f"unet/{name}.weight"] = keep
        conv = isinstance(layer, torch.nn.Conv2d)
        if i % 7 == 3:
            rec = {"order": 1 + (i % 2), "masked": i % 2 == 0,
                   "act": {"format": "int4_sym", "shape": [1]}}
            new = make_binary_module(layer, rec)
            new.weight_quant.init_from(layer.weight)
            for a in new.act_quantizers():
                a.set_params(0, torch.tensor(0.05))
            kind = type(new).__name__
            chosen[name] = f"binary{rec['order']}"
        else:
            fmt = FORMATS[i % len(FORMATS)]
            inn = layer.in_channels if conv else layer.in_features
            rec = {"weight_format": fmt, "group_size": 0, "split": 0}
            if conv and i % 5 == 0 and inn % 2 == 0:
                rec["split"] = inn // 2
                rec["weight_format_2"] = "int8" if fmt != "int8" else "int4"
            elif not conv and inn % 16 == 0 and i % 3 == 0:
                rec["group_size"] = 16
            if i % 4 == 1:
                shape = [1, inn, 1, 1] if conv and not rec["split"] else [1]
                rec["act"] = {"format": "int8", "shape": shape}
            new = make_quant_module(layer, rec)
            for q, sl in new.weight_parts():
                set_weight_params(q, new.weight[:, sl])
            for a in new.act_quantizers():
                a.set_params(0, torch.full(a.param_shape, 0.02), torch.full(a.param_shape, 128.0))
            kind = type(new).__name__
            chosen[name] = fmt
        swap_module(unet, name, new)
        state.modules[f"unet/{name}"] = {"kind": kind, **rec}
    return chosen


def generate(pipe, output_type: str = "np") -> torch.Tensor:
    """Images for fixed prompts/seed. Inference mode: builtin pipelines come up in training mode, whose
    VAE attention path differs from eval mode by ~3e-7; a reloaded pipeline is in eval mode."""
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    out = pipe(prompt=["a cat"], num_inference_steps=2, guidance_scale=7.5, output_type=output_type,
               generator=torch.Generator().manual_seed(0))
    return out.images if torch.is_tensor(out.images) else torch.from_numpy(out.images)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pipe = load_pipeline("builtin:tiny-sd")
    state = CompressionState()
    chosen = quantize_unet(pipe, state)
    images = generate(pipe)
    folder = tmp_path_factory.mktemp("export") / "model"
    qmap = export_pipeline(pipe, state, folder)
    return pipe, state, chosen, images, folder, qmap


def test_reload_is_bit_identical_and_stays_packed(exported):
    pipe, _, chosen, images, folder, qmap = exported
    again, state = load_with_state(str(folder))
    packed = {n: m for n, m in again.unet.named_modules() if isinstance(m, PackedWeightMixin)}
    assert set(packed) == set(chosen)
    for name, m in packed.items():
        assert "weight" not in m._parameters
        assert all(b.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
                   for n, b in m.named_buffers() if n.startswith(("qweight", "codes", "keep")))
    assert torch.equal(generate(again), images)
    # masks of quantized layers are implied (zero codes, binary keep bits); others come back from 1-bit storage
    assert set(state.masks) == {"text_encoder/encoder.layers.0.mlp.fc1.weight"}
    assert torch.equal(state.masks["text_encoder/encoder.layers.0.mlp.fc1.weight"],
                       pipe.text_encoder.encoder.layers[0].mlp.fc1.weight != 0)


def test_codes_have_their_real_width(exported):
    pipe, _, chosen, _, folder, qmap = exported
    sd = load_file(str(folder / "unet" / PACKED_FILE))
    layers = qmap["components"]["unet"]["layers"]
    for name, fmt in chosen.items():
        entry = layers[name]
        w = pipe.unet.get_submodule(name).weight
        if fmt.startswith("binary"):
            assert sd[f"{name}.codes1"].numel() == math.ceil(w.numel() / 8)
            continue
        f0 = parse_format(entry["parts"][0]["format"])
        q = sd[f"{name}.qweight0"]
        if isinstance(f0, FPFormat) and f0.torch_dtype is not None:
            assert q.dtype == f0.torch_dtype and q.numel() == entry["parts"][0]["numel"]
        else:
            assert q.dtype == torch.uint8 and q.numel() == packed_nbytes(entry["parts"][0]["numel"], f0.bits)
        assert f"{name}.weight" not in sd
    fp32 = sum(p.numel() * 4 for p in load_pipeline("builtin:tiny-sd").unet.parameters())
    assert qmap["components"]["unet"]["bytes"] < fp32 / 3
    meta = json.loads((folder / "diffsqueeze.json").read_text())
    assert meta["quantization"]["components"]["unet"]["file"] == f"unet/{PACKED_FILE}"
    assert not list((folder / "unet").glob("diffusion_pytorch_model*"))


def test_fp16_scales_are_smaller(tiny_sd):
    layer = torch.nn.Linear(64, 16)
    q = make_quant_module(layer, {"weight_format": "int4"})
    set_weight_params(q.weight_quant, q.weight)
    p32, e32 = pack_layer(q, "float32")
    p16, e16 = pack_layer(q, "float16")
    assert e16["packed_bytes"] < e32["packed_bytes"] and p16.wscale0.dtype == torch.float16
    torch.testing.assert_close(p16.quantized_weight(), p32.quantized_weight(), rtol=1e-3, atol=1e-4)
    with pytest.raises(Exception, match="scale_dtype"):
        pack_layer(q, "bfloat8")


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_truncated_packed_file_fails_clearly(exported, tmp_path):
    dst = _copy(exported[4], tmp_path)
    f = dst / "unet" / PACKED_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot read packed weights .*truncated or damaged"):
        load_pipeline(str(dst))


def test_wrong_shapes_fail_clearly(exported, tmp_path):
    dst = _copy(exported[4], tmp_path)
    f = dst / "unet" / PACKED_FILE
    sd = load_file(str(f))
    key = next(k for k in sd if k.endswith("qweight0") and sd[k].dtype == torch.uint8)
    sd[key] = sd[key][:-1].clone()
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match="do not fit the quantization map"):
        load_pipeline(str(dst))


def test_unknown_format_in_map_fails_clearly(exported, tmp_path):
    dst = _copy(exported[4], tmp_path)
    meta = json.loads((dst / "diffsqueeze.json").read_text())
    layers = meta["quantization"]["components"]["unet"]["layers"]
    name = next(n for n, e in layers.items() if e.get("parts"))
    layers[name]["parts"][0]["format"] = "fp5_e9m9"
    (dst / "diffsqueeze.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=f"layer 'unet/{name}': unknown format 'fp5_e9m9'"):
        load_pipeline(str(dst))


def test_pickle_file_is_refused(exported, tmp_path):
    dst = _copy(exported[4], tmp_path)
    (dst / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pipeline(str(dst))


def test_truncated_masks_and_map_version_fail_clearly(exported, tmp_path):
    dst = _copy(exported[4], tmp_path)
    f = dst / "masks_packed.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ModelLoadError, match="packed masks"):
        load_pipeline(str(dst))
    meta = json.loads((dst / "diffsqueeze.json").read_text())
    meta["quantization"]["version"] = 99
    (dst / "diffsqueeze.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="quantization map version"):
        load_pipeline(str(dst))
