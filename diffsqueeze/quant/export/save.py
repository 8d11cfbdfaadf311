"""Export of quantized pipelines as packed low-bit storage (docs/artifacts.md).

Layout of an exported ``model/`` folder with quantized layers:

* components without module swaps (VAE, text encoder, ...): diffusers ``save_pretrained`` files;
* every component with swaps: ``config.json`` + ``diffsqueeze_packed.safetensors``, the
  component's state dict in which each quantized layer's float weight (and weight quantizer)
  is replaced by packed codes and scales (see :mod:`diffsqueeze.quant.nn.packed`);
* ``diffsqueeze.json``: the compression state plus ``"quantization"``, the map of every packed
  layer (format, bits, parts, storage, bytes) and of compact masks;
* ``masks_packed.safetensors``: pruning masks at 1 bit per weight (masks of INT/FP-quantized
  layers are not stored: those formats have an exact zero, so a pruned weight is a zero code).

:func:`diffsqueeze.quant.export.load.load_packed_pipeline` rebuilds the packed components on the ``meta`` device (no float
weights are ever allocated), swaps in packed modules and assigns the stored tensors, so the
loaded pipeline keeps the weights packed in memory and decodes them one layer at a time.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from diffsqueeze.errors import DiffsqueezeError, ModelLoadError
from diffsqueeze.models.io import save_pipeline
from diffsqueeze.models.roles import module_components
from diffsqueeze.models.state import STATE_FILE, CompressionState
from diffsqueeze.quant.nn.packed import PackedWeightMixin, shell_from
from diffsqueeze.quant.nn.records import check_records
from diffsqueeze.quant.nn.swaps import PACKED_KINDS, RECORD_SCHEMAS
from diffsqueeze.quant.export.safetensors_writer import write_streamed
from diffsqueeze.quant.primitives.number_format import FLOAT_DTYPES

log = logging.getLogger(__name__)

MAP_VERSION = 1
PACKED_FILE = "diffsqueeze_packed.safetensors"
MASKS_PACKED_FILE = "masks_packed.safetensors"

__all__ = ["ExportError", "export_pipeline", "has_packed_export", "needs_packed_export", "pack_layer",
           "quantization_map"]


class ExportError(DiffsqueezeError):
    """A layer cannot be exported as specified."""


def needs_packed_export(state: CompressionState) -> bool:
    """True when the state records quantized/binary layers (a pruning-only run exports as before)."""
    return any(r.get("kind") in PACKED_KINDS for r in state.modules.values())


# ---- export ------------------------------------------------------------------------------------


@torch.no_grad()
def pack_layer(layer: nn.Module, scale_dtype: str = "float32") -> tuple[nn.Module | None, dict]:
    """The packed form of an in-memory quantized layer, and its map entry.

    Returns ``(None, entry)`` for a layer whose weight stays float (weights not quantized, or
    the decoded weight would not equal the in-memory one: then the entry says why).

    Raises:
        ExportError: ``scale_dtype`` is not ``float32``/``float16``.
    """
    if scale_dtype not in FLOAT_DTYPES:
        raise ExportError(f"scale_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {scale_dtype!r}")
    kind = layer.KIND
    w = layer.weight.detach()
    entry: dict[str, Any] = {"kind": kind, "weight_shape": list(w.shape), "scale_dtype": scale_dtype}
    if not getattr(layer, "quant_weights", False) or not layer.weight_quantizers():
        entry.update(storage="float", reason="weights not quantized")
        return None, entry
    w_hat = layer.quantized_weight().detach()
    fields, tensors = PACKED_KINDS[kind].encode(layer, w_hat, scale_dtype)
    entry.update(fields)
    packed = shell_from(layer, PACKED_KINDS[kind], entry)
    for name, t in tensors.items():
        packed.register_buffer(name, t)
    decoded = packed.quantized_weight()
    if scale_dtype == "float32" and not torch.equal(decoded, w_hat):
        diff = (decoded - w_hat).abs().max().item()
        entry = {"kind": kind, "weight_shape": list(w.shape), "storage": "float",
                 "reason": f"packed decode differs from the fake-quantized weight by {diff:.3g}"}
        return None, entry
    if getattr(layer, "lowrank_rank", 0):
        entry["lowrank"] = layer.lowrank_rank
    entry["packed_bytes"] = packed.packed_nbytes()
    entry["float32_bytes"] = w.numel() * 4
    return packed, entry


def _packed_state(module: nn.Module, comp: str, scale_dtype: str, allow_unpacked: bool, layers: dict,
                  implied: set[str]) -> Iterator[tuple[str, Tensor]]:
    """``module.state_dict()`` with each quantized layer's entries replaced by its packed form,
    one layer packed at a time (so a UNet's packed codes are never all in memory: they stream
    into the file). Fills ``layers`` (the map entry of each quantized layer) and ``implied``
    (masks carried by zero codes) as it goes."""
    quantized = [name for name, m in module.named_modules()
                 if getattr(m, "KIND", None) in PACKED_KINDS and not isinstance(m, PackedWeightMixin)]
    prefix_of = {name + ".": name for name in quantized}
    done: set[str] = set()
    for key, value in module.state_dict().items():
        owner = next((name for pre, name in prefix_of.items() if key.startswith(pre)), None)
        if owner is None:
            yield key, value
            continue
        if owner in done:
            continue
        done.add(owner)
        layer = module.get_submodule(owner)
        packed, entry = pack_layer(layer, scale_dtype)
        if packed is None and entry.get("reason", "").startswith("packed decode") and not allow_unpacked:
            raise ExportError(f"quantized layer {comp}/{owner} cannot be stored packed: {entry['reason']} "
                              f"(weights of dtype {layer.weight.dtype} are not exactly on the quantization grid; "
                              f"run with dtype: float32, or set export.allow_unpacked: true to keep such "
                              f"layers as float weights)")
        if packed is None and entry.get("reason", "").startswith("packed decode"):
            log.warning("layer %s/%s kept as float (export.allow_unpacked): %s", comp, owner, entry["reason"])
        layers[owner] = entry
        if packed is not None:
            implied.add(f"{comp}/{owner}.weight")
        for k, v in (packed if packed is not None else layer).state_dict(prefix=owner + ".").items():
            # the low-rank branches hold float16 values (init_lowrank rounds them): stored as float16
            yield k, (v.to(torch.float16) if k.endswith((".lowrank_up", ".lowrank_down")) else v)
        del packed


def export_pipeline(pipe, state: CompressionState, folder: Path, scale_dtype: str = "float32",
                    allow_unpacked: bool = False) -> dict:
    """Save ``pipe`` to ``folder`` with quantized layers packed (see the module docstring).

    Components without module swaps go through diffusers' ``save_pretrained``; the others are
    written as ``config.json`` + :data:`PACKED_FILE`, streamed one layer at a time. Returns the
    quantization map (also written into ``diffsqueeze.json``).

    Raises:
        ExportError: a module record does not fit its kind's schema (a model that would not
            reload; checked before anything is written), or a quantized layer's packed codes would
            not decode to its in-memory weight (unless ``allow_unpacked``: then it is stored as
            float and the map says why).
    """
    check_records(state.modules, RECORD_SCHEMAS, ExportError, "a stage wrote a record its reload would refuse")
    folder = Path(folder)
    components = module_components(pipe)
    swapped = sorted({k.partition("/")[0] for k in state.modules})
    qmap: dict[str, Any] = {"version": MAP_VERSION, "scale_dtype": scale_dtype, "components": {}, "masks": {}}
    implied: set[str] = set()
    light = CompressionState(modules=state.modules, history=state.history)  # masks: in the packed masks file
    save_pipeline(pipe, folder, light)
    for comp in swapped:
        cdir = folder / comp
        for f in list(cdir.glob("*.safetensors")) + list(cdir.glob("*.safetensors.index.json")):
            f.unlink()
        layers: dict = {}
        tensors = _packed_state(components[comp], comp, scale_dtype, allow_unpacked, layers, implied)
        # one metadata key: the safetensors writer orders several keys differently in each process
        nbytes = write_streamed(cdir / PACKED_FILE, tensors, {"format": f"diffsqueeze-packed/{MAP_VERSION}"})
        qmap["components"][comp] = {"file": f"{comp}/{PACKED_FILE}", "layers": layers, "bytes": nbytes}
    packed_masks: dict[str, Tensor] = {}
    for key, (bits, shape) in state.masks.packed().items():  # held at 1 bit per weight already
        if key in implied:
            continue  # zero codes (INT/FP) or the binary layer's own keep bits carry it
        packed_masks[key.replace("/", "::")] = bits
        qmap["masks"][key] = list(shape)
    if packed_masks:
        save_file(packed_masks, str(folder / MASKS_PACKED_FILE))
        qmap["masks_file"] = MASKS_PACKED_FILE
    meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    meta["quantization"] = qmap
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return qmap


def export_size_estimate(pipe) -> int:
    """About how many bytes :func:`export_pipeline` writes for ``pipe``: every tensor at its size,
    except the weights of quantized and binary layers at their format's bits per weight (scales,
    masks and file headers left out; close for the large layers that dominate).
    The runner checks the free disk space against it before exporting."""
    total = 0
    for component in module_components(pipe).values():
        for module in component.modules():
            bits = _weight_bits(module)
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                total += t.numel() * bits // 8 if bits and name == "weight" else t.numel() * t.element_size()
    return total


def _weight_bits(module: nn.Module) -> int | None:
    """Bits per stored weight of a quantized (or binary) layer; None for a float module."""
    if isinstance(module, PackedWeightMixin):
        return None  # already packed: its buffers are the stored codes
    order = getattr(module, "order", None)
    if order is not None and hasattr(module, "weight_quant"):
        return int(order)
    quantizers = getattr(module, "weight_quantizers", None)
    if callable(quantizers) and getattr(module, "quant_weights", False) and quantizers():
        return max(q.fmt.bits for q in quantizers())
    return None


def quantization_map(folder: Path) -> dict | None:
    """The ``quantization`` entry of ``folder/diffsqueeze.json`` (None for other folders)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("quantization")
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); the compressed model is damaged") from exc


def has_packed_export(folder: Path) -> bool:
    """True for a model folder written by :func:`export_pipeline`."""
    return quantization_map(folder) is not None
