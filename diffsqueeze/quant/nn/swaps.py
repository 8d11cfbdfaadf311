"""Module swaps (``nn.Linear -> QuantLinear`` and the like) that checkpoints and reloads replay.

A stage that replaces a module records ``{"kind": KIND, ...config}`` under
``state.modules["<component>/<module name>"]``; ``KIND`` is a stable string that is part of the
saved format (a class attribute of the layer, or a constant for processor-level swaps), never a
Python class name. Before weights are loaded into a freshly built pipeline,
:func:`restore_modules` rebuilds every recorded module with the rebuilder that :data:`LAYER_KINDS`
gives its kind, so ``load_state_dict`` finds the same structure the run left; export and reload
find the packed class of a kind in the same table. The table is static: every kind a stage can
record is listed here, and loading a model never imports a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.roles import module_components
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.nn.attention import SOFTMAX_KIND, rebuild_softmax_quant
from diffsqueeze.quant.nn.binary_layers import ATTENTION_KIND, BinaryConv2d, BinaryLinear, rebuild_attention_quant, rebuild_binary
from diffsqueeze.quant.nn.layers import QuantConv2d, QuantLinear, rebuild_quant
from diffsqueeze.quant.nn.packed import PackedBinaryConv2d, PackedBinaryLinear, PackedQuantConv2d, PackedQuantLinear
from diffsqueeze.quant.nn.records import (
    ATTENTION_SCHEMA,
    BINARY_LAYER_SCHEMA,
    QUANT_LAYER_SCHEMA,
    SOFTMAX_SCHEMA,
    RecordSchema,
    check_records,
)
from diffsqueeze.quant.nn.routing import prepare_pipeline

Rebuilder = Callable[[torch.nn.Module, dict], torch.nn.Module]


@dataclass(frozen=True)
class LayerKind:
    """What one module-record kind is: the module a stage swaps in (None for swaps that live in an
    attention processor), its packed form for export (None: exported as a full state dict),
    ``rebuild(original_module, record) -> module`` that reloads and resume replay, and the schema of
    its saved record (:mod:`diffsqueeze.quant.nn.records`), checked before anything is rebuilt."""

    kind: str
    layer_cls: type | None
    packed_cls: type | None
    rebuild: Rebuilder
    schema: RecordSchema


LAYER_KINDS: dict[str, LayerKind] = {k.kind: k for k in (
    LayerKind(QuantLinear.KIND, QuantLinear, PackedQuantLinear, rebuild_quant, QUANT_LAYER_SCHEMA),
    LayerKind(QuantConv2d.KIND, QuantConv2d, PackedQuantConv2d, rebuild_quant, QUANT_LAYER_SCHEMA),
    LayerKind(BinaryLinear.KIND, BinaryLinear, PackedBinaryLinear, rebuild_binary, BINARY_LAYER_SCHEMA),
    LayerKind(BinaryConv2d.KIND, BinaryConv2d, PackedBinaryConv2d, rebuild_binary, BINARY_LAYER_SCHEMA),
    LayerKind(SOFTMAX_KIND, None, None, rebuild_softmax_quant, SOFTMAX_SCHEMA),
    LayerKind(ATTENTION_KIND, None, None, rebuild_attention_quant, ATTENTION_SCHEMA),
)}
"""Module-record kind -> its classes and rebuilder: the one table a new kind of swap is added to."""

RECORD_SCHEMAS: dict[str, RecordSchema] = {k.kind: k.schema for k in LAYER_KINDS.values()}
"""Module-record kind -> the schema its saved record must fit."""

PACKED_KINDS: dict[str, type] = {k.kind: k.packed_cls for k in LAYER_KINDS.values() if k.packed_cls is not None}
"""Kinds that export packed -> their packed class (the kind of a packed layer is its in-memory kind)."""


def finalize_modules(pipe: DiffusionPipeline) -> None:
    """Wiring that lives outside the modules, once swapped modules hold their weights (reload,
    resume): the hook that routes the denoiser's timestep to its quantizers. Idempotent."""
    prepare_pipeline(pipe)


def swap_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    """Replace the submodule ``name`` (dotted path) of ``root`` with ``new``; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def restore_modules(pipe: DiffusionPipeline, state: CompressionState) -> None:
    """Rebuild every module recorded in ``state.modules`` (weights are loaded afterwards).

    Raises:
        ModelLoadError: an unknown kind (written by a newer diffsqueeze?), a record that does not fit
            its kind's schema, or a missing module; every record is checked before one is rebuilt.
    """
    components = module_components(pipe)
    check_records(state.modules, RECORD_SCHEMAS)
    for key, record in state.modules.items():
        comp, _, name = key.partition("/")
        kind = record["kind"]
        if comp not in components:
            raise ModelLoadError(f"module record '{key}' names a component the pipeline does not have")
        try:
            original = components[comp].get_submodule(name)
        except AttributeError as exc:
            raise ModelLoadError(f"module record '{key}': no such module in {comp}") from exc
        swap_module(components[comp], name, LAYER_KINDS[kind].rebuild(original, record))


def reload_component_weights(pipe: DiffusionPipeline, folder: Path, state: CompressionState) -> None:
    """Load the full state dict (quantizer parameters included) of components with swapped modules."""
    components = module_components(pipe)
    for comp in sorted({k.partition("/")[0] for k in state.modules}):
        files = sorted((Path(folder) / comp).glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{Path(folder) / comp} has no safetensors weights")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        try:
            components[comp].load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"weights in {Path(folder) / comp} do not fit the recorded modules: {exc}") from exc
