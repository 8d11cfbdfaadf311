"""Tiny random-weight pipelines of the families users compress, built from diffusers' own classes.

One per family (SDXL with its added time ids, Flux with packed latents and distilled guidance,
PixArt-alpha with a T5 encoder, an unconditional DDPM UNet, a class-conditional DiT): they carry
the real call conventions, latent layouts and conditioning of their full-size models at a size
that runs every stage on a CPU in seconds. The T5 slots use the offline character tokenizer
(:mod:`diffsqueeze.models.tokenizer`): a tokenizer only has to turn text into ids here, and no
T5 vocabulary can be downloaded.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from diffsqueeze.models.tokenizer import build_char_tokenizer

VOCAB = 514  # len(build_char_tokenizer())

# DiT's class labels: a few ImageNet-style names, so prompts can name them ("tabby cat")
TINY_DIT_LABELS = {0: "tabby cat", 1: "golden retriever", 2: "sports car", 3: "red wine",
                   4: "volcano", 5: "daisy", 6: "pizza", 7: "sailboat"}


def clip_config(hidden: int = 32, layers: int = 2, projection: int = 32) -> CLIPTextConfig:
    """A CLIP text encoder config over the character tokenizer's vocabulary."""
    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                          projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_vae(latent_channels: int = 4, levels: int = 2, **extra) -> AutoencoderKL:
    """A KL autoencoder with ``levels`` resolutions (latents ``2 ** (levels - 1)`` times smaller
    than the images): two levels give 32x32 images from 16x16 latents."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=(16,) + (32,) * (levels - 1), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32, **extra)


def _tiny_t5(d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=1,
                                   eos_token_id=1, decoder_start_token_id=0))


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL architecture: UNet with text-time added conditions (pooled text embeds and time ids),
    two CLIP text encoders whose hidden states are concatenated; 32x32 images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=8)
        vae = tiny_vae()
        text_encoder = CLIPTextModel(clip_config())
        text_encoder_2 = CLIPTextModelWithProjection(clip_config())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=build_char_tokenizer(), tokenizer_2=build_char_tokenizer(),
                                     unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)


def build_tiny_flux() -> FluxPipeline:
    """Flux architecture: double- and single-stream MMDiT blocks on packed (batch, tokens, 16)
    latents with rotary position ids, CLIP pooled + T5 sequence conditioning, guidance distilled
    into an input embedding; the pipeline's default size is 256x256 (its 128 latent default
    times the VAE's factor 2); recipes set ``height``/``width`` 32 for 8x8 packed tokens."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))
        vae = tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                       use_post_quant_conv=False)
        text_encoder = CLIPTextModel(clip_config())
        text_encoder_2 = _tiny_t5()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=build_char_tokenizer(), text_encoder_2=text_encoder_2,
                        tokenizer_2=build_char_tokenizer(), transformer=transformer)


def build_tiny_pixart() -> PixArtAlphaPipeline:
    """PixArt-alpha architecture: DiT blocks with cross-attention to T5 embeddings and AdaLN-single
    timestep conditioning (``added_cond_kwargs``); 256x256 images from 32x32 latents (the
    pipeline bins every size to its own table, 256 px the smallest, so no smaller size exists)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, caption_channels=32, sample_size=32, patch_size=2,
            norm_type="ada_norm_single", use_additional_conditions=False)
        vae = tiny_vae(levels=4)
        text_encoder = _tiny_t5()
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return PixArtAlphaPipeline(tokenizer=build_char_tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=scheduler)


def build_tiny_ddpm() -> DDPMPipeline:
    """An unconditional pixel-space UNet (DDPM, as in the papers' LSUN / CIFAR rows); 32x32 images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                           block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                           attention_head_dim=8)
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def build_tiny_class_dit() -> DiTPipeline:
    """A class-conditional latent DiT (the ImageNet LDM layout: 1000 classes plus the null class
    of classifier-free guidance); labels in :data:`TINY_DIT_LABELS`; 32x32 images."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
        vae = tiny_vae()
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=dict(TINY_DIT_LABELS))
