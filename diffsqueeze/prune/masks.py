"""Pruning masks that survive every later stage.

Masks live in :class:`~diffsqueeze.models.state.CompressionState` keyed
``"<component>/<parameter name>"``. Later stages keep pruned weights at exactly zero with
:func:`enforce_masks` (after any weight update) and :func:`masked_gradients` (while training).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.models.roles import module_components


def mask_key(component: str, param_name: str) -> str:
    """The key of a parameter's mask: ``"unet/down_blocks.0.resnets.0.conv1.weight"``."""
    return f"{component}/{param_name}"


def masked_parameters(pipe: DiffusionPipeline, masks: dict[str, torch.Tensor]) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Yield (parameter, mask) for every mask; a mask whose parameter vanished is an error."""
    components = module_components(pipe)
    for key, mask in masks.items():
        component, name = key.split("/", 1)
        params = dict(components[component].named_parameters()) if component in components else {}
        if name not in params:
            raise KeyError(f"pruning mask '{key}' has no matching parameter in the pipeline")
        param = params[name]
        if param.shape != mask.shape:
            raise ValueError(f"pruning mask '{key}' has shape {tuple(mask.shape)}, the weight {tuple(param.shape)}")
        yield param, mask.to(param.device)


@torch.no_grad()
def enforce_masks(pipe: DiffusionPipeline, masks: dict[str, torch.Tensor]) -> None:
    """Zero every pruned weight (call after any step that writes weights)."""
    for param, mask in masked_parameters(pipe, masks):
        param.mul_(mask.to(param.dtype))


@contextmanager
def masked_gradients(pipe: DiffusionPipeline, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside the block, gradients of pruned weights are zero, so no optimizer revives them.

    (Optimizers with weight decay or momentum can still move a zero weight; call
    :func:`enforce_masks` after each step as well.)
    """
    handles = []
    try:
        for param, mask in masked_parameters(pipe, masks):
            if param.requires_grad:  # the bool mask, not a float copy: a quarter of the weight's bytes
                handles.append(param.register_hook(lambda g, m=mask: g * m))
        yield
    finally:
        for h in handles:
            h.remove()


def sparsity_of(masks: dict[str, torch.Tensor]) -> float:
    """Fraction of masked-out entries over all masks."""
    total = sum(m.numel() for m in masks.values())
    return 0.0 if total == 0 else 1.0 - sum(int(m.sum()) for m in masks.values()) / total
