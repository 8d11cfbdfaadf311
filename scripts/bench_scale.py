"""Compression at the size users run: SD-1.5, SDXL, SD3-medium and Flux-class pipelines.

Each architecture is built at full width from diffusers / transformers classes with random
weights (memory and time do not depend on weight values), saved as a diffusers folder, and run
through ``diffsqueeze run`` in a fresh process: prune 30% -> W8A8 INT PTQ (round-to-nearest)
-> export, then reloaded in another fresh process that generates one image. SD-1.5 also goes
through learned rounding (AdaRound, a few iterations), W4A4 PTQ + QuEST (one epoch) and BinaryDM
(a few iterations). Per phase: wall time, peak RSS (the run's manifest: each stage's own peak,
reset at its start), disk written, seconds per million denoiser parameters, and the peak over
the denoiser's FP32 bytes: the growth with model size is a line in the table.

What differs from the released models (none of it changes the denoiser): the text encoders
read the offline character tokenizer's 514-token vocabulary (a smaller embedding table); SD3
runs without its optional T5 encoder; Flux-class keeps the full width but 2 double-stream and
4 single-stream blocks (of 19 and 38: FP32 weights of all would need 48 GB) and a 2-layer T5 of
full width. Images are 128x128 (calibration: 2 prompts, 2 of 2 sampler steps), so activations
are small beside the weights, as the table is about the weights' cost.

Usage:
    python scripts/bench_scale.py --models sd15 sdxl sd3 flux --work runs/scale --out docs/BENCHMARKS.md
    python scripts/bench_scale.py --small --models sd15 sdxl sd3 flux --work /tmp/scale   # minutes: narrow models
    python scripts/bench_scale.py --models sd15 --device cuda --work runs/scale           # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffsqueeze.metrics.compare import write_marked_section  # noqa: E402

SIZE = 128
FLUX_DEPTH = (2, 4)  # double-stream, single-stream blocks (full model: 19, 38)


def _clip(hidden: int, layers: int, heads: int, projection: int):
    from transformers import CLIPTextConfig

    from diffsqueeze.models.tiny_families import VOCAB

    return CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu")


def _vae(latent: int, small: bool, **extra):
    from diffusers import AutoencoderKL

    chans = (32, 32, 64, 64) if small else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=chans, layers_per_block=2,
                         latent_channels=latent, norm_num_groups=32, sample_size=512, **extra)


def build_sd15(small: bool):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffsqueeze.models.tokenizer import build_char_tokenizer

    w = (32, 64, 64, 64) if small else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=w,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64 if small else 768, attention_head_dim=8, norm_num_groups=32)
    text = CLIPTextModel(_clip(64, 2, 4, 64) if small else _clip(768, 12, 12, 768))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=_vae(4, small), text_encoder=text, tokenizer=build_char_tokenizer(), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_sdxl(small: bool):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from diffsqueeze.models.tokenizer import build_char_tokenizer

    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128) if small else (320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8) if small else (5, 10, 20), transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8 if small else 256,
        projection_class_embeddings_input_dim=6 * 8 + 64 if small else 2816,
        cross_attention_dim=128 if small else 2048, norm_num_groups=32)
    te = CLIPTextModel(_clip(64, 2, 4, 64) if small else _clip(768, 12, 12, 768))
    te2 = CLIPTextModelWithProjection(_clip(64, 2, 4, 64) if small else _clip(1280, 32, 20, 1280))
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    return StableDiffusionXLPipeline(vae=_vae(4, small, scaling_factor=0.13025), text_encoder=te, text_encoder_2=te2,
                                     tokenizer=build_char_tokenizer(), tokenizer_2=build_char_tokenizer(), unet=unet,
                                     scheduler=sched, force_zeros_for_empty_prompt=True)


def build_sd3(small: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from diffsqueeze.models.tokenizer import build_char_tokenizer

    tr = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if small else 24,
        attention_head_dim=64 if not small else 16, num_attention_heads=2 if small else 24,
        joint_attention_dim=256 if small else 4096, caption_projection_dim=32 if small else 1536,
        pooled_projection_dim=128 if small else 2048, pos_embed_max_size=192)
    te = CLIPTextModelWithProjection(_clip(64, 2, 4, 64) if small else _clip(768, 12, 12, 768))
    te2 = CLIPTextModelWithProjection(_clip(64, 2, 4, 64) if small else _clip(1280, 32, 20, 1280))
    vae = _vae(16, small, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=te, tokenizer=build_char_tokenizer(), text_encoder_2=te2,
                                    tokenizer_2=build_char_tokenizer(), text_encoder_3=None, tokenizer_3=None)


def build_flux(small: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from diffsqueeze.models.tiny_families import VOCAB
    from diffsqueeze.models.tokenizer import build_char_tokenizer

    d = 128 if small else 4096
    tr = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=FLUX_DEPTH[0], num_single_layers=FLUX_DEPTH[1],
        attention_head_dim=16 if small else 128, num_attention_heads=2 if small else 24, joint_attention_dim=d,
        pooled_projection_dim=64 if small else 768, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6) if small else (16, 56, 56))
    te = CLIPTextModel(_clip(64, 2, 4, 64) if small else _clip(768, 12, 12, 768))
    t5 = T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=d, d_kv=64 if not small else 16, d_ff=2 * d if small else 10240,
                                 num_layers=2, num_heads=64 if not small else 8, feed_forward_proj="gated-gelu",
                                 relative_attention_num_buckets=32, pad_token_id=1, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = _vae(16, small, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=te,
                        tokenizer=build_char_tokenizer(), text_encoder_2=t5, tokenizer_2=build_char_tokenizer(),
                        transformer=tr)


ARCHS = {"sd15": ("SD-1.5", build_sd15), "sdxl": ("SDXL", build_sdxl), "sd3": ("SD3-medium (no T5)", build_sd3),
         "flux": (f"Flux-class ({FLUX_DEPTH[0]}+{FLUX_DEPTH[1]} of 19+38 blocks)", build_flux)}

CALIBRATION = {"prompts": "builtin", "num_samples": 2, "batch_size": 1, "timesteps": 2, "num_inference_steps": 2,
               "guidance_scale": 2.0, "height": SIZE, "width": SIZE}
W8A8 = {"weights": {"bits": 8, "format": "int", "granularity": "channel", "search": "mse"},
        "activations": {"bits": 8, "format": "int", "granularity": "tensor", "search_values": 65536},
        "rounding": {"method": "nearest"}}
RECIPES = {
    "prune -> W8A8 RTN": [{"prune": {"targets": {"denoiser": 0.3}}}, {"ptq": W8A8}],
    "W4A8 AdaRound": [{"ptq": {"weights": {"bits": 4, "format": "int", "granularity": "channel", "search": "mse"},
                               "activations": {"bits": 8, "format": "int", "granularity": "tensor", "search_values": 65536},
                               "rounding": {"method": "adaround", "iters": 2, "batch_size": 2}, "batch_size": 2}}],
    "W4A4 + QuEST": [{"ptq": {"weights": {"bits": 4, "format": "int", "granularity": "channel", "search": "mse"},
                              "activations": {"bits": 4, "format": "int", "granularity": "channel", "search_values": 65536},
                              "rounding": {"method": "nearest"}}},
                     {"quest": {"time_layers": ["auto"], "sensitive_layers": {"select": "pattern", "patterns": ["*ff.net.*"]},
                                "stage1": {"epochs": 1, "samples": 1, "batch_size": 1},
                                "stage2": {"epochs": 1, "samples": 2, "batch_size": 1}}}],
    "W1A4 BinaryDM": [{"binarize": {"order": 1, "activations": {"bits": 4, "granularity": "tensor"},
                                    "lrm": {"weight": 0.0001, "rank_divisor": 4, "fit_batches": 1},
                                    "train": {"mode": "distill", "iters": 2, "batch_size": 1}}}],
}
SD15_ONLY = ("W4A8 AdaRound", "W4A4 + QuEST", "W1A4 BinaryDM")


def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _peak_and_run(argv: list[str]) -> tuple[float, float]:
    """Run ``argv`` in a fresh process; (wall seconds, its peak RSS in MiB from /proc via the worker)."""
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout


def build_worker(arch: str, folder: Path, small: bool) -> dict:
    """(In its own process) build ``arch`` with random weights and save it; sizes in bytes."""
    from diffsqueeze.models import save_pipeline
    from diffsqueeze.process_memory import peak_rss_mb

    torch.manual_seed(0)
    t0 = time.perf_counter()
    pipe = ARCHS[arch][1](small)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    n = sum(p.numel() for p in denoiser.parameters())
    total = sum(p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters())
    save_pipeline(pipe, folder)
    return {"denoiser_params": n, "denoiser_fp32_bytes": 4 * n, "pipeline_params": total,
            "build_save_s": round(time.perf_counter() - t0, 1), "build_peak_rss_mb": round(peak_rss_mb(), 1)}


def reload_worker(model: str, device: str) -> dict:
    """(In its own process) load the exported model and generate one image."""
    import diffsqueeze.cli as cli
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.models.conditioning import generate, images_of
    from diffsqueeze.process_memory import peak_rss_mb

    cli.quiet_libraries()
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = images_of(generate(pipe, ["a photo of a cat"], torch.Generator().manual_seed(0), 2, 2.0, "pt", SIZE, SIZE))
    ok = bool(torch.isfinite(torch.as_tensor(image)).all())
    return {"load_s": round(load_s, 1), "image_s": round(time.perf_counter() - t0, 1), "finite": ok,
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _worker_json(argv: list[str]) -> tuple[float, dict]:
    wall, stdout = _peak_and_run(argv)
    return wall, json.loads(stdout.strip().splitlines()[-1])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_one(arch: str, recipe_name: str, folder: Path, work: Path, device: str, info: dict) -> dict:
    run_dir = work / f"{arch}-{recipe_name.split()[0].lower().replace('->', '')}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = {"model": str(folder), "seed": 0, "device": device, "dtype": "float32", "calibration": CALIBRATION,
              "output_dir": str(run_dir), "stages": RECIPES[recipe_name]}
    path = work / f"{arch}-{recipe_name.split()[0].lower()}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    wall, _ = _peak_and_run([sys.executable, "-m", "diffsqueeze", "run", str(path)])
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    _, reload = _worker_json([sys.executable, __file__, "--reload-worker", str(run_dir / "model"), "--device", device])
    fp32 = info["denoiser_fp32_bytes"] / 2**20
    mparams = info["denoiser_params"] / 1e6
    phases = []
    if "calibration" in manifest:
        phases.append(("calibration", manifest["calibration"]["wall_time_s"], manifest["calibration"]["peak_rss_mb"]))
    phases += [(s["name"], s["wall_time_s"], s["peak_rss_mb"]) for s in manifest["stages"]]
    cuda = {s["name"]: s["peak_cuda_mb"] for s in manifest["stages"] if "peak_cuda_mb" in s}
    phases.append(("export", manifest["export"]["wall_time_s"], manifest["export"]["peak_rss_mb"]))
    phases.append(("reload + 1 image", reload["load_s"] + reload["image_s"], reload["peak_rss_mb"]))
    rows = [{"phase": p, "wall_s": w, "s_per_mparam": w / mparams, "peak_rss_mb": r, "peak_over_fp32": r / fp32,
             **({"peak_cuda_mb": cuda[p]} if p in cuda else {})} for p, w, r in phases]
    return {"arch": arch, "recipe": recipe_name, "status": manifest["status"], "run_wall_s": round(wall, 1),
            "rows": rows, "disk_bytes": dir_bytes(run_dir), "export_bytes": manifest["export"]["bytes"],
            "image_finite": reload["finite"], "peak_over_fp32": max(r["peak_over_fp32"] for r in rows)}


def table(results: list[dict], infos: dict, command: str, device: str) -> str:
    lines = [f"Measured on {machine(device)}, {time.strftime('%Y-%m-%d')}, with `{command}`.",
             f"Random weights at full width, {SIZE}x{SIZE} images, calibration 2 prompts x 2 sampler steps "
             "(guidance 2), `diffsqueeze run` in a fresh process; reload + one image (2 steps) in another. "
             "Peak RSS per phase is that phase's own (reset at its start); `x FP32` divides it by the denoiser's "
             "FP32 bytes (the whole pipeline, text encoders included, is in memory throughout).", "",
             "| model | denoiser params | FP32 denoiser | pipeline params |", "|---|---|---|---|"]
    for arch, info in infos.items():
        lines.append(f"| {ARCHS[arch][0]} | {info['denoiser_params'] / 1e9:.3f} B | {info['denoiser_fp32_bytes'] / 2**30:.2f} GiB "
                     f"| {info['pipeline_params'] / 1e9:.3f} B |")
    lines += ["", "| model | recipe | phase | wall s | s / M params | peak RSS GiB | x FP32 denoiser |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        for row in r["rows"]:
            gpu = f" (CUDA peak {row['peak_cuda_mb'] / 1024:.2f} GiB)" if "peak_cuda_mb" in row else ""
            lines.append(f"| {ARCHS[r['arch']][0]} | {r['recipe']} | {row['phase']}{gpu} | {row['wall_s']:.1f} | "
                         f"{row['s_per_mparam']:.3f} | {row['peak_rss_mb'] / 1024:.2f} | {row['peak_over_fp32']:.2f} |")
    lines += ["", "| model | recipe | run status | max peak x FP32 | run dir on disk | exported model | reload image finite |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {ARCHS[r['arch']][0]} | {r['recipe']} | {r['status']} | {r['peak_over_fp32']:.2f} | "
                     f"{r['disk_bytes'] / 2**30:.2f} GiB | {r['export_bytes'] / 2**30:.2f} GiB | {r['image_finite']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--work", type=Path, default=Path("runs/scale"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="narrow models of the same layouts (a dry run)")
    ap.add_argument("--keep", action="store_true", help="keep the saved models and runs (default: delete after each)")
    ap.add_argument("--out", type=Path, help="write the table into this markdown file (bench_scale markers)")
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument("--build-worker", nargs=2, metavar=("ARCH", "FOLDER"), help=argparse.SUPPRESS)
    ap.add_argument("--reload-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_worker:
        print(json.dumps(build_worker(args.build_worker[0], Path(args.build_worker[1]), args.small)))
        return
    if args.reload_worker:
        print(json.dumps(reload_worker(args.reload_worker, args.device)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results, infos = [], {}
    for arch in args.models:
        folder = args.work / f"{arch}-fp32"
        shutil.rmtree(folder, ignore_errors=True)
        _, infos[arch] = _worker_json([sys.executable, __file__, "--build-worker", arch, str(folder)]
                                      + (["--small"] if args.small else []))
        print(f"{arch}: built {infos[arch]}", flush=True)
        for name in args.recipes:
            if name in SD15_ONLY and arch != "sd15":
                continue
            try:
                res = run_one(arch, name, folder, args.work, args.device, infos[arch])
            except RuntimeError as exc:  # recorded in the table, the other models still run
                res = {"arch": arch, "recipe": name, "status": "failed: " + str(exc).strip().splitlines()[-1][:200],
                       "rows": [], "disk_bytes": 0, "export_bytes": 0, "image_finite": False,
                       "peak_over_fp32": float("nan")}
            print(json.dumps(res), flush=True)
            results.append(res)
            if args.json:  # after every run, so a run cut short by a time limit keeps what finished
                args.json.write_text(json.dumps({"infos": infos, "results": results}, indent=1), encoding="utf-8")
            if not args.keep:
                shutil.rmtree(args.work / f"{arch}-{name.split()[0].lower().replace('->', '')}-run", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    command = "python scripts/bench_scale.py " + " ".join(sys.argv[1:])
    text = table(results, infos, command, args.device)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"infos": infos, "results": results}, indent=1), encoding="utf-8")
    if args.out:
        write_marked_section(args.out, "bench_scale", text, "Scale: SD-1.5, SDXL, SD3, Flux-class end to end")


if __name__ == "__main__":
    main()
