"""Timestep routing for timestep-aware activation quantizers (docs/methods.md §5, QuEST).

A timestep-aware quantizer keeps one scale set per calibration-timestep group. Which group
applies is decided from the denoiser's *actual* timestep at each call: a forward pre-hook on
the denoiser writes it into a small :class:`TimestepContext` that the quantizers of that
denoiser share, and each quantizer maps it to the nearest calibration timestep and that
timestep's group. No globals, no hard-coded step modulus.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.nn.quantizers import ActQuantizer

ROUTING_ATTR = "_diffsqueeze_timestep_routing"


@dataclass
class TimestepContext:
    """The current denoiser timestep (``None`` outside a denoiser call)."""

    t: float | None = None


def group_assignment(n_timesteps: int, n_groups: int) -> list[int]:
    """Contiguous groups over calibration timesteps in sampling order: ``i * G // n_t``."""
    if not 1 <= n_groups <= n_timesteps:
        raise ValueError(f"need 1 <= groups ({n_groups}) <= calibration timesteps ({n_timesteps})")
    return [i * n_groups // n_timesteps for i in range(n_timesteps)]


def read_timestep(module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    """The ``timestep`` argument of a diffusers denoiser call, as a float.

    Diffusers denoisers name the argument ``timestep``, passed by position (UNet) or keyword
    (transformers); a batch carries one timestep (calibration batches never mix steps).
    """
    bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    t = bound.get("timestep")
    if t is None:
        raise ValueError(f"{type(module).__name__}.forward was called without a 'timestep' argument")
    t = torch.as_tensor(t)
    return float(t.reshape(-1)[0])


def _quantizers(denoiser: torch.nn.Module) -> list:
    return [m for m in denoiser.modules() if isinstance(m, ActQuantizer)]


def attach_timestep_routing(denoiser: torch.nn.Module) -> TimestepContext:
    """Persistently route the denoiser's timestep to its activation quantizers (idempotent).

    Used for inference on a quantized pipeline (the ptq stage attaches it to the pipeline it
    returns; :func:`prepare_pipeline` does it for reloaded pipelines).
    Stages use the scoped :func:`timestep_routing` instead.
    """
    existing = getattr(denoiser, ROUTING_ATTR, None)
    if existing is not None:
        ctx = existing[0]
    else:
        ctx = TimestepContext()

        def hook(module, args, kwargs):
            ctx.t = read_timestep(module, args, kwargs)

        handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
        object.__setattr__(denoiser, ROUTING_ATTR, (ctx, handle))
    for q in _quantizers(denoiser):
        q.tctx = ctx
    return ctx


def detach_timestep_routing(denoiser: torch.nn.Module) -> None:
    """Remove what :func:`attach_timestep_routing` installed."""
    existing = getattr(denoiser, ROUTING_ATTR, None)
    if existing is not None:
        existing[1].remove()
        object.__delattr__(denoiser, ROUTING_ATTR)
    for q in _quantizers(denoiser):
        q.tctx = None


@contextmanager
def timestep_routing(denoiser: torch.nn.Module) -> Iterator[TimestepContext]:
    """Scoped routing: the hook and links are removed in ``finally`` (persistent ones restored)."""
    previous = getattr(denoiser, ROUTING_ATTR, None)
    ctx = TimestepContext()

    def hook(module, args, kwargs):
        ctx.t = read_timestep(module, args, kwargs)

    quantizers = _quantizers(denoiser)
    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for q in quantizers:
            q.tctx = ctx
        yield ctx
    finally:
        handle.remove()
        for q in quantizers:
            q.tctx = previous[0] if previous is not None else None


def prepare_pipeline(pipe):
    """Attach timestep routing to every component with activation quantizers (after a reload).

    Loading a compressed model does this itself; call it on a pipeline whose quantized modules
    were rebuilt by other means. Returns ``pipe``.
    """
    for module in module_components(pipe).values():
        if any(isinstance(m, ActQuantizer) for m in module.modules()):
            attach_timestep_routing(module)
    return pipe
