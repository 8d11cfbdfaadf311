"""The run's FP teacher: the original model the stages learn from and the evaluation compares with.

Components no stage changes are the student's own modules (unchanged by construction: one copy
in memory). The changed ones are read again from ``recipe.model``: whole (``teacher: resident``)
or streamed from the model folder's safetensors, one layer's weights resident at a time
(``teacher: stream``; :mod:`diffsqueeze.models.streamed`). ``auto`` streams on the CPU, where a
second FP32 denoiser is what does not fit (an SDXL UNet is 10 GB), and keeps the teacher
resident on a GPU, where re-reading the weights for every forward would cost a host-to-device
copy of the whole denoiser per call.
"""

from __future__ import annotations

import logging

import torch

from diffsqueeze.loading import load_with_state, plain_model_folder
from diffsqueeze.models.io import parse_dtype
from diffsqueeze.models.streamed import streamed_component
from diffsqueeze.recipe import Recipe

log = logging.getLogger(__name__)

__all__ = ["load_teacher", "streams_teacher"]


def streams_teacher(recipe: Recipe, device: torch.device) -> bool:
    """Whether the recipe's ``teacher`` setting asks for streaming on ``device``."""
    return recipe.teacher == "stream" or (recipe.teacher == "auto" and device.type == "cpu")


def load_teacher(recipe: Recipe, pipe, written: set[str], device: torch.device, record: dict | None = None):
    """The original pipeline beside the student ``pipe`` whose components ``written`` the stages change.

    Args:
        record: filled with what was streamed and what loaded whole (the manifest's ``teacher``).
    """
    shared = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module) and name not in written}
    streamed: dict[str, torch.nn.Module] = {}
    folder = plain_model_folder(recipe.model) if streams_teacher(recipe, device) else None
    if folder is not None:
        for name in sorted(written):
            module = streamed_component(folder, name, device, parse_dtype(recipe.dtype))
            if module is not None:
                streamed[name] = module
    if recipe.teacher == "stream" and set(streamed) != written:
        log.warning("teacher: stream: %s load whole (only components of a plain diffusers folder stream: "
                    "not a builtin, a hub id or a compressed model)", ", ".join(sorted(written - set(streamed))))
    teacher = load_with_state(recipe.model, str(device), recipe.dtype, shared={**shared, **streamed})[0]
    if record is not None:
        record.update(setting=recipe.teacher, streamed=sorted(streamed), resident=sorted(written - set(streamed)),
                      shared_with_student=sorted(shared))
    return teacher
