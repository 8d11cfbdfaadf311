#!/usr/bin/env python
"""Train the builtin text-to-image model (builtin:fashion) on Fashion-MNIST.

Pixel-space DDPM (epsilon prediction, cosine betas, 1000 steps) of a small UNet2DConditionModel
cross-attending to the frozen text tower of builtin:fashion-clip (train that first). Captions come
from the class names with random templates; 10% are replaced by the empty prompt, for
classifier-free guidance. Constant learning rate after warm-up and an EMA of the weights (the EMA is
what ships), so a run can be stopped at any step. Seeded (batches drawn from ``(seed, step)``) and
resumable from an atomic safetensors checkpoint written every ``--ckpt-every`` seconds.

    python scripts/train_fashion_diffusion.py --steps 4000 --batch 32
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffsqueeze.models.fashion.checkpoint import load_checkpoint, save_checkpoint
from diffsqueeze.models.fashion.clip import (
    CLIP_DIR,
    WEIGHTS_DIR,
    load_fashion_clip,
    tokenize,
)
from diffsqueeze.models.fashion.data import (
    CLASS_NAMES,
    TEMPLATES,
    caption,
    load_fashion_mnist,
    pad_to_32,
    to_model_range,
)
from diffsqueeze.models.fashion.pipeline import (
    FashionDiffusionPipeline,
    scheduler_config,
    unet_config,
)

log = logging.getLogger("train_fashion_diffusion")


def text_encoder_from_clip(clip):
    """A standalone ``CLIPTextModel`` holding the CLIP's text tower (the diffusion conditioner)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval().requires_grad_(False)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, constant, then (with --decay-steps) a linear cool-down to 0 at --steps.

    The cool-down only touches the last steps, so a run extended from a constant-lr checkpoint
    with ``--steps OLD+N --decay-steps N`` is the same as one that had those arguments from the
    start; the EMA of the weights then averages over a settling model, not a noisy one.
    """
    lr = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_steps:
        lr *= min(1.0, max(0.0, (args.steps - step) / args.decay_steps))
    return lr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--decay-steps", type=int, default=0,
                    help="decay the learning rate linearly to 0 over the last N of --steps (0: constant)")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip", type=Path, default=CLIP_DIR)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/fashion_diffusion_ckpt.safetensors"))
    ap.add_argument("--ckpt-every", type=float, default=180.0, help="seconds between checkpoints")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "pipeline")
    ap.add_argument("--max-minutes", type=float, default=0.0,
                    help="stop early (and save) once the run's total training time passes this")
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

    images, labels = load_fashion_mnist("train")
    x_all = torch.from_numpy(to_model_range(pad_to_32(images)))[:, None]
    y_all = torch.from_numpy(labels)

    clip, tokenizer = load_fashion_clip(args.clip)
    text_encoder = text_encoder_from_clip(clip)
    with torch.no_grad():  # frozen conditioner: pre-compute every caption's hidden states
        ids = torch.stack([tokenize(tokenizer, [caption(c, template=t) for t in range(len(TEMPLATES))])
                           for c in range(len(CLASS_NAMES))])
        cond = text_encoder(ids.flatten(0, 1))[0].unflatten(0, ids.shape[:2])  # (10, T, L, D)
        uncond = text_encoder(tokenize(tokenizer, [""]))[0][0]  # (L, D)

    unet = UNet2DConditionModel(**unet_config())
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    log.info("unet params %.3fM", sum(p.numel() for p in unet.parameters()) / 1e6)
    noise_sched = DDPMScheduler(**scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    if args.ckpt.is_file() and not args.time_steps:
        meta, extra = load_checkpoint(args.ckpt, unet, opt)
        step, elapsed = meta["step"], meta["elapsed"]
        ema = {k: extra[f"ema.{k}"] for k in ema}
        log.info("resumed from %s at step %d", args.ckpt, step)
    acp = noise_sched.alphas_cumprod
    unet.train()
    t_last_ckpt = time.time()
    t0 = time.time() - elapsed
    loss_ema = None
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        x0, y = x_all[idx], y_all[idx]
        tmpl = torch.randint(0, cond.shape[1], (args.batch,), generator=g)
        ehs = cond[y, tmpl].clone()
        drop = torch.rand(args.batch, generator=g) < args.p_uncond
        ehs[drop] = uncond
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args)
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=ehs).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
        loss_ema = loss.item() if loss_ema is None else 0.99 * loss_ema + 0.01 * loss.item()
        if step % 25 == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f (ema %.4f) lr %.2e elapsed %.0fs", step, args.steps, loss.item(),
                     loss_ema, opt.param_groups[0]["lr"], time.time() - t0)
        if args.time_steps and step >= args.time_steps:
            log.info("%.3f s/step", (time.time() - t0) / step)
            return
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            log.info("time budget of %.0f min reached at step %d", args.max_minutes, step)
            break
        if time.time() - t_last_ckpt > args.ckpt_every and step < args.steps:
            save_checkpoint(args.ckpt, unet, opt, {"step": step, "elapsed": time.time() - t0, "loss_ema": loss_ema},
                            extra={f"ema.{k}": v for k, v in ema.items()})
            t_last_ckpt = time.time()
    wall = time.time() - t0
    save_checkpoint(args.ckpt, unet, opt, {"step": step, "elapsed": wall, "loss_ema": loss_ema},
                    extra={f"ema.{k}": v for k, v in ema.items()})

    unet.load_state_dict(ema)
    unet.eval()
    pipe = FashionDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                    scheduler=DDIMScheduler(**scheduler_config()))
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(args.out), safe_serialization=True)
    (args.out / "training.json").write_text(json.dumps({
        "steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "decay_steps": args.decay_steps, "ema": args.ema,
        "p_uncond": args.p_uncond, "seed": args.seed, "threads": args.threads, "wall_time_s": round(wall, 1),
        "final_loss_ema": loss_ema, "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters())}, indent=2))
    log.info("saved pipeline to %s", args.out)


if __name__ == "__main__":
    main()
