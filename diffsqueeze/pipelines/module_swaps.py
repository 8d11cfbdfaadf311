"""Module swaps (``nn.Linear -> QuantLinear`` and the like) that checkpoints and reloads replay.

A stage that replaces a module records ``{"kind": KIND, ...config}`` under
``state.modules["<component>/<module name>"]``. Before weights are loaded into a freshly built
pipeline, :func:`restore_modules` rebuilds every recorded module with the rebuilder registered
for its kind, so ``load_state_dict`` finds the same structure the run left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.state import CompressionState

Rebuilder = Callable[[torch.nn.Module, dict], torch.nn.Module]
REBUILDERS: dict[str, Rebuilder] = {}
# Called with the whole pipeline once its swapped modules hold their weights (reload, resume):
# for wiring that lives outside the modules, e.g. the hook that routes timesteps to quantizers.
FINALIZERS: list[Callable[[DiffusionPipeline], object]] = []


def register_finalizer(fn: Callable[[DiffusionPipeline], object]) -> Callable[[DiffusionPipeline], object]:
    """Run ``fn(pipe)`` after every reload or resume of a pipeline with swapped modules (must be idempotent)."""
    if fn not in FINALIZERS:
        FINALIZERS.append(fn)
    return fn


def finalize_modules(pipe: DiffusionPipeline) -> None:
    """Run the registered finalizers on a pipeline whose swapped modules are rebuilt and loaded."""
    from diffsqueeze.pipelines.stage import stage_registry

    stage_registry()  # importing the stages registers their finalizers
    for fn in FINALIZERS:
        fn(pipe)


def register_module_kind(kind: str) -> Callable[[Rebuilder], Rebuilder]:
    """Register ``fn(original_module, record) -> new module`` for records of ``kind``."""

    def wrap(fn: Rebuilder) -> Rebuilder:
        REBUILDERS[kind] = fn
        return fn

    return wrap


def swap_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    """Replace the submodule ``name`` (dotted path) of ``root`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def restore_modules(pipe: DiffusionPipeline, state: CompressionState) -> None:
    """Rebuild every module recorded in ``state.modules`` (weights are loaded afterwards).

    Raises:
        ModelLoadError: an unknown kind (written by a newer diffsqueeze?) or a missing module.
    """
    from diffsqueeze.pipelines.stage import stage_registry

    stage_registry()  # importing the stages registers their module kinds
    components = module_components(pipe)
    for key, record in state.modules.items():
        comp, _, name = key.partition("/")
        kind = record.get("kind")
        if kind not in REBUILDERS:
            raise ModelLoadError(f"module '{key}' has unknown kind {kind!r}; known: {', '.join(sorted(REBUILDERS)) or 'none'}")
        if comp not in components:
            raise ModelLoadError(f"module record '{key}' names a component the pipeline does not have")
        try:
            original = components[comp].get_submodule(name)
        except AttributeError as exc:
            raise ModelLoadError(f"module record '{key}': no such module in {comp}") from exc
        swap_module(components[comp], name, REBUILDERS[kind](original, record))


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
