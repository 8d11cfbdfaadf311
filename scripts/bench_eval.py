"""Throughput of the evaluation job: image generation and feature extraction (images/s).

CPU mode (default where there is no GPU): the builtin models (``builtin:tiny-sd``,
``builtin:tiny-dit`` and ``builtin:fashion`` when it is registered), the FID Inception-v3 and the
tiny random feature net.

GPU mode (``--mode gpu``, needs CUDA): a Stable-Diffusion-1.5-architecture pipeline (UNet
320/640/1280/1280, CLIP-L-sized text encoder, SD VAE) with random weights in float16, 512x512,
50 DDIM steps, guidance 7.5: images/s and peak GPU memory; then Inception features on those
512x512 images with each resize mode, and the whole ``run_eval_job`` (generation + features +
shards) on the same pipeline.

Usage:
    python scripts/bench_eval.py                       # CPU, tiny models
    python scripts/bench_eval.py --mode gpu --num-images 16 --batch-size 8
    python scripts/bench_eval.py --json bench.json     # also write the results as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_generation(pipe, device: str, n: int, batch: int, steps: int, guidance: float) -> dict:
    from diffsqueeze.metrics.grid import generate_images

    prompts = ["a photo of a cat"] * n
    generate_images(pipe, prompts[:batch], list(range(batch)), min(steps, 2), guidance, batch_size=batch)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = time.perf_counter()
    images = generate_images(pipe, prompts, list(range(n)), steps, guidance, batch_size=batch)
    _sync(device)
    wall = time.perf_counter() - t0
    out = {"images": n, "batch_size": batch, "steps": steps, "guidance": guidance, "seconds": round(wall, 3),
           "images_per_s": round(n / wall, 3), "resolution": f"{images.shape[-1]}x{images.shape[-2]}"}
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out, images


def bench_features(extractor, images: torch.Tensor, device: str, batch: int) -> dict:
    extractor(images[:batch])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        extractor(images[i : i + batch])
    _sync(device)
    wall = time.perf_counter() - t0
    return {"net": extractor.weights_name, "resize": extractor.resize, "images": len(images), "batch_size": batch,
            "seconds": round(wall, 3), "images_per_s": round(len(images) / wall, 3)}


def cpu_mode(args) -> list[dict]:
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.metrics.feature_nets import load_feature_net, tiny_feature_net
    from diffsqueeze.models.builtin import BUILTINS

    models = args.models or ["builtin:tiny-sd", "builtin:tiny-dit"] + (["builtin:fashion"] if "fashion" in BUILTINS else [])
    results, all_images = [], None
    for spec in models:
        pipe = load_pipeline(spec, device="cpu")
        res, images = bench_generation(pipe, "cpu", args.num_images, args.batch_size, args.steps, args.guidance)
        results.append({"what": "generation", "model": spec, **res})
        all_images = images if all_images is None else all_images
        print(json.dumps(results[-1]), flush=True)
    for ext in (tiny_feature_net(), load_feature_net("inception", resize="clean"), load_feature_net("inception", resize="bilinear_aa")):
        results.append({"what": "features", **bench_features(ext, all_images, "cpu", args.batch_size)})
        print(json.dumps(results[-1]), flush=True)
    return results


def sd15_random_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16):
    """Stable Diffusion 1.5 architecture, random weights, built directly on ``device``."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffsqueeze.models.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    # The char tokenizer's ids (< 514) are valid for the 49408-entry embedding; the cost is CLIP-L's.
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=build_char_tokenizer(), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gpu_mode(args) -> list[dict]:
    if not torch.cuda.is_available():
        print("gpu mode: no CUDA device here; nothing to do", file=sys.stderr)
        return []
    from diffsqueeze.metrics.evaluate import EvalJob, run_eval_job
    from diffsqueeze.metrics.feature_nets import load_feature_net

    results = [{"what": "device", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}]
    print(json.dumps(results[-1]), flush=True)
    t0 = time.perf_counter()
    pipe = sd15_random_pipeline()
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    results.append({"what": "build", "unet_params_M": round(n_params / 1e6, 1), "seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(results[-1]), flush=True)
    res, images = bench_generation(pipe, "cuda", args.num_images, args.batch_size, 50, 7.5)
    results.append({"what": "generation", "model": "SD-1.5 architecture, random weights, fp16, 512x512, DDIM", **res})
    print(json.dumps(results[-1]), flush=True)
    for resize in ("bilinear_aa", "tf_bilinear", "clean"):
        ext = load_feature_net("inception", device="cuda", resize=resize)
        results.append({"what": "features", "device": "cuda", **bench_features(ext, images.cuda(), "cuda", 32)})
        print(json.dumps(results[-1]), flush=True)
    if args.job_images:
        with tempfile.TemporaryDirectory() as tmp:
            job = EvalJob(model="sd15-random", reference=str(Path(tmp) / "ref"), num_images=args.job_images,
                          batch_size=args.batch_size, num_inference_steps=50, guidance_scale=7.5, resize="bilinear_aa")
            ref = Path(tmp) / "ref"
            ref.mkdir()
            import PIL.Image

            for i, im in enumerate(images[: max(2, min(len(images), 8))]):
                PIL.Image.fromarray(im.permute(1, 2, 0).numpy()).save(ref / f"{i}.png")
            ext = load_feature_net("inception", device="cuda", resize="bilinear_aa")
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            run_eval_job(job, Path(tmp) / "out", pipe=pipe, extractor=ext, device="cuda", dtype="float16", progress=False)
            wall = time.perf_counter() - t0
            results.append({"what": "eval job (generation + features + shards + FID)", "images": args.job_images,
                            "seconds": round(wall, 2), "images_per_s": round(args.job_images / wall, 3),
                            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
            print(json.dumps(results[-1]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["auto", "cpu", "gpu"], default="auto", help="auto: gpu where CUDA exists, else cpu")
    p.add_argument("--models", nargs="*", default=None, help="CPU mode: models to time (default: the builtins)")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="CPU mode sampler steps (GPU mode: 50)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--job-images", type=int, default=0, help="GPU mode: also time run_eval_job on this many images")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    mode = args.mode if args.mode != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    header = {"what": "host", "mode": mode, "python": platform.python_version(), "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "machine": platform.machine()}
    print(json.dumps(header), flush=True)
    results = [header] + (gpu_mode(args) if mode == "gpu" else cpu_mode(args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
