"""Find a pipeline's components by role (denoiser, text encoders, VAE), never by model-specific code."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.errors import ModelLoadError

DENOISER_NAMES = ("unet", "transformer", "prior")


@dataclass(frozen=True)
class Roles:
    """Component names of a pipeline grouped by role."""

    denoiser: str
    text_encoders: tuple[str, ...]
    vae: str | None
    modules: tuple[str, ...]  # every nn.Module component, in the pipeline's order


def module_components(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are ``nn.Module`` s (weights live only there)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def find_roles(pipe: DiffusionPipeline) -> Roles:
    """Group the pipeline's module components by role.

    Raises:
        ModelLoadError: the pipeline has no denoiser (``unet`` / ``transformer``).
    """
    modules = module_components(pipe)
    denoisers = [n for n in DENOISER_NAMES if n in modules]
    if not denoisers:
        raise ModelLoadError(
            f"pipeline {type(pipe).__name__} has no denoiser component (looked for {', '.join(DENOISER_NAMES)}); "
            f"its module components are: {', '.join(modules) or 'none'}"
        )
    text_encoders = tuple(n for n in modules if n.startswith("text_encoder"))
    vae = "vae" if "vae" in modules else None
    return Roles(denoiser=denoisers[0], text_encoders=text_encoders, vae=vae, modules=tuple(modules))


def resolve_component(pipe: DiffusionPipeline, key: str) -> str:
    """Map a recipe's component key to a component name.

    Accepts a component name (``unet``, ``text_encoder_2``) or a role alias: ``denoiser``, or
    ``text_encoder`` / ``text_encoders`` meaning every text encoder is addressed separately by name.
    """
    roles = find_roles(pipe)
    if key == "denoiser":
        return roles.denoiser
    if key in roles.modules:
        return key
    raise ModelLoadError(
        f"component '{key}' not found in {type(pipe).__name__}; its module components are: "
        f"{', '.join(roles.modules)} (or 'denoiser')"
    )
