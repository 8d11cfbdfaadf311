"""Regenerate the tables of docs/RESULTS.md: the shipped recipes on builtin:fashion, side by side.

Each row is one ``diffsqueeze run`` of a shipped recipe (``configs/<name>.yaml``, the overrides
listed in the table); its packed model is reloaded with ``diffsqueeze.load`` and generates the
same images as every other row (prompt ``i mod 10`` of ``builtin:fashion``, seed ``i``, same
sampler, steps and guidance). The images are then scored together
(``diffsqueeze.metrics.compare``): FID against the Fashion-MNIST test set, FID against the FP
model's images, CLIP score (builtin:fashion-clip), PSNR/SSIM against the FP image of the same
prompt and seed; plus the denoiser's bytes on disk and the stages' wall time from the manifest.

    python scripts/bench_recipes.py --tables ptq,quest,binarydm --num-images 500 --out docs/RESULTS.md

Finished runs and generated images are reused when their recipe hash and sampling settings are
unchanged (``--runs`` keeps them), so the command can be stopped and restarted, and adding a row
costs one row. ``--set KEY=VALUE`` adds an override to every run (e.g. shorter training for a
smoke test); such a table says so in its header.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One table row: a recipe and the overrides that make this variant of it."""

    name: str
    label: str
    config: str | None  # None: the FP model itself
    overrides: tuple[str, ...] = ()
    resume_from: str | None = None  # copy this row's run first so the shared stage prefix is reused


FP = Row("fp", "FP32 (original)", None)
NEAREST = "stages.0.ptq.rounding.method=nearest"
NO_QUEST = ("stages.1.quest.stage1.epochs=0", "stages.1.quest.stage2.epochs=0")
BASELINE_BIN = ("stages.0.binarize.order2_groups=0", "stages.0.binarize.lrm.weight=0",
                "stages.0.binarize.progressive=false", "stages.0.binarize.learn_scales=false")
A32 = "stages.0.binarize.activations=null"
NO_BRANCH = "stages.0.ptq.lowrank.fraction=0"
SMOOTH = "stages.0.ptq.smoothing.search=[0.25,0.5,0.75]"

TABLES: dict[str, tuple[str, list[Row]]] = {
    "ptq": ("Post-training quantization (`ptq` stage)", [
        FP,
        Row("w8a8-int", "W8A8 INT, round-to-nearest", "w8a8_int"),
        Row("w8a8-fp8", "W8A8 FP8 E4M3, round-to-nearest", "w8a8_fp8"),
        Row("w8a16-fp8", "W8A16 FP8 E4M3 weight-only, round-to-nearest", "w8a8_fp8",
            ("stages.0.ptq.activations=null",)),
        Row("w8a8-int-w-fp8-a", "W8 INT + A8 FP8 E4M3, round-to-nearest", "w8a8_int",
            ("stages.0.ptq.activations.format=fp8_e4m3",)),
        Row("w4a8-int-rtn", "W4A8 INT, round-to-nearest", "w4a8_int", (NEAREST,)),
        Row("w4a8-int-learned", "W4A8 INT, learned rounding", "w4a8_int"),
        Row("w4a8-fp-rtn", "W4A8 FP (E2M1 / E4M3), round-to-nearest", "w4a8_fp", (NEAREST,)),
        Row("w4a8-fp-learned", "W4A8 FP (E2M1 / E4M3), learned rounding", "w4a8_fp"),
        Row("w4a16-fp-rtn", "W4A16 FP E2M1 weight-only, round-to-nearest", "w4a16_fp", (NEAREST,)),
        Row("w4a16-fp-learned", "W4A16 FP E2M1 weight-only, learned rounding", "w4a16_fp"),
    ]),
    "quest": ("QuEST selective finetuning (`quest` stage)", [
        FP,
        Row("w4a4-rtn", "W4A4 INT, round-to-nearest, no LSQ", "w4a4_quest",
            (NEAREST, "stages.0.ptq.activations.lsq_iters=0", *NO_QUEST)),
        Row("w4a4-ptq", "W4A4 INT PTQ (learned rounding + LSQ)", "w4a4_quest", NO_QUEST),
        Row("w4a4-quest", "W4A4 INT PTQ + QuEST", "w4a4_quest", (), resume_from="w4a4-ptq"),
        Row("w4a8-quest", "W4A8 INT PTQ + QuEST", "w4a4_quest", ("stages.0.ptq.activations.bits=8",)),
    ]),
    "svd": ("W4A4 with dynamic group activations and a low-rank branch (SVDQuant-style, `w4a4_svd`)", [
        FP,
        Row("w4a4-ptq", "W4A4 INT PTQ, static per-channel activations (the `quest` table's PTQ)", "w4a4_quest",
            NO_QUEST),
        Row("svd-rtn", "W4A4: FP4 weights, dynamic INT4 g16 activations, round-to-nearest", "w4a4_svd",
            (NEAREST, NO_BRANCH, *NO_QUEST)),
        Row("svd-rtn-smooth", "+ smoothing (alpha searched)", "w4a4_svd", (NEAREST, NO_BRANCH, SMOOTH, *NO_QUEST)),
        Row("svd-rtn-lowrank", "+ low-rank branch (3% rank)", "w4a4_svd", (NEAREST, *NO_QUEST)),
        Row("svd-rtn-both", "+ smoothing + low-rank branch", "w4a4_svd", (NEAREST, SMOOTH, *NO_QUEST)),
        Row("svd-ptq", "low-rank branch + learned rounding", "w4a4_svd", NO_QUEST),
        Row("svd-quest", "low-rank branch + learned rounding + QuEST (`configs/w4a4_svd.yaml`)", "w4a4_svd", (),
            resume_from="svd-ptq"),
        *[Row(f"{b}-w4a4{tag}", f"{b.upper()} weights and activations, round-to-nearest{label}", "w4a4_svd",
              (f"stages.0.ptq.weights.format={b}", f"stages.0.ptq.activations.format={b}", NEAREST, *branch, *NO_QUEST))
          for b in ("nvfp4", "mxfp4")
          for tag, label, branch in (("", "", (NO_BRANCH,)), ("-lowrank", " + low-rank branch", ()))],
    ]),
    "gguf": ("GGUF grids: learned rounding against round-to-nearest on the same grid (`ptq` stage)", [
        FP,
        *[Row(f"{fmt}-{tag}", f"{fmt.upper()} weight-only, {label}", "w4a16_fp",
              (f"stages.0.ptq.weights.bits={bits}", f"stages.0.ptq.weights.format={fmt}", *extra))
          for fmt, bits in (("q8_0", 8), ("q4_0", 4), ("q4_k", 4))
          for tag, label, extra in (("rtn", "round-to-nearest (the encoder's scales and codes: the gguf package's "
                                            "for Q8_0/Q4_0, ggml's reference search for Q4_K)", (NEAREST,)),
                                    ("learned", "learned rounding at the encoder's scales", ()))],
    ]),
    "binarydm": ("BinaryDM binarization (`binarize` stage)", [
        FP,
        Row("w1a32-baseline", "W1A32 baseline (order-1 sign, mean scale)", "w1a4_binarydm", (A32, *BASELINE_BIN)),
        Row("w1a32-binarydm", "W1A32 BinaryDM", "w1a4_binarydm", (A32,)),
        Row("w1a4-baseline", "W1A4 baseline (order-1 sign, mean scale)", "w1a4_binarydm", BASELINE_BIN),
        Row("w1a4-binarydm", "W1A4 BinaryDM", "w1a4_binarydm"),
        Row("w2a4-ptq", "W2A4 INT PTQ (AdaRound weights, LSQ activations), reference", "w4a8_int",
            ("stages.0.ptq.weights.bits=2", "stages.0.ptq.activations.bits=4")),
    ]),
}


def run_dir(args, row: Row) -> Path:
    return Path(args.runs) / row.name


def manifest(path: Path) -> dict | None:
    try:
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if m.get("status") == "complete" else None


def run_row(args, row: Row, env: dict) -> dict | None:
    """``diffsqueeze run`` for one row (``--resume`` keeps finished stages); the manifest, or None."""
    out = run_dir(args, row)
    if row.resume_from and not (out / "manifest.json").exists():
        src = run_dir(args, Row(row.resume_from, "", None))
        if manifest(src):
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("model", "eval", "grids"))
    cmd = [sys.executable, "-m", "diffsqueeze", "run", str(REPO / "configs" / f"{row.config}.yaml"),
           f"output_dir={out}", "eval=null", *row.overrides, *args.set, "--resume"]
    print("$ " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc:
        print(f"{row.name}: the run failed (exit {rc}); row left out", file=sys.stderr)
        return None
    print(f"{row.name}: run took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return manifest(out)


def images_for(args, row: Row, man: dict | None, prompts: list[str]):
    """The row's benchmark images, generated or reused from ``<runs>/images``."""
    from safetensors.torch import load_file, save_file

    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.metrics.compare import generate_bench_images

    key = {"recipe_hash": man["recipe_hash"] if man else None, "model": args.model, "num_images": args.num_images,
           "steps": args.steps, "guidance": args.guidance, "prompts": args.prompts}
    folder = Path(args.runs) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    meta_path, img_path = folder / f"{row.name}.json", folder / f"{row.name}.safetensors"
    if meta_path.is_file() and img_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") == key:
            return load_file(str(img_path))["images"], meta
    spec = args.model if row.config is None else str(run_dir(args, row) / "model")
    pipe = load_pipeline(spec)
    images, secs = generate_bench_images(pipe, prompts, args.num_images, args.steps, args.guidance, args.batch_size)
    meta = {"key": key, "gen_s_per_image": round(secs / args.num_images, 4)}
    save_file({"images": images.contiguous()}, str(img_path))
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return images, meta


def row_facts(args, row: Row, man: dict | None) -> dict:
    """Denoiser bytes on disk, stage wall time and (BinaryDM) OPs, from the run's manifest and files."""
    if row.config is None:
        from diffsqueeze.loading import load_pipeline

        pipe = load_pipeline(args.model)
        den = getattr(pipe, "unet", None) or pipe.transformer
        return {"denoiser_bytes": sum(p.numel() * 4 for p in den.parameters()), "stage_s": 0.0, "ops": None}
    model = run_dir(args, row) / "model"
    den = next(d for d in ("unet", "transformer") if (model / d).is_dir())
    facts = {"denoiser_bytes": sum(f.stat().st_size for f in (model / den).rglob("*.safetensors")),
             "stage_s": round(sum(s.get("wall_time_s", 0.0) for s in man["stages"]), 1), "ops": None}
    for s in man["stages"]:
        ops = (s.get("summary") or {}).get("ops")
        if ops:
            facts["ops"] = ops.get("ops")
    return facts


def reproducing_args(argv: list[str]) -> list[str]:
    """The arguments that regenerate the table from scratch (``--skip-runs`` / ``--rows`` only
    select work that is already done or not yet redone)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--rows":
            skip = True
        elif a != "--skip-runs" and not a.startswith("--rows="):
            out.append(a)
    return out


def fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(args, name: str, rows: list[Row], scores, prov, facts) -> str:
    title, _ = TABLES[name]
    fp_bytes = facts["fp"]["denoiser_bytes"]
    has_ops = any(facts[r.name]["ops"] for r in rows)
    cmd = "python scripts/bench_recipes.py " + " ".join(reproducing_args(sys.argv[1:]))
    head = ["| row | FID vs real | FID vs FP | CLIP score | PSNR vs FP (dB) | SSIM vs FP | denoiser on disk (MB) "
            "| x smaller than FP32 |" + (" OPs / call (M) |" if has_ops else "") + " stage time (s) | overrides |",
            "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_ops else "") + "---:|---|"]
    lines = [f"Model `{args.model}`, {args.num_images} images per row ({args.prompts} prompts, image i: prompt "
             f"i mod 10, seed i), DDIM {args.steps} steps, guidance {args.guidance}. {prov.text()}",
             "", f"Command: `{cmd}`" + (f" (extra overrides on every run: `{' '.join(args.set)}`)" if args.set else ""),
             "", *head]
    for r in rows:
        s, f = scores[r.name], facts[r.name]
        cfg = "" if r.config is None else f"`configs/{r.config}.yaml` " + " ".join(f"`{o}`" for o in r.overrides)
        ops = (f" {fmt(f['ops'] / 1e6, 1) if f['ops'] else '-'} |" if has_ops else "")
        lines.append(f"| {r.label} | {fmt(s.fid_vs_real)} | {fmt(s.fid_vs_fp)} | {fmt(s.clip_score)} | "
                     f"{fmt(s.psnr_vs_fp)} | {fmt(s.ssim_vs_fp, 3)} | {f['denoiser_bytes'] / 1e6:.2f} | "
                     f"{fp_bytes / f['denoiser_bytes']:.1f} |{ops} {fmt(f['stage_s'], 0)} | {cfg} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="ptq", help=f"comma list of {', '.join(TABLES)}")
    ap.add_argument("--rows", default="", help="comma list: only these rows (and fp)")
    ap.add_argument("--model", default="builtin:fashion")
    ap.add_argument("--runs", default="runs/bench", help="run directories and generated images")
    ap.add_argument("--num-images", type=int, default=500)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--prompts", default="builtin:fashion")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--reference", default="builtin:fashion-mnist", help="real images for 'FID vs real'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", action="append", default=[], help="override added to every run (repeatable)")
    ap.add_argument("--skip-runs", action="store_true", help="score only rows whose runs already exist")
    ap.add_argument("--out", type=Path, default=None, help="write the tables into this Markdown file")
    args = ap.parse_args()

    import torch

    import diffsqueeze.cli as cli
    from diffsqueeze.metrics.compare import score_image_sets, write_marked_section
    from diffsqueeze.models.prompts import load_prompts

    cli.quiet_libraries()
    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env["OMP_NUM_THREADS"] = str(args.threads)
    names = [t for t in args.tables.split(",") if t]
    unknown = [t for t in names if t not in TABLES]
    if unknown:
        ap.error(f"unknown table(s) {unknown}; known: {', '.join(TABLES)}")
    only = {r for r in args.rows.split(",") if r}
    prompts = load_prompts(args.prompts)
    for name in names:
        rows = [r for r in TABLES[name][1] if r.config is None or not only or r.name in only]
        images, facts, metas, done = {}, {}, {}, []
        for r in rows:
            man = None
            if r.config is not None:
                man = manifest(run_dir(args, r)) if args.skip_runs else run_row(args, r, env)
                if man is None:
                    if args.skip_runs:
                        print(f"{r.name}: no complete run in {run_dir(args, r)}; row left out", file=sys.stderr)
                    continue
            images[r.name], metas[r.name] = images_for(args, r, man, prompts)
            facts[r.name] = row_facts(args, r, man)
            done.append(r)
            print(f"{r.name}: images ready ({metas[r.name]['gen_s_per_image']} s/image)", file=sys.stderr, flush=True)
        scores, prov = score_image_sets(images, fp="fp", prompts=prompts, real_reference=args.reference,
                                        cache_dir=Path(args.runs) / "feature-cache")
        body = table(args, name, done, scores, prov, facts)
        print(body)
        (Path(args.runs) / f"{name}.json").write_text(json.dumps(
            {r.name: {**vars(scores[r.name]), **facts[r.name], **metas[r.name]} for r in done}, indent=2), encoding="utf-8")
        if args.out:
            write_marked_section(args.out, f"bench_recipes:{name}", body, TABLES[name][0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
