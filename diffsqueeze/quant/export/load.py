"""Reload of compressed pipelines: the artifact formats diffsqueeze writes (docs/artifacts.md).

:func:`load_packed_pipeline` rebuilds the packed components of an exported ``model/`` folder on
the ``meta`` device (no float weights are ever allocated), swaps in packed modules and assigns
the stored tensors, so the loaded pipeline keeps the weights packed in memory and decodes them
one layer at a time. :data:`ARTIFACT_FORMATS` lists every format for
:func:`diffsqueeze.models.io.read_pipeline`: packed exports, and folders whose compression
state records module swaps stored as full state dicts (no packed layers, e.g. only softmax
quantizers).
"""

from __future__ import annotations

import importlib
import json
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
from diffsqueeze.quant.nn.packed import PackedWeightMixin, empty_packed_like
from diffsqueeze.quant.nn.swaps import (
    PACKED_KINDS,
    finalize_modules,
    reload_component_weights,
    restore_modules,
    swap_module,
)
from diffsqueeze.quant.primitives.number_format import FLOAT_DTYPES
from diffsqueeze.quant.primitives.pack import unpack_bool


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
    if kind not in PACKED_KINDS:
        raise ModelLoadError(f"quantization map: layer '{key}' has unknown kind {kind!r}; known: {', '.join(PACKED_KINDS)}")
    if entry.get("storage") == "float":
        return
    if entry.get("scale_dtype") not in FLOAT_DTYPES:
        raise ModelLoadError(f"quantization map: layer '{key}' has unknown scale_dtype {entry.get('scale_dtype')!r}")
    problem = PACKED_KINDS[kind].check_entry(entry)
    if problem:
        raise ModelLoadError(f"quantization map: layer '{key}': {problem}")


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
            swap_module(module, name, empty_packed_like(layer, PACKED_KINDS[entry["kind"]], entry))
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
        problem = module.get_submodule(name).check_stored()
        if problem:
            raise ModelLoadError(f"{comp}/{name}: {problem}")


def finish_packed_load(pipe, dtype: torch.dtype) -> None:
    """After device/dtype placement: decoded weights in ``dtype``; timestep routing attached."""
    for module in module_components(pipe).values():
        for m in module.modules():
            if isinstance(m, PackedWeightMixin):
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
