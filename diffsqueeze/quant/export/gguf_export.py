"""A compressed run as GGUF files that plain diffusers loads, holding the run's own codes.

Output: a diffusers pipeline folder whose compressed components hold ``config.json`` and one
``diffusion_pytorch_model.gguf`` (diffusers' key names, so ``from_single_file`` loads it without
conversion), every other component copied from the run's ``model/`` as it is, and ``LOAD.md``
with the lines that load it. Nothing of diffsqueeze is needed to load or run it.

What each layer becomes:

- a linear layer whose weight format is a GGUF type (``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``,
  ``q5_1``, ``q4_k``, ``q5_k``, ``q6_k``), rows a multiple of the type's block (32; 256 for the
  K-quants), no activation quantizer, low-rank branch or smoothing: that
  GGUF type. Its blocks are encoded from the run's decoded weight and read back through the
  ``gguf`` package's own dequantizer before anything is written: the file must give exactly the
  run's weight (the formats keep the encoder's block scales, so a learned rounding re-encodes to
  itself), otherwise the export stops naming the layer;
- every other tensor (norms, embeddings, biases): float16 when that is exact, else float32; so is
  the decoded weight of a weight-only layer GGUF has no type for (a convolution, which diffusers'
  GGUF loader keeps in float; a non-GGUF format; rows not a multiple of the block; binary weights):
  the file computes what the run computes, at more bytes, and the report lists each with its bytes;
- a layer whose computation a GGUF file cannot express (activations quantized, a low-rank branch
  or smoothing, quantizers inside attention): refused with its name and why; with
  ``allow_float`` written as its decoded weight in float instead (activation quantizers dropped),
  listed in the report as not computing what the run computes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.nn.attention import SOFTMAX_KIND
from diffsqueeze.quant.nn.binary_layers import ATTENTION_KIND, BinaryMixin
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.export.plain_component import check_diffusers_keys, exact_float, plain_tensors
from diffsqueeze.quant.primitives.gguf_bytes import GGUF_BLOCK_SIZES, GGUF_TYPE_SIZES, gguf_quantize_bytes

GGUF_FILE = "diffusion_pytorch_model.gguf"
LOAD_FILE = "LOAD.md"
REPORT_FILE = "gguf_export.json"
# the architecture name a GGUF file declares (ComfyUI and stable-diffusion.cpp read it; diffusers does not)
ARCH = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "UNet2DConditionModel": "sd1",
        "PixArtTransformer2DModel": "pixart"}


class GGUFExportError(DiffsqueezeError):
    """The run cannot be written as GGUF (a layer the format cannot express, a missing model)."""


@dataclass
class LayerChoice:
    """What one quantized layer of the run becomes in the file."""

    name: str
    stored: str  # a GGUF type name, "float16" or "float32"
    nbytes: int
    why: str | None = None  # why it is not a GGUF type (None: it is)
    exact: bool = True  # the file computes what the run computes (False: only with allow_float)


def _cannot_express(layer: nn.Module, fmt_names: list[str]) -> tuple[str | None, bool]:
    """Why ``layer`` is not stored as a GGUF type (None: it is), and whether its decoded weight in
    float still computes what the run computes (weight-only layers: yes; quantized activations, a
    low-rank branch or smoothing folded into one float weight: no)."""
    if getattr(layer, "quant_acts", False) and layer.act_quantizers():
        return "activations quantized (GGUF stores weights only)", False
    if getattr(layer, "lowrank_rank", 0):
        return "a 16-bit low-rank branch (folded into one float weight)", False
    if getattr(layer, "smooth", None) is not None:
        return "smoothing (x / s at the input, folded into the float weight)", False
    if isinstance(layer, BinaryMixin):
        return "binary weights", True
    if not isinstance(layer, nn.Linear):
        return "a convolution (diffusers' GGUF loader keeps convolutions in float)", True
    if len(fmt_names) != 1 or fmt_names[0] not in GGUF_TYPE_SIZES:
        return f"weight format {'+'.join(fmt_names) or 'float'} is no GGUF type", True
    block = GGUF_BLOCK_SIZES[fmt_names[0]]
    if layer.in_features % block:
        return f"rows of {layer.in_features} values ({fmt_names[0]} blocks need a multiple of {block})", True
    return None, True


def _formats_of(layer: nn.Module) -> list[str]:
    spec = getattr(layer, "packed_spec", None)
    if spec is not None:
        return [p["format"] for p in spec.get("parts", [])]
    return [q.fmt.name for q in layer.weight_quantizers()] if getattr(layer, "quant_weights", False) else []


def _float_array(t: torch.Tensor) -> np.ndarray:
    """:func:`.plain_component.exact_float` as the numpy array the GGUF writer takes."""
    return exact_float(t).numpy()


def component_tensors(component: nn.Module, allow_float: bool) -> tuple[dict[str, tuple[np.ndarray, Any]], list[LayerChoice]]:
    """Key -> (array, GGUF quantization type or None for float) of one compressed component, with
    diffusers' key names, and what each quantized layer became.

    Raises:
        GGUFExportError: a layer the format cannot express (without ``allow_float``), naming every
            such layer; a block that would not read back as the run's weight.
    """
    import gguf

    quant = {n: m for n, m in component.named_modules() if isinstance(m, QuantMixin)}
    refused, choices, out = [], [], {}
    for name, layer in quant.items():
        fmts = _formats_of(layer)
        why, exact = _cannot_express(layer, fmts)
        if not exact and not allow_float:
            refused.append(f"{name} ({why})")
            continue
        weight = layer.weight.detach().float().cpu()
        if why is None:
            qtype = gguf.GGMLQuantizationType[fmts[0].upper()]
            blocks = gguf_quantize_bytes(weight, fmts[0]).numpy()
            back = gguf.quants.dequantize(blocks, qtype)
            if not np.array_equal(back.view(np.uint32), weight.numpy().view(np.uint32)):
                raise GGUFExportError(f"layer {name}: its {fmts[0]} blocks do not read back as the run's weight "
                                      "(not on the format's grid); export it with --format safetensors")
            out[f"{name}.weight"] = (blocks, qtype)
            choices.append(LayerChoice(name, fmts[0], blocks.nbytes))
        else:
            arr = _float_array(weight)
            out[f"{name}.weight"] = (arr, None)
            choices.append(LayerChoice(name, str(arr.dtype), arr.nbytes, why, exact))
        if layer.bias is not None:
            out[f"{name}.bias"] = (_float_array(layer.bias), None)
    if refused:
        raise GGUFExportError(f"{len(refused)} layer(s) cannot be expressed in GGUF: {'; '.join(refused[:8])}"
                              f"{'; ...' if len(refused) > 8 else ''}; pass --allow-float to write them in float "
                              "(their computation then differs from the run's)")
    for key, t in plain_tensors(component, set(quant)):
        out[key] = (_float_array(t), None)
    return out, choices


def write_gguf(path: Path, tensors: dict[str, tuple[np.ndarray, Any]], arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key in sorted(tensors):
        arr, qtype = tensors[key]
        if qtype is None:
            writer.add_tensor(key, np.ascontiguousarray(arr))
        else:
            writer.add_tensor(key, np.ascontiguousarray(arr), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_lines(out: Path, pipe_cls: str, compressed: dict[str, str], absent: list[str]) -> str:
    """The Python lines that load the export with plain diffusers (``absent``: the pipeline's
    optional components the model does not have, passed as None as diffusers asks)."""
    classes = sorted({"DiffusionPipeline", "GGUFQuantizationConfig", *compressed.values()})
    lines = ["import torch", f"from diffusers import {', '.join(classes)}", "",
             f'folder = "{out}"', "config = GGUFQuantizationConfig(compute_dtype=torch.float32)"]
    for comp, cls in compressed.items():
        lines.append(f'{comp} = {cls}.from_single_file(f"{{folder}}/{comp}/{GGUF_FILE}", config=folder, '
                     f'subfolder="{comp}", quantization_config=config, torch_dtype=torch.float32)')
    args = ", ".join([f"{c}={c}" for c in compressed] + [f"{c}=None" for c in absent])
    lines.append(f"pipe = DiffusionPipeline.from_pretrained(folder, {args}, torch_dtype=torch.float32)  # {pipe_cls}")
    return "\n".join(lines)


def export_gguf(pipe, records: dict[str, dict], source: Path, out: Path, allow_float: bool = False) -> dict:
    """Write the GGUF export of ``pipe`` (loaded from the run's ``model/`` folder ``source``, with
    its module ``records``) to ``out``, which must not exist. Everything is written into a
    temporary folder beside ``out`` and renamed at the end, so an interrupted export leaves nothing
    under the final name. Returns the report (also written as ``gguf_export.json``).

    Raises:
        GGUFExportError: before any file is written, for what GGUF cannot express (see the module
            docstring).
    """
    components = module_components(pipe)
    compressed = sorted({k.partition("/")[0] for k in records})
    in_processors = sorted(k for k, r in records.items() if r.get("kind") in (SOFTMAX_KIND, ATTENTION_KIND))
    if in_processors and not allow_float:
        raise GGUFExportError(f"{len(in_processors)} attention module(s) quantize inside attention "
                              f"({', '.join(in_processors[:4])}{', ...' if len(in_processors) > 4 else ''}): GGUF "
                              "stores weights only; pass --allow-float to drop those quantizers")
    import diffusers

    for comp in compressed:
        cls = type(components[comp])
        if not hasattr(cls, "from_single_file"):  # diffusers reads GGUF only through its single-file loader
            raise GGUFExportError(f"{comp}: diffusers {diffusers.__version__} loads GGUF only through from_single_file, "
                                  f"which {cls.__name__} does not have; plain diffusers could not load this export")
    plans = {}
    for comp in compressed:  # every check before the first file
        tensors, choices = component_tensors(components[comp], allow_float)
        check_diffusers_keys(components[comp], set(tensors), GGUFExportError, "GGUF")
        plans[comp] = (tensors, choices)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for child in source.iterdir():
            if child.is_dir() and child.name not in compressed:
                shutil.copytree(child, tmp / child.name)
        shutil.copy2(source / "model_index.json", tmp / "model_index.json")
        report: dict[str, Any] = {"source": str(source), "format": "gguf", "components": {},
                                  "dropped_attention_quantizers": in_processors}
        for comp, (tensors, choices) in plans.items():
            (tmp / comp).mkdir()
            shutil.copy2(source / comp / "config.json", tmp / comp / "config.json")
            write_gguf(tmp / comp / GGUF_FILE, tensors, ARCH.get(type(components[comp]).__name__, "diffusers"))
            by_type: dict[str, int] = {}
            count: dict[str, int] = {}
            for c in choices:
                by_type[c.stored] = by_type.get(c.stored, 0) + c.nbytes
                count[c.stored] = count.get(c.stored, 0) + 1
            report["components"][comp] = {
                "file": f"{comp}/{GGUF_FILE}", "bytes": (tmp / comp / GGUF_FILE).stat().st_size,
                "quantized_layer_bytes": by_type, "quantized_layers": count,
                "float_layers": [{"layer": c.name, "stored": c.stored, "bytes": c.nbytes, "why": c.why,
                                  "same_computation": c.exact}
                                 for c in choices if c.why is not None]}
        index = json.loads((source / "model_index.json").read_text())
        absent = sorted(k for k, v in index.items() if isinstance(v, list) and v and v[0] is None)
        text = load_lines(out, index["_class_name"], {c: type(components[c]).__name__ for c in compressed}, absent)
        report["load"] = text
        (tmp / LOAD_FILE).write_text(f"# Loading this export with plain diffusers\n\n```python\n{text}\n```\n",
                                     encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
