#!/usr/bin/env python
"""Train the small fashion CLIP (builtin:fashion-clip) on Fashion-MNIST, contrastively.

Seeded and resumable: a checkpoint (safetensors, atomic) is written every ``--ckpt-every``
seconds; rerunning the same command resumes from it. Batches are drawn from a generator seeded
with ``(seed, step)``, so a resumed run sees the same data as an uninterrupted one.

Loss: symmetric InfoNCE over image/caption pairs in the batch, with soft targets that treat every
pair of the same class as a positive (with 10 classes, a batch holds many same-class captions;
hard one-hot CLIP targets would push those apart).

    python scripts/train_fashion_clip.py --steps 1500 --batch 128
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffsqueeze.models.fashion.checkpoint import load_checkpoint, save_checkpoint
from diffsqueeze.models.fashion.clip import (
    CLIP_DIR,
    clip_config,
    gray_to_clip_pixels,
    tokenize,
    zero_shot_predict,
)
from diffsqueeze.models.fashion.data import (
    caption,
    load_fashion_mnist,
    pad_to_32,
    to_model_range,
)
from diffsqueeze.models.fashion.tokenizer import TOKENIZER_DIR, load_tokenizer

log = logging.getLogger("train_fashion_clip")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to 2 px (pad 2, crop 32) and random horizontal flip."""
    n = x.shape[0]
    xp = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    out = torch.stack([xp[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/fashion_clip_ckpt.safetensors"))
    ap.add_argument("--ckpt-every", type=float, default=120.0, help="seconds between checkpoints")
    ap.add_argument("--out", type=Path, default=CLIP_DIR)
    ap.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import CLIPModel

    images, labels = load_fashion_mnist("train")
    x_all = torch.from_numpy(to_model_range(pad_to_32(images)))[:, None]
    y_all = torch.from_numpy(labels)
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    # all captions, pre-tokenised: (10 classes, n_templates, L)
    from diffsqueeze.models.fashion.data import CLASS_NAMES, TEMPLATES
    cap_ids = torch.stack([tokenize(tokenizer, [caption(c, template=t) for t in range(len(TEMPLATES))])
                           for c in range(len(CLASS_NAMES))])

    model = CLIPModel(clip_config())
    log.info("params: text %.2fM vision %.2fM total %.2fM",
             sum(p.numel() for p in model.text_model.parameters()) / 1e6,
             sum(p.numel() for p in model.vision_model.parameters()) / 1e6,
             sum(p.numel() for p in model.parameters()) / 1e6)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = min(100, args.steps // 10)
    sched = lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    step, elapsed = 0, 0.0
    if args.ckpt.is_file() and not args.time_steps:
        meta, _ = load_checkpoint(args.ckpt, model, opt)
        step, elapsed = meta["step"], meta["elapsed"]
        log.info("resumed from %s at step %d", args.ckpt, step)
    model.train()
    t_last_ckpt = time.time()
    t0 = time.time() - elapsed
    ema = None
    while step < args.steps:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(x_all), (args.batch,), generator=g)
        y = y_all[idx]
        px = gray_to_clip_pixels(augment(x_all[idx], g))
        tmpl = torch.randint(0, cap_ids.shape[1], (args.batch,), generator=g)
        ids = cap_ids[y, tmpl]
        for grp in opt.param_groups:
            grp["lr"] = args.lr * sched(step)
        out = model(input_ids=ids, pixel_values=px)
        logits = out.logits_per_image  # (B, B), scaled by exp(logit_scale)
        same = (y[:, None] == y[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f (ema %.4f) lr %.2e scale %.1f elapsed %.0fs", step, args.steps,
                     loss.item(), ema, opt.param_groups[0]["lr"], model.logit_scale.exp().item(), time.time() - t0)
        if args.time_steps and step >= args.time_steps:
            log.info("%.3f s/step", (time.time() - t0) / step)
            return
        if time.time() - t_last_ckpt > args.ckpt_every and step < args.steps:
            save_checkpoint(args.ckpt, model, opt, {"step": step, "elapsed": time.time() - t0, "args": str(vars(args))})
            t_last_ckpt = time.time()
    wall = time.time() - t0
    save_checkpoint(args.ckpt, model, opt, {"step": step, "elapsed": wall, "args": str(vars(args))})

    model.eval()
    test_x, test_y = load_fashion_mnist("test")
    px = gray_to_clip_pixels(torch.from_numpy(to_model_range(pad_to_32(test_x)))[:, None])
    acc = {}
    for ens in (False, True):
        pred = zero_shot_predict(model, tokenizer, px, ensemble=ens)
        acc["ensemble" if ens else "single_prompt"] = (pred.numpy() == test_y).mean().item()
    log.info("zero-shot test accuracy: %s", acc)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    tokenizer.save_pretrained(str(args.out))
    from diffsqueeze.models.fashion.clip import image_processor
    image_processor().save_pretrained(str(args.out))
    (args.out / "training.json").write_text(json.dumps({
        "steps": step, "batch": args.batch, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "wall_time_s": round(wall, 1), "final_loss_ema": ema, "zero_shot_test_accuracy": acc,
        "params": sum(p.numel() for p in model.parameters())}, indent=2))
    log.info("saved to %s", args.out)


if __name__ == "__main__":
    main()
