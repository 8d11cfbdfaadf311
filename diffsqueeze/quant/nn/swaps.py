"""Module swaps (``nn.Linear -> QuantLinear`` and the like) that checkpoints and reloads replay.

A stage that replaces a module records ``{"kind": KIND, ...config}`` under
``state.modules["<component>/<module name>"]``. Before weights are loaded into a freshly built
pipeline, :func:`restore_modules` rebuilds every recorded module with the rebuilder that
:data:`REBUILDERS` names for its kind, so ``load_state_dict`` finds the same structure the run
left. The table is static: every kind a stage can record is listed here, and loading a model
never imports a stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.roles import module_components
from diffsqueeze.models.state import CompressionState
from diffsqueeze.quant.nn.attention import rebuild_softmax_quant
from diffsqueeze.quant.nn.binary_layers import rebuild_attention_quant, rebuild_binary
from diffsqueeze.quant.nn.layers import rebuild_quant
from diffsqueeze.quant.nn.routing import prepare_pipeline

Rebuilder = Callable[[torch.nn.Module, dict], torch.nn.Module]
REBUILDERS: dict[str, Rebuilder] = {
    "QuantLinear": rebuild_quant,
    "QuantConv2d": rebuild_quant,
    "BinaryLinear": rebuild_binary,
    "BinaryConv2d": rebuild_binary,
    "QuantSoftmax": rebuild_softmax_quant,
    "BinaryDMAttention": rebuild_attention_quant,
}
"""Module-record kind -> ``fn(original_module, record) -> module to put in its place``."""


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
        ModelLoadError: an unknown kind (written by a newer diffsqueeze?) or a missing module.
    """
    components = module_components(pipe)
    for key, record in state.modules.items():
        comp, _, name = key.partition("/")
        kind = record.get("kind")
        if kind not in REBUILDERS:
            raise ModelLoadError(f"module '{key}' has unknown kind {kind!r}; known: {', '.join(sorted(REBUILDERS))}")
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
