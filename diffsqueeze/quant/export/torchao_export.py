"""A compressed run as a diffusers folder whose denoiser holds torchao tensors, so that plain
``DiffusionPipeline.from_pretrained(folder)`` (with torchao installed, without diffsqueeze) loads it
pre-quantized and generates.

Output: each compressed component as ``config.json`` carrying ``quantization_config`` (diffusers'
``TorchAoConfig`` serialized by diffusers itself) and one ``diffusion_pytorch_model.safetensors``
whose quantized weights are torchao tensors flattened the way torchao's safetensors support does it
(``<layer>._weight_qdata``, ``<layer>._weight_scale``, ... plus the JSON in the header that diffusers
hands to ``unflatten_tensor_state_dict``); every other component copied from the run's ``model/`` as
it is; ``LOAD.md`` with the lines that load it; ``torchao_export.json`` with bytes per layout and
every layer written in float, with why.

A component takes one layout (one ``TorchAoConfig``), the one most of its linear layers map to
(:data:`LAYOUTS`): the run's codes and scales are stored as they are, and every torchao weight is
dequantized by torchao itself before anything is written; it must give the run's weight bit for bit.

- a convolution keeps its decoded weight in float (diffusers' torchao loader quantizes ``nn.Linear``
  only): same computation, more bytes, listed in the report;
- a linear layer (or a quantized convolution's activations) the layout cannot express -- another
  weight format, group-wise scales, static activation scales, a low-rank branch, smoothing, binary
  weights -- is refused by name before any file is written; with ``allow_float`` its decoded weight
  is written in float instead and the report says whether that still computes what the run computes.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.nn.attention import SOFTMAX_KIND
from diffsqueeze.quant.nn.binary_layers import ATTENTION_KIND, BinaryMixin
from diffsqueeze.quant.export.plain_component import check_diffusers_keys, exact_float, plain_tensors
from diffsqueeze.quant.nn.layers import QuantMixin

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
LOAD_FILE = "LOAD.md"
REPORT_FILE = "torchao_export.json"
TESTED_WITH = "torchao 0.18.0 with diffusers 0.42.1"
TENSOR_CLASSES = ("Int8Tensor", "Float8Tensor")  # the torchao classes this export writes
# Lower bound of a token's absmax in torchao's float8 activation scale. Without one torchao divides an
# all-zero token by a zero scale (NaN everywhere after; SD3 pads its T5 tokens with zeros when the T5
# encoder is absent) where the run keeps zeros; with it every token of absmax >= 1e-30 still gets the
# run's scale absmax / 448, and zero tokens stay zero.
FP8_ACT_LB = 1e-30


class TorchAoExportError(DiffsqueezeError):
    """The run cannot be written for torchao (a layer no layout expresses, versions that cannot load it)."""


@dataclass(frozen=True)
class Layout:
    """A torchao quantization that stores one of the run's weight formats exactly.

    Attributes:
        name: what the report and the refusals call it.
        config: the torchao config class that ``quantization_config`` names.
        weight_format: the run's weight format whose codes it holds (per output channel).
        act_format: the run's dynamic per-token activation format it computes with (None: weight-only).
    """

    name: str
    config: str
    weight_format: str
    act_format: str | None

    def torchao_config(self) -> Any:
        """The config object, with the granularities and mapping these tensors use."""
        import torchao.quantization as tq

        if self.config == "Int8DynamicActivationInt8WeightConfig":
            return tq.Int8DynamicActivationInt8WeightConfig(act_mapping_type=tq.MappingType.ASYMMETRIC,
                                                           granularity=tq.PerRow())
        if self.config == "Float8DynamicActivationFloat8WeightConfig":
            return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow(), activation_value_lb=FP8_ACT_LB)
        return getattr(tq, self.config)(granularity=tq.PerRow())

    def tensor(self, codes: Tensor, scale: Tensor) -> Tensor:
        """The torchao weight of ``codes`` (out, in) and per-row ``scale`` (out, 1), built with the
        attributes torchao's own config gives it (tests/quant/test_torchao_export.py compares them)."""
        import torchao.quantization as tq
        from torchao.float8.inference import Float8MMConfig
        from torchao.quantization.quantize_.workflows import QuantizeTensorToFloat8Kwargs, QuantizeTensorToInt8Kwargs

        block = [1, codes.shape[1]]
        if self.weight_format == "int8_sym":
            act = (QuantizeTensorToInt8Kwargs(granularity=tq.PerRow(), mapping_type=tq.MappingType.ASYMMETRIC)
                   if self.act_format else None)
            # torchao's symmetric weights carry an all-zero int8 zero point: written the same way
            return tq.Int8Tensor(codes, scale, block, torch.float32, zero_point=torch.zeros_like(scale, dtype=torch.int8),
                                 act_quant_kwargs=act)
        act = (QuantizeTensorToFloat8Kwargs(torch.float8_e4m3fn, tq.PerRow(), hp_value_lb=FP8_ACT_LB)
               if self.act_format else None)
        return tq.Float8Tensor(codes, scale, block_size=block, act_quant_kwargs=act, dtype=torch.float32,
                               mm_config=Float8MMConfig(use_fast_accum=True) if self.act_format else None)


LAYOUTS = (
    Layout("int8_weight_only", "Int8WeightOnlyConfig", "int8_sym", None),
    Layout("int8_dynamic_activation_int8_weight", "Int8DynamicActivationInt8WeightConfig", "int8_sym", "int8"),
    Layout("float8_weight_only", "Float8WeightOnlyConfig", "fp8_e4m3_hw", None),
    Layout("float8_dynamic_activation_float8_weight", "Float8DynamicActivationFloat8WeightConfig", "fp8_e4m3_hw",
           "fp8_e4m3_hw"),
)
"""Every layout this export writes; docs/artifacts.md ("torchao") says what each is and what is refused."""

# Why a weight format that looks close is not a layout's (read in torchao 0.18's source and measured;
# docs/artifacts.md, "torchao").
_INT4 = ("torchao 0.18's Int4WeightOnlyConfig stores float zero points (tinygemm: w = (q - 8) * s + z, bfloat16 "
         "only), not the run's integer ones, and has no CPU kernel")
FORMAT_HINTS = {
    "int8": "torchao's Int8Tensor linear ignores a weight zero point; quantize with format int_sym",
    "int4": _INT4,
    "int4_sym": _INT4,
}


@dataclass
class LayerChoice:
    """What one quantized layer of the run becomes in the file."""

    name: str
    stored: str  # a layout name, "float16" or "float32"
    nbytes: int
    why: str | None = None  # why it is not stored in a layout (None: it is)
    exact: bool = True  # the file computes what the run computes (False: only with allow_float)


def _activation_problem(layer: nn.Module, weight_format: str) -> tuple[Layout | None, str | None]:
    """The layout of a single-part linear layer with ``weight_format`` per output channel, by its
    activation quantizer, or why none takes it."""
    acts = layer.act_quantizers() if getattr(layer, "quant_acts", False) else []
    if not acts:
        return next(lo for lo in LAYOUTS if lo.weight_format == weight_format and lo.act_format is None), None
    aq = acts[0]
    if not aq.dynamic_group:
        return None, "static activation scales (calibrated per timestep group); torchao quantizes activations per token"
    if aq.dynamic_group < layer.in_features:
        return None, (f"dynamic activation groups of {aq.dynamic_group} < the row's {layer.in_features} inputs; "
                      "torchao's are per token")
    act = aq.format_name
    if act == "int8_sym":
        return None, "symmetric int8 activations: torchao's per-token scale is amax/127.5, the run's amax/127"
    found = [lo for lo in LAYOUTS if lo.weight_format == weight_format and lo.act_format == act]
    if not found:
        return None, f"activations {act} with weights {weight_format}: no torchao layout"
    if found[0].act_format.startswith("fp8") and (layer.in_features % 16 or layer.out_features % 16):
        return None, f"{layer.out_features}x{layer.in_features}: torchao's float8 matmul needs multiples of 16"
    return found[0], None


def classify(layer: nn.Module) -> tuple[Layout | None, str | None, bool]:
    """``(layout, None, True)`` for a layer a layout stores, else ``(None, why, exact)``: why not, and
    whether its decoded weight in float still computes what the run computes."""
    weight_only = not (getattr(layer, "quant_acts", False) and layer.act_quantizers())

    def in_float(why: str) -> tuple[None, str, bool]:
        return None, (why if weight_only else f"{why}; its activations are quantized (float drops that)"), weight_only

    if getattr(layer, "lowrank_rank", 0):
        return None, "a 16-bit low-rank branch (folded into one float weight)", False
    if getattr(layer, "smooth", None) is not None:
        return None, "smoothing (x / s at the input, folded into the float weight)", False
    if not isinstance(layer, nn.Linear):
        return in_float("a convolution (diffusers' torchao loader quantizes nn.Linear only)")
    if isinstance(layer, BinaryMixin):
        return in_float("binary weights")
    formats = [part["format"] for part in getattr(layer, "packed_spec", {}).get("parts") or []]
    if len(formats) != 1:
        return in_float(f"weight parts {'+'.join(formats) or 'not packed'} (one format per layer needed)")
    if formats[0] not in {lo.weight_format for lo in LAYOUTS}:
        return in_float(f"weight format {formats[0]}: {FORMAT_HINTS.get(formats[0], 'layouts take int8_sym or fp8_e4m3_hw')}")
    if layer.packed_spec["parts"][0]["n_groups"] != 1:
        return in_float("group-wise weight scales (the layouts hold one scale per output channel)")
    layout, why = _activation_problem(layer, formats[0])
    return (layout, None, True) if layout else (None, why, False)


def torchao_weight(name: str, layer: nn.Module, layout: Layout) -> Tensor:
    """The layer's weight as a torchao tensor holding the run's codes and scales.

    Raises:
        TorchAoExportError: torchao's dequantization of it is not the run's weight bit for bit.
    """
    weight = layer.weight.detach().float().cpu()
    scale = layer.wscale0.detach().float().cpu().reshape(-1, 1)  # the run's stored per-channel scale
    ratio = weight / scale  # the codes up to float rounding, which the cast to the code type removes
    if layout.weight_format == "int8_sym":
        codes = ratio.round().clamp(-128, 127).to(torch.int8)
    else:
        codes = ratio.to(torch.float8_e4m3fn)  # rounds to the nearest E4M3 value: the run's code
    tensor = layout.tensor(codes.contiguous(), scale.contiguous())
    if not torch.equal(tensor.dequantize().view(torch.int32), weight.view(torch.int32)):
        raise TorchAoExportError(f"layer {name}: torchao's {layout.name} weight does not dequantize to the run's "
                                 "weight bit for bit (not on the format's grid)")
    return tensor


def _tensor_nbytes(t: Tensor) -> int:
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def component_state(component: nn.Module, allow_float: bool) -> tuple[Layout | None, dict[str, Tensor], list[LayerChoice]]:
    """The component's layout, its state dict with diffusers' key names (torchao tensors for the
    layout's layers, float tensors for everything else) and what each quantized layer became.

    Raises:
        TorchAoExportError: layers the layout cannot express (without ``allow_float``), naming each.
    """
    quant = {n: m for n, m in component.named_modules() if isinstance(m, QuantMixin)}
    plans = {n: classify(m) for n, m in quant.items()}
    votes = Counter(layout.name for layout, _, _ in plans.values() if layout is not None)
    chosen = next((lo for lo in LAYOUTS if votes and votes[lo.name] == max(votes.values())), None)
    refused: dict[str, list[str]] = {}  # why -> layer names
    choices, state = [], {}
    for name, layer in quant.items():
        layout, why, exact = plans[name]
        if layout is not None and layout is not chosen:
            layout, why, exact = None, f"layout {layout.name}, not the component's {chosen.name}", layout.act_format is None
        linear_or_not_exact = isinstance(layer, nn.Linear) or not exact
        if layout is None and linear_or_not_exact and not allow_float:
            refused.setdefault(why, []).append(name)
            continue
        if layout is not None:
            tensor = torchao_weight(name, layer, layout)
            choices.append(LayerChoice(name, layout.name, _tensor_nbytes(tensor)))
        else:
            tensor = exact_float(layer.weight)
            choices.append(LayerChoice(name, str(tensor.dtype).removeprefix("torch."),
                                       tensor.numel() * tensor.element_size(), why, exact))
        state[f"{name}.weight"] = tensor
        if layer.bias is not None:
            state[f"{name}.bias"] = exact_float(layer.bias)
    if refused:
        named = "; ".join(f"{', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''} ({why})"
                          for why, names in refused.items())
        raise TorchAoExportError(f"{sum(map(len, refused.values()))} layer(s) cannot be expressed in torchao: {named}; "
                                 "pass --allow-float to write them in float")
    for key, t in plain_tensors(component, set(quant)):
        state[key] = exact_float(t)
    return chosen, state, choices


def float_linears(component: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """The linear layers whose weight is written in float: ``modules_to_not_convert``, so that
    diffusers loads them as float weights (cast to the loading dtype) rather than as torchao ones.

    Raises:
        TorchAoExportError: diffusers' name matching (a substring test) would also skip a torchao
            layer, or the class's ``_keep_in_fp32_modules`` would.
    """
    names = sorted(n for n, m in component.named_modules()
                   if isinstance(m, nn.Linear) and type(state.get(f"{n}.weight")) is torch.Tensor)
    keep = list(getattr(type(component), "_keep_in_fp32_modules", None) or [])
    for key in state:
        if type(state[key]) is torch.Tensor:
            continue
        # the rule of diffusers' TorchAoHfQuantizer.check_if_quantized_param
        hits = [k for k in names + keep if f"{k}." in key or k == key]
        if hits:
            raise TorchAoExportError(f"{key}: diffusers would load it as a float weight because it matches "
                                     f"{hits[0]!r} (modules_to_not_convert / _keep_in_fp32_modules)")
    return names


def check_versions() -> dict[str, str]:
    """The installed torchao and diffusers versions, when this export can be loaded with them.

    Raises:
        TorchAoExportError: torchao missing, or a version without what loading needs (torchao's
            safetensors support for these tensor classes; diffusers' reconstruction of them).
    """
    import diffusers

    try:  # its import chatter is dropped by diffsqueeze.console's filters
        import torchao
        from torchao.prototype.safetensors.safetensors_utils import ALLOWED_TENSORS_SUBCLASSES
    except ImportError as exc:
        raise TorchAoExportError(f"torchao with safetensors support is not installed ({exc}); pip install "
                                 f"'torchao>=0.18' (tested: {TESTED_WITH})") from None
    missing = [c for c in TENSOR_CLASSES if c not in ALLOWED_TENSORS_SUBCLASSES]
    if missing:
        raise TorchAoExportError(f"torchao {torchao.__version__} cannot read {', '.join(missing)} from safetensors "
                                 f"(tested: {TESTED_WITH})")
    try:
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer
    except ImportError:
        TorchAoHfQuantizer = None
    if TorchAoHfQuantizer is None or not hasattr(TorchAoHfQuantizer, "maybe_update_state_dict"):
        raise TorchAoExportError(f"diffusers {diffusers.__version__} cannot load torchao tensors from safetensors "
                                 f"(tested: {TESTED_WITH})")
    return {"torchao": torchao.__version__, "diffusers": diffusers.__version__}


def write_weights(path: Path, state: dict[str, Tensor]) -> None:
    """``state`` as safetensors, torchao tensors flattened with torchao's own function."""
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    tensors, metadata = flatten_tensor_state_dict(state)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={**metadata, "format": "pt"})


def load_lines(out: Path, pipe_cls: str, layouts: dict[str, str], absent: list[str], versions: dict[str, str]) -> str:
    """The Python lines that load the export with plain diffusers (``absent``: the pipeline's
    optional components the model does not have, passed as None as diffusers asks)."""
    what = ", ".join(f"{comp}: {layout}" for comp, layout in layouts.items())
    args = "".join(f", {c}=None" for c in absent)
    return "\n".join([
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        f"# needs torchao (written with torchao {versions['torchao']}, diffusers {versions['diffusers']}); "
        f"the config.json of each quantized component holds its TorchAoConfig ({what})",
        f'pipe = DiffusionPipeline.from_pretrained("{out}"{args}, torch_dtype=torch.float32)  # {pipe_cls}',
    ])


def export_torchao(pipe, records: dict[str, dict], source: Path, out: Path, allow_float: bool = False) -> dict:
    """Write the torchao export of ``pipe`` (loaded from the run's ``model/`` folder ``source``, with
    its module ``records``) to ``out``, which must not exist. Everything is written into a
    temporary folder beside ``out`` and renamed at the end, so an interrupted export leaves nothing
    under the final name. Returns the report (also written as ``torchao_export.json``).

    Raises:
        TorchAoExportError: before any file is written, for what torchao cannot express (see the
            module docstring) or versions that could not load it.
    """
    versions = check_versions()
    components = module_components(pipe)
    compressed = sorted({k.partition("/")[0] for k in records})
    in_processors = sorted(k for k, r in records.items() if r.get("kind") in (SOFTMAX_KIND, ATTENTION_KIND))
    if in_processors and not allow_float:
        raise TorchAoExportError(f"{len(in_processors)} attention module(s) quantize inside attention "
                                 f"({', '.join(in_processors[:4])}{', ...' if len(in_processors) > 4 else ''}): torchao "
                                 "quantizes linear layers only; pass --allow-float to drop those quantizers")
    from diffusers import TorchAoConfig

    plans = {}
    for comp in compressed:  # every check before the first file
        layout, state, choices = component_state(components[comp], allow_float)
        check_diffusers_keys(components[comp], set(state), TorchAoExportError, "torchao")
        if layout is None:
            raise TorchAoExportError(f"{comp}: no layer maps to a torchao layout; nothing would be quantized")
        config = TorchAoConfig(layout.torchao_config(), modules_to_not_convert=float_linears(components[comp], state))
        plans[comp] = (layout, state, choices, config.to_dict())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for child in source.iterdir():
            if child.is_dir() and child.name not in compressed:
                shutil.copytree(child, tmp / child.name)
        shutil.copy2(source / "model_index.json", tmp / "model_index.json")
        report: dict[str, Any] = {"source": str(source), "format": "torchao", "versions": versions, "components": {},
                                  "dropped_attention_quantizers": in_processors}
        for comp, (layout, state, choices, config) in plans.items():
            (tmp / comp).mkdir()
            model_config = json.loads((source / comp / "config.json").read_text(encoding="utf-8"))
            model_config["quantization_config"] = config
            (tmp / comp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True), encoding="utf-8")
            write_weights(tmp / comp / WEIGHTS_FILE, state)
            by_stored: Counter = Counter()
            count: Counter = Counter()
            for c in choices:
                by_stored[c.stored] += c.nbytes
                count[c.stored] += 1
            report["components"][comp] = {
                "file": f"{comp}/{WEIGHTS_FILE}", "bytes": (tmp / comp / WEIGHTS_FILE).stat().st_size,
                "layout": layout.name, "quantization_config": config,
                "quantized_layer_bytes": dict(by_stored), "quantized_layers": dict(count),
                "float_layers": [{"layer": c.name, "stored": c.stored, "bytes": c.nbytes, "why": c.why,
                                  "same_computation": c.exact}
                                 for c in choices if c.why is not None]}
        index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
        absent = sorted(k for k, v in index.items() if isinstance(v, list) and v and v[0] is None)
        text = load_lines(out, index["_class_name"], {c: plans[c][0].name for c in compressed}, absent, versions)
        report["load"] = text
        (tmp / LOAD_FILE).write_text(f"# Loading this export with plain diffusers\n\n```python\n{text}\n```\n",
                                     encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
