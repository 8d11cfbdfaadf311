"""Peers side by side: bitsandbytes, optimum-quanto, torchao vs diffsqueeze recipes on one model.

Every method runs in its own subprocess (clean peak-RSS), generates the same images (builtin
prompts, seeds 0..N-1, same sampler/steps/guidance) and saves them; the main process then scores
them together (``diffsqueeze.metrics.compare``): FID vs real (``builtin:fashion-mnist``), FID vs
FP (the FP model's own images), CLIP score (``builtin:fashion-clip``), PSNR vs FP, plus bytes on disk, weights in memory, peak
RSS over imports and CPU latency per image.

    python scripts/bench_peers.py --model builtin:fashion --runs runs/bench --num-images 500 \
        --train-ours --out docs/BENCHMARKS.md

Peers quantize the denoiser the way their libraries do (weight-only): bitsandbytes replaces its
``nn.Linear`` layers (``Linear8bitLt`` int8, ``Linear4bit`` nf4/fp4; layers its CPU kernels reject
stay FP and are counted), optimum-quanto ``quantize(weights=qint8|qint4|qfloat8)`` + ``freeze``
(Linear and Conv2d), torchao ``Int8WeightOnlyConfig`` (Linear). Ours are run directories of the
shipped recipes (``configs/<name>.yaml``; by default those of ``scripts/bench_recipes.py``), reloaded packed with ``load_pipeline``; with
``--train-ours`` missing ones are produced with ``diffsqueeze run`` (``--ours-set`` passes overrides,
e.g. to shorten training for a smoke run). ``--gpu`` measures latency/memory on CUDA with an
SD-1.5-architecture UNet with random weights in fp16 (no quality columns).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from diffsqueeze.process_memory import current_rss_mb, peak_rss_mb

PEERS = ["bnb-int8", "bnb-nf4", "bnb-fp4", "quanto-qint8", "quanto-qint4", "quanto-qfloat8", "torchao-int8wo"]
# our methods: the rows of scripts/bench_recipes.py they are (run directory <runs>/<row>, shipped
# recipe and overrides all come from that row, so its runs are reused and --train-ours makes the same)
OURS = {"ours-w8a8-fp8": "w8a8-fp8", "ours-w8a16-fp8": "w8a16-fp8", "ours-w4a16-fp": "w4a16-fp-learned",
        "ours-w4a4-quest": "w4a4-quest", "ours-w1a4-binarydm": "w1a4-binarydm"}


def bench_row(method: str):
    """The ``bench_recipes.Row`` behind one of our methods."""
    from bench_recipes import TABLES  # this script's folder is on sys.path when it runs

    return next(r for _, rows in TABLES.values() for r in rows if r.name == OURS[method])


def denoiser_of(pipe):
    return getattr(pipe, "unet", None) or getattr(pipe, "transformer")


def apply_bnb(pipe, quant_type: str) -> dict:
    """Swap the denoiser's Linear layers for bitsandbytes modules; layers it rejects stay FP."""
    import bitsandbytes as bnb
    import torch

    from diffsqueeze.quant.nn.swaps import swap_module

    den = denoiser_of(pipe)
    done = kept = 0
    for name, m in list(den.named_modules()):
        if type(m) is not torch.nn.Linear:
            continue
        w = m.weight.detach().clone()
        if quant_type == "int8":
            new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=m.bias is not None, has_fp16_weights=False,
                                      threshold=0.0)
            new.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=torch.float32,
                                    quant_type=quant_type)
            new.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type)
        if m.bias is not None:
            new.bias = torch.nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        new = new.to(m.weight.device).eval()
        try:
            with torch.no_grad():
                new(torch.zeros(2, m.in_features, device=m.weight.device))
        except Exception:  # bitsandbytes' CPU kernels reject some shapes (in_features=32, ...)
            kept += 1
            continue
        swap_module(den, name, new)
        done += 1
    return {"quantized_layers": done, "kept_fp_layers": kept}


def apply_quanto(pipe, weights: str) -> dict:
    from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize

    qtype = {"qint8": qint8, "qint4": qint4, "qfloat8": qfloat8}[weights]
    den = denoiser_of(pipe)
    quantize(den, weights=qtype)
    freeze(den)
    return {}


def apply_torchao(pipe) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(denoiser_of(pipe), Int8WeightOnlyConfig())
    return {}


def tensor_bytes(t) -> int:
    """Real bytes of a tensor; quantized tensor subclasses (quanto, torchao) are summed over their parts."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def module_bytes(module) -> int:
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def weights_bytes(pipe) -> int:
    import torch

    return sum(module_bytes(c) for c in pipe.components.values() if isinstance(c, torch.nn.Module))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def worker(args) -> dict:
    """Build one method's pipeline, generate the images, save them; return its measurements."""
    import torch
    from safetensors.torch import save_file

    import diffsqueeze.cli as cli
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.metrics.compare import generate_bench_images
    from diffsqueeze.models.prompts import load_prompts

    cli.quiet_libraries()
    base = current_rss_mb()
    method = args.worker
    info: dict = {"method": method}
    t0 = time.perf_counter()
    if method.startswith("ours-"):
        run = Path(args.runs) / OURS[method]
        pipe = load_pipeline(str(run / "model"))
        info["bytes_on_disk"] = folder_bytes(run / "model")
        info["denoiser_bytes_on_disk"] = folder_bytes(run / "model" / ("unet" if (run / "model" / "unet").is_dir() else "transformer"))
    else:
        pipe = load_pipeline(args.model)
        if method.startswith("bnb-"):
            info.update(apply_bnb(pipe, method.split("-", 1)[1]))
        elif method.startswith("quanto-"):
            info.update(apply_quanto(pipe, method.split("-", 1)[1]))
        elif method == "torchao-int8wo":
            info.update(apply_torchao(pipe))
    info["load_s"] = round(time.perf_counter() - t0, 2)
    info["weights_in_memory"] = weights_bytes(pipe)
    info["denoiser_in_memory"] = module_bytes(denoiser_of(pipe))
    images, t_gen = generate_bench_images(pipe, load_prompts(args.prompts), args.num_images, args.steps, args.guidance,
                                          args.batch_size)
    info["latency_s_per_image"] = round(t_gen / args.num_images, 4)
    info["peak_rss_over_imports_mb"] = round(peak_rss_mb() - base, 1)
    save_file({"images": images.contiguous()}, str(Path(args.work) / f"{method}.safetensors"))
    (Path(args.work) / f"{method}.json").write_text(json.dumps(info), encoding="utf-8")
    return info


def score(args, rows: list[dict]) -> str:
    """Fill in the quality columns (diffsqueeze.metrics.compare); returns the provenance line."""
    from safetensors.torch import load_file

    from diffsqueeze.metrics.compare import score_image_sets
    from diffsqueeze.models.prompts import load_prompts

    imgs = {r["method"]: load_file(str(Path(args.work) / f"{r['method']}.safetensors"))["images"] for r in rows}
    scores, prov = score_image_sets(imgs, fp="fp", prompts=load_prompts(args.prompts), clip_model=args.clip_model,
                                    cache_dir=Path(args.work) / "feature-cache")
    for r in rows:
        s = scores[r["method"]]
        r.update({"fid_vs_real": round(s.fid_vs_real, 3), "fid_vs_fp": 0.0 if s.fid_vs_fp is None else round(s.fid_vs_fp, 3),
                  "psnr_vs_fp": None if s.psnr_vs_fp is None else round(s.psnr_vs_fp, 2),
                  "identical_to_fp": s.identical_to_fp})
        if s.clip_score is not None:
            r["clip_score"] = round(s.clip_score, 3)
    return prov.text()


WHAT = {"fp": "-", "bnb-int8": "Linear weights, int8 (`Linear8bitLt`)", "bnb-nf4": "Linear weights, nf4 (`Linear4bit`)",
        "bnb-fp4": "Linear weights, fp4 (`Linear4bit`)", "quanto-qint8": "Linear + Conv2d weights, int8",
        "quanto-qint4": "Linear + Conv2d weights, int4", "quanto-qfloat8": "Linear + Conv2d weights, float8",
        "torchao-int8wo": "Linear weights, int8", "ours-w8a8-fp8": "conv + linear, W8A8 FP8 E4M3",
        "ours-w8a16-fp8": "conv + linear weights, FP8 E4M3", "ours-w4a16-fp": "conv + linear weights, FP4 E2M1, learned rounding",
        "ours-w4a4-quest": "conv + linear, W4A4 INT + QuEST", "ours-w1a4-binarydm": "conv + linear, W1A4 BinaryDM"}


def _num(value, digits: int = 2) -> str:
    return "-" if value is None or value == "-" else f"{value:.{digits}f}"


def table(args, rows: list[dict], provenance: str) -> str:
    cmd = " ".join(["python scripts/bench_peers.py"] + sys.argv[1:])
    lines = [f"Model `{args.model}`; {args.num_images} images ({args.prompts} prompts, image i: prompt i mod 10, "
             f"seed i), DDIM {args.steps} steps, guidance {args.guidance}; CPU. {provenance}", "", f"Command: `{cmd}`", "",
             "| method | what is quantized | FID vs real | FID vs FP | CLIP score | PSNR vs FP (dB) | bytes on disk "
             "| denoiser in memory | peak RSS over imports (MiB) | CPU s / image | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        disk = f"{r['bytes_on_disk']:,}" if "bytes_on_disk" in r else "-"
        note = ""
        if "kept_fp_layers" in r:
            note = f"{r['quantized_layers']} Linear quantized, {r['kept_fp_layers']} kept FP (CPU kernel rejects shape)"
        fid_fp = "(ref)" if r["method"] == "fp" else _num(r.get("fid_vs_fp"))
        lines.append(f"| {r['method']} | {WHAT.get(r['method'], '')} | {_num(r.get('fid_vs_real'))} | {fid_fp} "
                     f"| {_num(r.get('clip_score'))} | {_num(r.get('psnr_vs_fp'))} | {disk} | {r['denoiser_in_memory']:,} "
                     f"| {_num(r['peak_rss_over_imports_mb'], 1)} | {_num(r['latency_s_per_image'], 3)} | {note} |")
    return "\n".join(lines)


def gpu_mode(args) -> list[dict]:
    """Latency and memory on CUDA: SD-1.5-architecture UNet, random weights, fp16 (one denoiser call)."""
    import torch
    from diffusers import UNet2DConditionModel

    rows = []
    for method in ["fp16"] + [m for m in PEERS if m.startswith(("bnb", "quanto", "torchao"))]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        unet = UNet2DConditionModel(cross_attention_dim=768).half().cuda().eval()

        class P:  # minimal pipeline stand-in for the apply_* helpers
            def __init__(self, u):
                self.unet = u

        try:
            if method.startswith("bnb-"):
                apply_bnb(P(unet), method.split("-", 1)[1])
            elif method.startswith("quanto-"):
                apply_quanto(P(unet), method.split("-", 1)[1])
            elif method == "torchao-int8wo":
                apply_torchao(P(unet))
            x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half)
            enc = torch.randn(2, 77, 768, device="cuda", dtype=torch.half)
            with torch.no_grad():
                for _ in range(2):
                    unet(x, 500, enc)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(5):
                    unet(x, 500, enc)
                torch.cuda.synchronize()
            rows.append({"method": method, "ms_per_unet_call": round((time.perf_counter() - t0) / 5 * 1000, 2),
                         "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)})
        except Exception as exc:
            rows.append({"method": method, "error": f"{type(exc).__name__}: {str(exc)[:100]}"})
        del unet
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:fashion")
    ap.add_argument("--runs", default="runs/bench", help="run directories of our recipes (as bench_recipes.py names them)")
    ap.add_argument("--methods", default="all", help="comma list (fp is always measured)")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--prompts", default="builtin:fashion")
    ap.add_argument("--clip-model", default="builtin:fashion-clip")
    ap.add_argument("--train-ours", action="store_true", help="run missing recipes with diffsqueeze run")
    ap.add_argument("--ours-set", action="append", default=[], help="override passed to diffsqueeze run (repeatable)")
    ap.add_argument("--work", default=None, help="folder for generated images (default <runs>/bench-images)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse images/measurements of methods already in --work")
    ap.add_argument("--gpu", action="store_true", help="GPU latency/memory mode (SD-1.5 architecture, random fp16)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or str(Path(args.runs) / "bench-images")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.gpu:
        rows = gpu_mode(args)
        print(json.dumps(rows, indent=2))
        return 0
    methods = ["fp"] + (PEERS + list(OURS) if args.methods == "all" else [m for m in args.methods.split(",") if m != "fp"])
    rows = []
    for method in methods:
        if method in OURS and not (Path(args.runs) / OURS[method] / "model").is_dir():
            row = bench_row(method)
            if not args.train_ours:
                print(f"skip {method}: no run in {Path(args.runs) / row.name} (use --train-ours)", file=sys.stderr)
                continue
            cmd = [sys.executable, "-m", "diffsqueeze", "run", f"configs/{row.config}.yaml", "eval=null",
                   f"output_dir={Path(args.runs) / row.name}", f"model={args.model}", "--overwrite", *row.overrides,
                   *args.ours_set]
            print(" ".join(cmd), file=sys.stderr)
            if subprocess.run(cmd, check=False).returncode:
                print(f"skip {method}: the run failed", file=sys.stderr)
                continue
        done = Path(args.work) / f"{method}.json"
        if args.reuse and done.is_file() and (Path(args.work) / f"{method}.safetensors").is_file():
            rows.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        res = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", method], capture_output=True,
                             text=True, check=False)
        if res.returncode:
            print(f"{method} failed:\n{res.stderr[-1500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    provenance = score(args, rows)
    body = table(args, rows, provenance)
    print(body)
    (Path(args.work) / "results.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    if args.out:
        from diffsqueeze.metrics.compare import write_marked_section

        write_marked_section(args.out, "bench_peers", body, "Peers side by side (bench_peers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
