"""What the metrics need to know about a diffusers pipeline: its denoiser, device, sampler, size.

The denoiser is the component that compression changes (a UNet or a transformer); it is found by
role (:func:`diffsqueeze.models.find_roles`), never by a fixed attribute name.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

__all__ = [
    "denoiser_name",
    "pipeline_device",
    "sampler_description",
    "denoiser_bytes",
    "sampling_defaults",
    "resolve_sampling",
    "sampling_note",
]

FALLBACK_STEPS, FALLBACK_GUIDANCE = 50, 7.5
"""Used only for a pipeline whose ``__call__`` names no default (diffusers' own usual values)."""


def denoiser_name(pipe) -> str:
    """The attribute name of the pipeline's denoiser (``unet``, ``transformer``, ...)."""
    from diffsqueeze.models import find_roles

    return find_roles(pipe).denoiser


def pipeline_device(pipe) -> torch.device:
    """The device the pipeline's denoiser runs on (a streamed one's parameters are on the meta
    device between calls: its offload hooks name where it computes)."""
    module = getattr(pipe, denoiser_name(pipe))
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
        break
    for m in module.modules():
        device = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return torch.device("cpu")


def sampler_description(pipe) -> str:
    """Scheduler class and the config entries that change sampling (for provenance)."""
    sched = pipe.scheduler
    keys = ("beta_schedule", "prediction_type", "timestep_spacing", "shift", "steps_offset", "clip_sample")
    extra = ", ".join(f"{k}={sched.config[k]}" for k in keys if k in sched.config)
    return f"{type(sched).__name__}({extra})"


def denoiser_bytes(pipe, folder: Path | None = None) -> tuple[int, str]:
    """Size of the denoiser: bytes of its files on disk where ``folder`` is a saved pipeline,
    else bytes of its parameters and buffers in memory.

    Returns:
        ``(bytes, "disk" | "memory")``.
    """
    name = denoiser_name(pipe)
    if folder is not None and (Path(folder) / name).is_dir():
        files = [p for p in (Path(folder) / name).rglob("*") if p.is_file() and p.suffix == ".safetensors"]
        if files:
            return sum(p.stat().st_size for p in files), "disk"
    module = getattr(pipe, name)
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors), "memory"


def sampling_defaults(pipe) -> tuple[int, float | None]:
    """The sampler steps and guidance scale the pipeline itself uses when a caller gives none:
    the defaults of its ``__call__`` (``builtin:fashion``: its model card's DDIM 10 steps,
    guidance 2; Stable Diffusion: 50 steps, guidance 7.5). Guidance is ``None`` for a pipeline
    that takes none (unconditional DDPM)."""
    params = inspect.signature(pipe.__call__).parameters
    if "guidance_scale" not in params:
        return int(default_of(params, "num_inference_steps", FALLBACK_STEPS)), None
    return (int(default_of(params, "num_inference_steps", FALLBACK_STEPS)),
            float(default_of(params, "guidance_scale", FALLBACK_GUIDANCE)))


def default_of(params, name: str, fallback):
    """The default of parameter ``name`` in a signature's ``params``; ``fallback`` if it has none."""
    p = params.get(name)
    value = p.default if p is not None else None
    return fallback if value is None or value is inspect.Parameter.empty else value


def resolve_sampling(pipe, steps: int | None, guidance: float | None) -> tuple[int, float | None]:
    """``steps`` and ``guidance`` where given, else the pipeline's own (:func:`sampling_defaults`);
    guidance is ``None`` for a pipeline that takes none."""
    own_steps, own_guidance = sampling_defaults(pipe)
    if own_guidance is None:
        return (own_steps if steps is None else steps), None
    return (own_steps if steps is None else steps), (own_guidance if guidance is None else guidance)


def sampling_note(given_steps: int | None, given_guidance: float | None, steps: int,
                  guidance: float | None) -> str | None:
    """Which of the sampling values :func:`resolve_sampling` returned are the model's own defaults
    rather than the caller's (``"the model's own default: guidance 7.5 (2 steps as given)"``), or
    None when every value was given and used."""
    own, given = [], []
    (own if given_steps is None else given).append(f"{steps} step{'' if steps == 1 else 's'}")
    if guidance is not None:
        (own if given_guidance is None else given).append(f"guidance {guidance:g}")
    dropped = guidance is None and given_guidance is not None
    if not own and not dropped:
        return None
    parts = [f"the model's own default{'s' if len(own) > 1 else ''}: {', '.join(own)}"] if own else []
    if dropped:
        parts.append(f"guidance {given_guidance:g} not used (the pipeline takes no guidance)")
    return "; ".join(parts) + (f" ({', '.join(given)} as given)" if given else "")
