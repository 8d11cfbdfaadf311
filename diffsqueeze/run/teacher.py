"""The run's FP teacher: the original model the stages learn from and the evaluation compares with.

Components no stage changes are the student's own modules (unchanged by construction: one copy
in memory). The changed ones are read again from ``recipe.model``: whole (``teacher: resident``)
or streamed from the model folder's safetensors, one layer's weights resident at a time
(``teacher: stream``; :mod:`diffsqueeze.models.streamed`). ``auto`` streams on the CPU, where a
second FP32 denoiser is what does not fit (an SDXL UNet is 10 GB), and keeps the teacher
resident on a GPU, where re-reading the weights for every forward would cost a host-to-device
copy of the whole denoiser per call. A component asked to stream that cannot (a builtin, a
transformers model, files whose tensor names diffusers converts while loading) loads whole, and
the manifest's ``teacher`` entry says why (``why_resident``): a warning only for ``stream``, which
asked for it explicitly.
"""

from __future__ import annotations

import logging

import torch

from diffsqueeze.loading import load_with_state, plain_model_folder
from diffsqueeze.models.io import parse_dtype
from diffsqueeze.models.streamed import NotStreamable, streamed_component
from diffsqueeze.recipe import Recipe

log = logging.getLogger(__name__)

__all__ = ["load_teacher", "streams_teacher"]


def streams_teacher(recipe: Recipe, device: torch.device) -> bool:
    """Whether the recipe's ``teacher`` setting asks for streaming on ``device``."""
    return recipe.teacher == "stream" or (recipe.teacher == "auto" and device.type == "cpu")


def load_teacher(recipe: Recipe, pipe, written: set[str], device: torch.device, record: dict | None = None):
    """The original pipeline beside the student ``pipe`` whose components ``written`` the stages change.

    Args:
        record: filled with what was streamed and what loaded whole (the manifest's ``teacher``),
            and, where the setting asked for streaming, why each resident component could not stream.
    """
    shared = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module) and name not in written}
    streamed: dict[str, torch.nn.Module] = {}
    why_resident: dict[str, str] = {}
    if streams_teacher(recipe, device):
        folder = plain_model_folder(recipe.model)
        for name in sorted(written):
            if folder is None:
                why_resident[name] = ("only a plain diffusers folder streams, "
                                      "not a builtin, a hub id or a compressed model")
                continue
            try:
                streamed[name] = streamed_component(folder, name, device, parse_dtype(recipe.dtype))
            except NotStreamable as exc:
                why_resident[name] = str(exc)
    if why_resident:
        # auto falls back quietly (the manifest says why); stream was asked for, so it warns
        (log.warning if recipe.teacher == "stream" else log.debug)(
            "teacher: %s: %s load whole (%s)", recipe.teacher, ", ".join(sorted(why_resident)),
            "; ".join(f"{name}: {why}" for name, why in sorted(why_resident.items())))
    teacher = load_with_state(recipe.model, str(device), recipe.dtype, shared={**shared, **streamed})[0]
    if record is not None:
        record.update(setting=recipe.teacher, streamed=sorted(streamed), resident=sorted(written - set(streamed)),
                      shared_with_student=sorted(shared))
        if why_resident:
            record["why_resident"] = why_resident
    return teacher
