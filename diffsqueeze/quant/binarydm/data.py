"""Training and calibration batches of the ``binarize`` stage (docs/methods.md §7).

* :func:`dataset_batches`: the ``dataset`` training mode's diffusion-loss batches from
  Fashion-MNIST (:func:`check_dataset_mode` tells whether a pipeline supports that mode);
* :func:`act_init_batches`: one calibration batch of every timestep, for the activation
  quantizers' LSQ initialization;
* :func:`first_sample`: batch 1 of a recorded call, for the OP count.
"""

from __future__ import annotations

import inspect
import random
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.fashion.data import (
    FashionMNISTMissingError,
    caption,
    load_fashion_mnist,
    pad_to_32,
)
from diffsqueeze.pipelines.calibration import CalibBatch, CalibrationData
from diffsqueeze.pipelines.stage_helpers import leading_batch_size, take_rows
from diffsqueeze.quant.binarydm.config import BinaryTrainConfig


def check_dataset_mode(pipe: DiffusionPipeline, root: nn.Module) -> None:
    """Whether the ``dataset`` training mode can run on ``pipe`` (its denoiser ``root``).

    Raises:
        RecipeError: the scheduler is not DDPM-type, the pipeline is not a UNet text-to-image
            one, or Fashion-MNIST is not installed.
    """
    sched = pipe.scheduler
    if not (hasattr(sched, "add_noise") and hasattr(sched, "alphas_cumprod")):
        raise RecipeError("train.mode", f"the dataset mode needs a DDPM-type scheduler (add_noise, "
                          f"alphas_cumprod); {type(sched).__name__} has none: use mode: distill")
    if "sample" not in inspect.signature(root.forward).parameters or not hasattr(pipe, "encode_prompt"):
        raise RecipeError("train.mode", f"the dataset mode supports UNet text-to-image pipelines "
                          f"(encode_prompt, denoiser(sample, timestep, encoder_hidden_states)); "
                          f"{type(pipe).__name__} is not one: use mode: distill")
    try:
        load_fashion_mnist("train")
    except FashionMNISTMissingError as exc:
        raise RecipeError("train.dataset", str(exc)) from None


def dataset_batches(pipe, denoiser, tc: BinaryTrainConfig, device, seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Diffusion-loss batches from Fashion-MNIST: noisy inputs ``x_t`` and the scheduler's target.

    Images are padded to 32x32 in [-1, 1]; with a VAE they are repeated to 3 channels, resized
    to the VAE's sample size and encoded (latents scaled by ``scaling_factor``, shifted by
    ``shift_factor``). Captions come from the class names; ``cfg_dropout`` of them are empty.
    """
    images, labels = load_fashion_mnist("train")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sched = pipe.scheduler
    n_train = sched.config.num_train_timesteps
    vae = getattr(pipe, "vae", None)
    in_ch = denoiser.config.in_channels if hasattr(denoiser, "config") else 1
    while True:
        idx = torch.randint(0, len(images), (tc.batch_size,), generator=gen)
        x = torch.from_numpy(pad_to_32(images[idx.numpy()])).float().div(127.5).sub(1.0).unsqueeze(1)
        x = x.to(device)
        with torch.no_grad():
            if vae is not None:
                size = vae.config.sample_size
                x = x.repeat(1, 3, 1, 1)
                if x.shape[-1] != size:
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                lat = vae.encode(x).latent_dist.sample(gen if device.type == "cpu" else None)
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                x0 = (lat - shift) * vae.config.scaling_factor
            else:
                x0 = x.repeat(1, in_ch, 1, 1) if in_ch != 1 else x
            prompts = [("" if rng.random() < tc.cfg_dropout else caption(int(labels[i]), rng)) for i in idx]
            emb = pipe.encode_prompt(prompts, device, 1, False)[0]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, n_train, (tc.batch_size,), generator=gen).to(device)
        xt = sched.add_noise(x0, noise, t)
        kind = sched.config.get("prediction_type", "epsilon")
        target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
        yield {"sample": xt, "timestep": t, "encoder_hidden_states": emb.to(xt.dtype)}, target


def act_init_batches(data: CalibrationData, batch_size: int, device) -> list[CalibBatch]:
    """One batch from every calibration timestep, so that a per-tensor LSQ scale is initialized
    on the whole trajectory's activation range, not on whichever timestep is current."""
    return [next(data.batches(batch_size, device, steps=[k])) for k in range(len(data.steps))]


def first_sample(kwargs: dict) -> dict:
    """Batch-1 slice of recorded kwargs: row 0 of every tensor (nested dicts such as
    ``added_cond_kwargs`` included) whose leading dimension is the batch size."""
    return take_rows(kwargs, torch.zeros(1, dtype=torch.long), leading_batch_size((), kwargs))
