"""Export of quantized pipelines as packed low-bit storage, and their reload (docs/artifacts.md).

Layout of an exported ``model/`` folder with quantized layers:

* components without module swaps (VAE, text encoder, ...): diffusers ``save_pretrained`` files;
* every component with swaps: ``config.json`` + ``diffsqueeze_packed.safetensors``, the
  component's state dict in which each quantized layer's float weight (and weight quantizer)
  is replaced by packed codes and scales (see :mod:`diffsqueeze.quant.packed_modules`);
* ``diffsqueeze.json``: the compression state plus ``"quantization"``, the map of every packed
  layer (format, bits, parts, storage, bytes) and of compact masks;
* ``masks_packed.safetensors``: pruning masks at 1 bit per weight (masks of INT/FP-quantized
  layers are not stored: those formats have an exact zero, so a pruned weight is a zero code).

:func:`load_packed_pipeline` rebuilds the packed components on the ``meta`` device (no float
weights are ever allocated), swaps in packed modules and assigns the stored tensors, so the
loaded pipeline keeps the weights packed in memory and decodes them one layer at a time.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffsqueeze.errors import ModelLoadError
import diffsqueeze.models  # noqa: F401  (import order: models before pipelines.module_swaps, as quant.modules does)
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.module_swaps import restore_modules, swap_module
from diffsqueeze.pipelines.state import STATE_FILE, CompressionState
from diffsqueeze.quant.binary import binary_bases
from diffsqueeze.quant.binary_modules import BinaryMixin
from diffsqueeze.quant.formats import FPFormat, bias_to_scale, fp_encode, int_code_range, parse_format
from diffsqueeze.quant.modules import QuantMixin
from diffsqueeze.quant.pack import pack_bool, pack_codes, packed_nbytes, unpack_bool
from diffsqueeze.quant.packed_modules import (
    FLOAT_DTYPES,
    PACKED_CLASSES,
    PackedMixin,
    empty_packed_like,
    shell_from,
)

log = logging.getLogger(__name__)

MAP_VERSION = 1
PACKED_FILE = "diffsqueeze_packed.safetensors"
MASKS_PACKED_FILE = "masks_packed.safetensors"

__all__ = ["ExportError", "export_pipeline", "has_packed_export", "load_packed_pipeline", "needs_packed_export",
           "pack_layer", "quantization_map"]


class ExportError(RuntimeError):
    """A layer cannot be exported as specified."""


def needs_packed_export(state: CompressionState) -> bool:
    """True when the state records quantized/binary layers (a pruning-only run exports as before)."""
    return any(r.get("kind") in PACKED_CLASSES for r in state.modules.values())


# ---- export ------------------------------------------------------------------------------------


def _part_spec(q, part_w_hat: Tensor, scale_dtype: str) -> tuple[dict, dict[str, Tensor]]:
    """Codes and scales of one weight part (``w_hat`` already on the quantizer's grid)."""
    fmt = q.fmt
    shape = tuple(part_w_hat.shape)
    g = q.grouped(part_w_hat)
    out, ng = g.shape[0], g.shape[1]
    sdt = FLOAT_DTYPES[scale_dtype]
    tensors: dict[str, Tensor] = {}
    if isinstance(fmt, FPFormat):
        scale = bias_to_scale(fmt, q.bias.detach().to(torch.float32))
        codes = fp_encode(g, fmt, q.bias.detach().to(torch.float32))
        if fmt.torch_dtype is not None:
            storage = "float8"
            tensors["qweight"] = codes.reshape(shape).contiguous().view(fmt.torch_dtype)
        else:
            storage = f"packed{fmt.bits}"
            tensors["qweight"] = pack_codes(codes, fmt.bits)
    else:
        lo, hi = int_code_range(fmt.bits, fmt.symmetric)
        zp = q.zero_point.detach()
        qv = torch.clamp(torch.round(g / q.scale) + zp, lo, hi)
        tensors["qweight"] = pack_codes((qv - lo).to(torch.int32), fmt.bits)
        storage = f"packed{fmt.bits}"
        scale = q.scale.detach()
        if not fmt.symmetric:
            tensors["wzero"] = zp.to(torch.uint8)
    tensors["wscale"] = scale.to(sdt).contiguous()
    spec = {"format": fmt.name, "kind": fmt.kind, "bits": fmt.bits, "shape": list(shape), "numel": g.numel(),
            "group_size": q.group_size, "n_groups": ng, "storage": storage, "scale_dtype": scale_dtype}
    return spec, tensors


def _binary_tensors(layer: BinaryMixin, w_hat_dtype: torch.dtype, scale_dtype: str) -> tuple[dict, dict[str, Tensor]]:
    wq = layer.weight_quant
    w = layer.weight.detach()
    mask = wq.mask_of(w)
    b1, b2 = binary_bases(w, wq.a1.detach().to(w.dtype), wq.order, mask)
    sdt = FLOAT_DTYPES[scale_dtype]
    tensors = {"codes1": pack_bool(b1 > 0), "a1": wq.a1.detach().to(sdt).contiguous()}
    if wq.order == 2:
        tensors["codes2"] = pack_bool(b2 > 0)
        tensors["a2"] = wq.a2.detach().to(sdt).contiguous()
    if mask is not None:
        tensors["keep"] = pack_bool(mask)
    spec = {"order": wq.order, "masked": mask is not None, "bits": 1, "format": f"binary_order{wq.order}",
            "storage": "packed1", "scale_dtype": scale_dtype}
    return spec, tensors


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
    kind = type(layer).__name__
    w = layer.weight.detach()
    entry: dict[str, Any] = {"kind": kind, "weight_shape": list(w.shape), "scale_dtype": scale_dtype}
    if not getattr(layer, "quant_weights", False) or (not isinstance(layer, BinaryMixin) and not layer.weight_quantizers()):
        entry.update(storage="float", reason="weights not quantized")
        return None, entry
    w_hat = layer.quantized_weight().detach()
    tensors: dict[str, Tensor] = {}
    if isinstance(layer, BinaryMixin):
        bspec, tensors = _binary_tensors(layer, w_hat.dtype, scale_dtype)
        entry.update(bspec)
        summary = f"binary order {bspec['order']}"
    else:
        entry["parts"] = []
        for i, (q, sl) in enumerate(layer.weight_parts()):
            pspec, ptensors = _part_spec(q, w_hat[:, sl], scale_dtype)
            entry["parts"].append(pspec)
            tensors.update({f"{k}{i}": v for k, v in ptensors.items()})
        entry["mask"] = "zero_codes"
        entry["storage"] = "packed"
        summary = "+".join(p["format"] for p in entry["parts"])
    entry["summary"] = summary
    packed = shell_from(layer, kind, entry)
    for name, t in tensors.items():
        packed.register_buffer(name, t)
    decoded = packed.quantized_weight()
    if scale_dtype == "float32" and not torch.equal(decoded, w_hat):
        diff = (decoded - w_hat).abs().max().item()
        log.warning("layer %s: packed weight differs from the in-memory one (max %.3g); kept as float", kind, diff)
        entry = {"kind": kind, "weight_shape": list(w.shape), "storage": "float",
                 "reason": f"packed decode differs from the fake-quantized weight by {diff:.3g}"}
        return None, entry
    entry["packed_bytes"] = packed.packed_nbytes()
    entry["float32_bytes"] = w.numel() * 4
    return packed, entry


def _component_state(module: nn.Module, prefix: str, packs: dict[str, nn.Module]) -> dict[str, Tensor]:
    """``module.state_dict()`` with the packed layers in place of the in-memory ones."""
    originals = {name: module.get_submodule(name) for name in packs}
    try:
        for name, packed in packs.items():
            swap_module(module, name, packed)
        sd = module.state_dict()
    finally:
        for name, orig in originals.items():
            swap_module(module, name, orig)
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def export_pipeline(pipe, state: CompressionState, folder: Path, scale_dtype: str = "float32") -> dict:
    """Save ``pipe`` to ``folder`` with quantized layers packed (see the module docstring).

    Components without module swaps go through diffusers' ``save_pretrained``; the others are
    written as ``config.json`` + :data:`PACKED_FILE`. Returns the quantization map (also
    written into ``diffsqueeze.json``).
    """
    from diffsqueeze.models.io import save_pipeline

    folder = Path(folder)
    components = module_components(pipe)
    swapped = sorted({k.partition("/")[0] for k in state.modules})
    qmap: dict[str, Any] = {"version": MAP_VERSION, "scale_dtype": scale_dtype, "components": {}, "masks": {}}
    packed_masks: dict[str, Tensor] = {}
    kept_masks: dict[str, Tensor] = {}
    implied: set[str] = set()
    packs_of: dict[str, dict[str, nn.Module]] = {}
    for comp in swapped:
        layers, packs = {}, {}
        for name, m in components[comp].named_modules():
            if type(m).__name__ in PACKED_CLASSES and isinstance(m, QuantMixin) and not isinstance(m, PackedMixin):
                packed, entry = pack_layer(m, scale_dtype)
                layers[name] = entry
                if packed is not None:
                    packs[name] = packed
                    implied.add(f"{comp}/{name}.weight")
        packs_of[comp] = packs
        qmap["components"][comp] = {"file": f"{comp}/{PACKED_FILE}", "layers": layers}
    for key, mask in state.masks.items():
        if key in implied:
            continue  # zero codes (INT/FP) or the binary layer's own keep bits carry it
        packed_masks[key.replace("/", "::")] = pack_bool(mask.cpu())
        qmap["masks"][key] = list(mask.shape)
    light = CompressionState(masks=kept_masks, modules=state.modules, history=state.history)
    save_pipeline(pipe, folder, light)
    for comp in swapped:
        cdir = folder / comp
        for f in list(cdir.glob("*.safetensors")) + list(cdir.glob("*.safetensors.index.json")):
            f.unlink()
        sd = _component_state(components[comp], "", packs_of[comp])
        save_file(sd, str(cdir / PACKED_FILE), metadata={"format": "diffsqueeze-packed", "version": str(MAP_VERSION)})
        qmap["components"][comp]["bytes"] = (cdir / PACKED_FILE).stat().st_size
    if packed_masks:
        save_file(packed_masks, str(folder / MASKS_PACKED_FILE))
        qmap["masks_file"] = MASKS_PACKED_FILE
    meta = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    meta["quantization"] = qmap
    (folder / STATE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return qmap


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


# ---- reload ------------------------------------------------------------------------------------


def _component_class(folder: Path, comp: str) -> type:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    lib, cls_name = index.get(comp, [None, None])
    if lib not in ("diffusers", "transformers"):
        raise ModelLoadError(f"{folder}: packed component '{comp}' has class {lib}.{cls_name}; "
                             f"only diffusers and transformers models can be reloaded packed")
    return getattr(importlib.import_module(lib), cls_name)


def _empty_component(folder: Path, comp: str) -> nn.Module:
    """The component built from its config with parameters on the meta device."""
    from accelerate import init_empty_weights

    cls = _component_class(folder, comp)
    cdir = folder / comp
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "load_config"):
            return cls.from_config(cls.load_config(str(cdir)))
        config = cls.config_class.from_pretrained(str(cdir))
        return cls._from_config(config)


def _read_safetensors(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"{what} {path} is missing")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise ModelLoadError(f"cannot read {what} {path}: {type(exc).__name__}: {exc} (truncated or damaged file?)") from exc


def _check_entry(key: str, entry: dict) -> None:
    kind = entry.get("kind")
    if kind not in PACKED_CLASSES:
        raise ModelLoadError(f"quantization map: layer '{key}' has unknown kind {kind!r}; known: {', '.join(PACKED_CLASSES)}")
    if entry.get("storage") == "float":
        return
    if entry.get("scale_dtype") not in FLOAT_DTYPES:
        raise ModelLoadError(f"quantization map: layer '{key}' has unknown scale_dtype {entry.get('scale_dtype')!r}")
    if kind.startswith("Binary"):
        if entry.get("order") not in (1, 2):
            raise ModelLoadError(f"quantization map: layer '{key}' has binary order {entry.get('order')!r}; known: 1, 2")
        return
    for part in entry.get("parts") or [None]:
        if not isinstance(part, dict):
            raise ModelLoadError(f"quantization map: layer '{key}' has no weight parts")
        try:
            fmt = parse_format(part["format"])
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"quantization map: layer '{key}': unknown format {part.get('format')!r} ({exc})") from None
        want = "float8" if isinstance(fmt, FPFormat) and fmt.torch_dtype is not None else f"packed{fmt.bits}"
        if part.get("storage") != want or part.get("bits") != fmt.bits:
            raise ModelLoadError(f"quantization map: layer '{key}': storage {part.get('storage')!r} / bits "
                                 f"{part.get('bits')!r} do not match format {fmt.name} (expected {want}, {fmt.bits})")


def load_packed_pipeline(folder: Path, from_pretrained: Callable[..., Any]) -> tuple[Any, CompressionState]:
    """Rebuild a pipeline exported by :func:`export_pipeline`, weights kept packed.

    Args:
        folder: the exported ``model/`` folder.
        from_pretrained: ``fn(where, **prebuilt_components) -> pipeline`` (diffsqueeze's
            safetensors-only loader).

    Raises:
        ModelLoadError: damaged or tampered artifacts: unreadable/truncated safetensors, a map
            naming an unknown format or kind, tensors whose shapes or dtypes differ from the map.
    """
    folder = Path(folder)
    qmap = quantization_map(folder)
    if not isinstance(qmap, dict) or qmap.get("version") != MAP_VERSION:
        raise ModelLoadError(f"{folder / STATE_FILE}: unsupported quantization map version "
                             f"{(qmap or {}).get('version')!r} (this diffsqueeze reads {MAP_VERSION})")
    for comp, c in qmap["components"].items():
        for name, entry in c["layers"].items():
            _check_entry(f"{comp}/{name}", entry)
    state = CompressionState.load(folder)
    prebuilt = {comp: _empty_component(folder, comp) for comp in qmap["components"]}
    pipe = from_pretrained(str(folder), **prebuilt)
    restore_modules(pipe, state)
    components = module_components(pipe)
    for comp, c in qmap["components"].items():
        module = components[comp]
        for name, entry in c["layers"].items():
            if entry.get("storage") == "float":
                continue
            try:
                layer = module.get_submodule(name)
            except AttributeError as exc:
                raise ModelLoadError(f"quantization map: no layer '{name}' in {comp}") from exc
            swap_module(module, name, empty_packed_like(layer, entry["kind"], entry))
        sd = _read_safetensors(folder / c["file"], "packed weights")
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"packed weights {folder / c['file']} do not fit the quantization map: {exc}") from exc
        _check_loaded(module, comp, c["layers"])
    if qmap.get("masks"):
        stored = _read_safetensors(folder / qmap.get("masks_file", MASKS_PACKED_FILE), "packed masks")
        for key, shape in qmap["masks"].items():
            packed = stored.get(key.replace("/", "::"))
            if packed is None:
                raise ModelLoadError(f"packed masks lack '{key}'")
            try:
                state.masks[key] = unpack_bool(packed, tuple(shape))
            except ValueError as exc:
                raise ModelLoadError(f"packed mask '{key}': {exc}") from exc
    return pipe, state


def _check_loaded(module: nn.Module, comp: str, layers: dict) -> None:
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise ModelLoadError(f"{comp}: '{name}' was not in the packed weights file")
    for name, entry in layers.items():
        if entry.get("storage") == "float":
            continue
        layer = module.get_submodule(name)
        for i, part in enumerate(entry.get("parts", [])):
            q = getattr(layer, f"qweight{i}")
            fmt = parse_format(part["format"])
            want = packed_nbytes(math.prod(part["shape"]), fmt.bits) if part["storage"] != "float8" else None
            if want is not None and (q.dtype != torch.uint8 or q.numel() != want):
                raise ModelLoadError(f"{comp}/{name}: packed codes have {q.numel()} {q.dtype} elements, "
                                     f"the map's {part['format']} {part['shape']} needs {want} uint8 bytes")
            if part["storage"] == "float8" and q.dtype != fmt.torch_dtype:
                raise ModelLoadError(f"{comp}/{name}: codes are {q.dtype}, the map says {fmt.torch_dtype}")


def describe_packed(module: nn.Module) -> dict[str, dict]:
    """Per packed layer: storage, real bytes of its packed state (for ``inspect``)."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, PackedMixin):
            out[name] = {"packed": m.packed_spec.get("summary", ""), "packed_bytes": m.packed_nbytes()}
    return out


def remove_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def finish_packed_load(pipe, dtype: torch.dtype) -> None:
    """After device/dtype placement: decoded weights in ``dtype``; timestep routing attached."""
    from diffsqueeze.quant.ptq import prepare_pipeline

    for module in module_components(pipe).values():
        for m in module.modules():
            if isinstance(m, PackedMixin):
                m.compute_dtype = dtype
    prepare_pipeline(pipe)
