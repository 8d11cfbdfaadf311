"""``FashionDiffusionPipeline``: a small pixel-space text-to-image pipeline (builtin:fashion).

Components are named as in Stable Diffusion (``unet``, ``text_encoder``, ``tokenizer``,
``scheduler``) so that role-based compression code finds them; there is no VAE, the UNet works
directly on 1x32x32 pixels in [-1, 1]. The call follows ``StableDiffusionPipeline``'s habits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .tokenizer import MAX_LENGTH

__all__ = ["FashionDiffusionPipeline", "FashionPipelineOutput", "scheduler_config", "unet_config"]


def unet_config() -> dict:
    """The UNet2DConditionModel architecture (cross-attention on 128-d CLIP text states)."""
    return dict(
        sample_size=32, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=128, attention_head_dim=4, norm_num_groups=8,
        # attention-pooled text states added to the time embedding: cheap, strong class conditioning
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def scheduler_config() -> dict:
    """Noise schedule shared by DDPM training and DDIM sampling (cosine betas, epsilon target)."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                clip_sample=True, clip_sample_range=1.0, timestep_spacing="trailing")


@dataclass
class FashionPipelineOutput(BaseOutput):
    """``images``: list of RGB PIL images, or a ``(N, 3, H, W)`` tensor / ``(N, H, W, 3)`` array in [0, 1]."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class FashionDiffusionPipeline(DiffusionPipeline):
    """Text-to-image on 32x32 grayscale Fashion-MNIST-like images, with classifier-free guidance.

    Args:
        unet: ``UNet2DConditionModel`` (1 -> 1 channels, epsilon prediction).
        text_encoder: ``CLIPTextModel`` (the frozen text tower of builtin:fashion-clip).
        tokenizer: ``CLIPTokenizer`` (small vocabulary, max length 16).
        scheduler: any diffusers scheduler (DDIM by default; DPM-Solver works too).
    """

    model_cpu_offload_seq = "text_encoder->unet"

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str], device: torch.device | None = None,
                      num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt: str | list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text hidden states ``(B * n, 16, 128)`` for the prompts (and the negative prompts)."""
        device = device or self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)

        def enc(texts: list[str]) -> torch.Tensor:
            ids = self.tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                 return_tensors="pt").input_ids.to(device)
            return self.text_encoder(ids)[0]

        embeds = enc(prompts).repeat_interleave(num_images_per_prompt, 0)
        neg = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                negs = [""] * len(prompts)
            elif isinstance(negative_prompt, str):
                negs = [negative_prompt] * len(prompts)
            else:
                negs = list(negative_prompt)
                if len(negs) != len(prompts):
                    raise ValueError(f"negative_prompt has {len(negs)} entries for {len(prompts)} prompts")
            neg = enc(negs).repeat_interleave(num_images_per_prompt, 0)
        return embeds, neg

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 2.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ):
        """Generate images.

        Args mirror ``StableDiffusionPipeline.__call__``; ``latents`` are the initial noise
        ``(N, 1, H, W)`` (pixel space). ``output_type``: ``"pil"`` (RGB), ``"pt"`` (``(N, 3, H, W)``
        in [0, 1]), ``"np"`` (``(N, H, W, 3)`` in [0, 1]).
        """
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        device = self._execution_device
        size = self.unet.config.sample_size
        height, width = height or size, width or size
        do_cfg = guidance_scale > 1.0
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("give `prompt` or `prompt_embeds`")
            prompt_embeds, neg = self.encode_prompt(prompt, device, num_images_per_prompt, do_cfg, negative_prompt)
            negative_prompt_embeds = negative_prompt_embeds if negative_prompt_embeds is not None else neg
        elif do_cfg and negative_prompt_embeds is None:
            _, negative_prompt_embeds = self.encode_prompt([""] * prompt_embeds.shape[0], device, 1, True)
        batch = prompt_embeds.shape[0]
        dtype = self.unet.dtype
        cond = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        cond = cond.to(device=device, dtype=dtype)

        shape = (batch, self.unet.config.in_channels, height, width)
        if latents is None:
            if isinstance(generator, list):
                if len(generator) != batch:
                    raise ValueError(f"{len(generator)} generators for a batch of {batch}")
                latents = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                                     for g in generator]).to(device)
            else:
                gdev = generator.device if generator is not None else device
                latents = torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)
        else:
            latents = latents.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        extra = {}
        import inspect

        step_params = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_params:
            extra["eta"] = eta
        if "generator" in step_params and not isinstance(generator, list):
            extra["generator"] = generator
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            inp = torch.cat([latents] * 2) if do_cfg else latents
            inp = self.scheduler.scale_model_input(inp, t)
            eps = self.unet(inp, t, encoder_hidden_states=cond, return_dict=False)[0]
            if do_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            latents = self.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, i, t, {"latents": latents})

        images = ((latents.float() + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1).cpu()
        self.maybe_free_model_hooks()
        if output_type == "pt":
            out = images.contiguous()
        else:
            out = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                out = [PIL.Image.fromarray((im * 255).round().astype(np.uint8), mode="RGB") for im in out]
        if not return_dict:
            return (out,)
        return FashionPipelineOutput(images=out)
