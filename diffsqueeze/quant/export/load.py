"""Reload of compressed pipelines: the artifact formats diffsqueeze writes (docs/artifacts.md).

:func:`load_packed_pipeline` rebuilds the packed components of an exported ``model/`` folder on
the ``meta`` device (no float weights are ever allocated), swaps in packed modules and assigns
the stored tensors, so the loaded pipeline keeps the weights packed in memory and decodes them
one layer at a time. :data:`ARTIFACT_FORMATS` lists every format for
:func:`diffsqueeze.models.io.load_with_state`: packed exports, and folders whose compression
state records module swaps stored as full state dicts (no packed layers, e.g. only softmax
quantizers).
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.roles import module_components
from diffsqueeze.models.state import STATE_FILE, CompressionState
from diffsqueeze.quant.export.save import (
    MAP_VERSION,
    MASKS_PACKED_FILE,
    quantization_map,
)
from diffsqueeze.quant.nn.packed import (
    FLOAT_DTYPES,
    PACKED_CLASSES,
    PackedMixin,
    empty_packed_like,
)
from diffsqueeze.quant.nn.swaps import (
    finalize_modules,
    reload_component_weights,
    restore_modules,
    swap_module,
)
from diffsqueeze.quant.primitives.block_formats import BLOCK_FORMATS
from diffsqueeze.quant.primitives.formats import FPFormat, parse_format
from diffsqueeze.quant.primitives.pack import packed_nbytes, unpack_bool


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
        if part.get("storage") == "block":
            block = BLOCK_FORMATS.get(part.get("format"))
            if block is None or part.get("bits") != block.bits or not isinstance(part.get("padded_row"), int):
                raise ModelLoadError(f"quantization map: layer '{key}': block storage needs a block format "
                                     f"({', '.join(BLOCK_FORMATS)}), its bits and padded_row; got {part.get('format')!r}")
            continue
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
            if part["storage"] == "block":
                block = BLOCK_FORMATS[part["format"]]
                n = part["shape"][0] * part["padded_row"]
                s = getattr(layer, f"wscale{i}")
                if q.dtype != torch.uint8 or q.numel() != packed_nbytes(n, block.bits) or s.numel() != n // block.block:
                    raise ModelLoadError(f"{comp}/{name}: {block.name} codes/scales have {q.numel()}/{s.numel()} "
                                         f"elements, the map's shape {part['shape']} needs "
                                         f"{packed_nbytes(n, block.bits)}/{n // block.block}")
                continue
            fmt = parse_format(part["format"])
            want = packed_nbytes(math.prod(part["shape"]), fmt.bits) if part["storage"] != "float8" else None
            if want is not None and (q.dtype != torch.uint8 or q.numel() != want):
                raise ModelLoadError(f"{comp}/{name}: packed codes have {q.numel()} {q.dtype} elements, "
                                     f"the map's {part['format']} {part['shape']} needs {want} uint8 bytes")
            if part["storage"] == "float8" and q.dtype != fmt.torch_dtype:
                raise ModelLoadError(f"{comp}/{name}: codes are {q.dtype}, the map says {fmt.torch_dtype}")


def finish_packed_load(pipe, dtype: torch.dtype) -> None:
    """After device/dtype placement: decoded weights in ``dtype``; timestep routing attached."""
    for module in module_components(pipe).values():
        for m in module.modules():
            if isinstance(m, PackedMixin):
                m.compute_dtype = dtype
                for name in ("lowrank_up", "lowrank_down"):  # stored float16; computed in the pipeline's dtype
                    p = m._parameters.get(name)
                    if p is not None and p.dtype != dtype:
                        m._parameters[name] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
    finalize_modules(pipe)


class PackedFormat:
    """A ``model/`` folder written by :func:`diffsqueeze.quant.export.save.export_pipeline`."""

    def detect(self, folder: Path, state: CompressionState) -> bool:
        return quantization_map(folder) is not None

    def build(self, folder: Path, state: CompressionState, from_pretrained):
        return load_packed_pipeline(folder, from_pretrained)

    def after_placement(self, pipe, dtype: torch.dtype) -> None:
        finish_packed_load(pipe, dtype)


class ModuleRecordsFormat:
    """A diffusers folder whose compression state records module swaps (full state dicts)."""

    def detect(self, folder: Path, state: CompressionState) -> bool:
        return bool(state.modules)

    def build(self, folder: Path, state: CompressionState, from_pretrained):
        pipe = from_pretrained(str(folder))
        restore_modules(pipe, state)
        reload_component_weights(pipe, folder, state)
        return pipe, state

    def after_placement(self, pipe, dtype: torch.dtype) -> None:
        finalize_modules(pipe)


ARTIFACT_FORMATS = (PackedFormat(), ModuleRecordsFormat())
"""Every compressed-artifact format, in the order they are tried."""
