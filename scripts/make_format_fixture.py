"""Write the saved-format fixture: a small packed model as a given version of diffsqueeze exports it.

The fixture (``tests/fixtures/packed_format1/``) guards the saved format: every later version must
load it and decode every stored layer to exactly the weights the exporting version decoded
(their digests in ``expected_weights.json``), and generate the same images (``expected_images.safetensors``). It holds ``builtin:tiny-sd`` with its
UNet's conv and linear layers swapped in turn to every kind of packed layer the format has:
INT (asymmetric, symmetric, 2..8 bits, per group, shortcut split), FP ExMy on the packed grid,
hardware FP8 storage, the block-scaled NVFP4/MXFP4/MXFP8, a low-rank branch with a smoothing
scale, binary order 1 and 2 (one pruned), static INT activation quantizers, and a pruning mask on
a float text-encoder layer.

    python scripts/make_format_fixture.py tests/fixtures/packed_format1

It was run on the commit that introduced it (the format as it stood before the format-protocol
refactor) and must not be re-run to "fix" a failing load test: a failure there means the
current code no longer reads models that users already have.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffsqueeze.loading import load_pipeline
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.export.save import export_pipeline
from diffsqueeze.quant.nn.binary_layers import make_binary_module
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.swaps import swap_module
from diffsqueeze.quant.primitives.formats import int_qparams

WEIGHT_FORMATS = ["int4", "int8_sym", "int3", "int2", "fp4_e2m1", "fp8_e4m3_hw", "fp6_e3m2", "fp8_e5m2_hw",
                  "fp8_e4m3", "int6_sym", "nvfp4", "mxfp4", "mxfp8", "int8"]
PROMPT, STEPS, GUIDANCE, SEED = "a cat", 2, 7.5, 0


def _set_weight_params(q, w: torch.Tensor) -> None:
    """Min/max INT parameters, or an FP bias that puts each group's absmax at the grid's top."""
    if not getattr(q, "searchable", hasattr(q, "grouped")):
        return  # block formats scale their own blocks
    g = q.grouped(w.detach())
    if q.fmt.kind == "int":
        s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), q.fmt.bits, q.fmt.symmetric)
        q.set_params(scale=s, zero_point=z)
    else:
        fmt = q.fmt
        top = (2 ** fmt.man_bits + fmt.max_man_code) / 2 ** fmt.man_bits
        q.set_params(bias=fmt.max_exp_code + math.log2(top) - torch.log2(g.abs().amax(-1, keepdim=True).clamp(min=1e-8)))


def _quantize(pipe, state: CompressionState) -> None:
    fc1 = pipe.text_encoder.encoder.layers[0].mlp.fc1
    keep = fc1.weight.abs() > fc1.weight.abs().median()
    with torch.no_grad():
        fc1.weight.mul_(keep)
    state.masks["text_encoder/encoder.layers.0.mlp.fc1.weight"] = keep
    unet = pipe.unet
    names = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    lowrank_done = False
    for i, name in enumerate(names):
        layer = unet.get_submodule(name)
        conv = isinstance(layer, torch.nn.Conv2d)
        inn = layer.in_channels if conv else layer.in_features
        if i % 3 == 0:  # prune a third of the layers 50% (INT/FP zero codes, binary keep bits)
            w = layer.weight.detach()
            mask = w.abs() > w.abs().flatten().median()
            with torch.no_grad():
                layer.weight.mul_(mask)
            state.masks[f"unet/{name}.weight"] = mask
        if i % 8 == 5:
            rec = {"order": 1 + (i // 8) % 2, "masked": i % 3 == 0, "act": {"format": "int4_sym", "shape": [1]}}
            new = make_binary_module(layer, rec)
            new.weight_quant.init_from(layer.weight)
            for a in new.act_quantizers():
                a.set_params(0, torch.tensor(0.05))
        else:
            fmt = WEIGHT_FORMATS[i % len(WEIGHT_FORMATS)]
            block = fmt in ("nvfp4", "mxfp4", "mxfp8")
            rec = {"weight_format": fmt, "group_size": 0, "split": 0}
            if conv and not block and i % 5 == 0 and inn % 2 == 0:
                rec["split"] = inn // 2
                rec["weight_format_2"] = "int8" if fmt != "int8" else "int4"
            elif not conv and not block and inn % 16 == 0 and i % 3 == 1:
                rec["group_size"] = 16
            if i % 4 == 1:
                rec["act"] = {"format": "int8", "shape": [1, inn, 1, 1] if conv and not rec["split"] else [1]}
            lowrank = not conv and not lowrank_done and not block and i % 3 != 0 and not rec["split"]
            if lowrank:
                rec.update(lowrank=2, smooth=True)
                lowrank_done = True
            new = make_quant_module(layer, rec)
            if lowrank:
                new.set_smoothing(torch.linspace(0.5, 2.0, inn))
                new.init_lowrank()
            for q, sl in new.weight_parts():
                _set_weight_params(q, new.weight[:, sl])
            for a in new.act_quantizers():
                a.set_params(0, torch.full(a.param_shape, 0.02), torch.full(a.param_shape, 128.0))
        swap_module(unet, name, new)
        state.modules[f"unet/{name}"] = {"kind": type(new).__name__, **rec}


def generate(pipe) -> torch.Tensor:
    """The fixture's images (eval mode: a reloaded pipeline is in eval mode)."""
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    out = pipe(prompt=[PROMPT], num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
               generator=torch.Generator().manual_seed(SEED))
    return torch.from_numpy(out.images).contiguous()


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal digests, bit-identical tensors."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def decoded_weights(pipe) -> dict[str, torch.Tensor]:
    """Every packed UNet layer's decoded weight, by layer name."""
    return {name: m.quantized_weight().detach().contiguous() for name, m in pipe.unet.named_modules()
            if hasattr(m, "packed_spec")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    torch.manual_seed(0)
    pipe = load_pipeline("builtin:tiny-sd")
    state = CompressionState()
    _quantize(pipe, state)
    if out.exists():
        shutil.rmtree(out)
    export_pipeline(pipe, state, out / "model")
    reloaded = load_pipeline(str(out / "model"))
    digests = {k: tensor_digest(v) for k, v in decoded_weights(reloaded).items()}
    (out / "expected_weights.json").write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    save_file({"images": generate(reloaded)}, str(out / "expected_images.safetensors"))
    print(f"wrote {out}: {len(digests)} packed layers")


if __name__ == "__main__":
    main()
