"""Builtin pipelines, addressed as ``builtin:NAME``: built in code, no download.

``tiny-sd`` and ``tiny-dit`` have seeded random weights and serve tests and smoke runs; they are
real diffusers pipelines (Stable Diffusion and Stable Diffusion 3 architectures), so everything
that works on them goes through the same code paths as on full-size models. ``tiny-sdxl``,
``tiny-flux``, ``tiny-pixart``, ``tiny-ddpm`` (unconditional) and ``tiny-class-dit`` cover the
other families (:mod:`diffsqueeze.models.tiny_families`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models import tiny_families
from diffsqueeze.models.tokenizer import build_char_tokenizer

BUILTINS: dict[str, Callable[[], DiffusionPipeline]] = {}


def register_builtin(name: str) -> Callable[[Callable[[], DiffusionPipeline]], Callable[[], DiffusionPipeline]]:
    """Register a zero-argument builder under ``builtin:<name>``."""

    def wrap(builder: Callable[[], DiffusionPipeline]) -> Callable[[], DiffusionPipeline]:
        BUILTINS[name] = builder
        return builder

    return wrap


def build_builtin(name: str) -> DiffusionPipeline:
    """Build ``builtin:<name>``; unknown names raise :class:`ModelLoadError` listing the known ones."""
    if name not in BUILTINS:
        raise ModelLoadError(f"unknown builtin model 'builtin:{name}'; known: {', '.join(sorted(BUILTINS))}")
    return BUILTINS[name]()


@register_builtin("tiny-sd")
def build_tiny_sd() -> StableDiffusionPipeline:
    """Stable-Diffusion architecture (UNet with cross-attention, CLIP text encoder, VAE), random weights, seed 0.

    Images are 32x32 (latents 4x16x16).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = tiny_families.tiny_vae()
        text_encoder = CLIPTextModel(tiny_families.clip_config())
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_char_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


@register_builtin("tiny-dit")
def build_tiny_dit() -> StableDiffusion3Pipeline:
    """Stable-Diffusion-3 architecture (MMDiT transformer denoiser, two CLIP text encoders, no T5), seed 0.

    Images are 32x32 (latents 4x16x16).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=32,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=32,
        )
        vae = tiny_families.tiny_vae(shift_factor=0.0609, scaling_factor=1.5035)
        text_encoder = CLIPTextModelWithProjection(tiny_families.clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(tiny_families.clip_config())
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_char_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_char_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


register_builtin("tiny-sdxl")(tiny_families.build_tiny_sdxl)
register_builtin("tiny-flux")(tiny_families.build_tiny_flux)
register_builtin("tiny-pixart")(tiny_families.build_tiny_pixart)
register_builtin("tiny-ddpm")(tiny_families.build_tiny_ddpm)
register_builtin("tiny-class-dit")(tiny_families.build_tiny_class_dit)


@register_builtin("fashion")
def build_fashion() -> DiffusionPipeline:
    """The trained Fashion-MNIST text-to-image model (docs/builtin-model.md), 1x32x32 pixel space."""
    from diffsqueeze.models.fashion import (
        BuiltinWeightsMissingError,
        build_fashion_pipeline,
    )

    try:
        return build_fashion_pipeline()
    except BuiltinWeightsMissingError as exc:
        raise ModelLoadError(str(exc)) from None
