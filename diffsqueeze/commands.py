"""Subcommands ``eval``, ``grid``, ``report``, ``prune-sweep`` and ``export``, beside :mod:`diffsqueeze.cli` (which wires them in
next to its own ``run`` and ``inspect``).

Each ``add_*_parser(subparsers)`` adds its subcommand and sets ``func`` to a handler that takes
the parsed namespace and returns an exit code. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from diffsqueeze.console import quiet_libraries
from diffsqueeze.metrics.config import MAX_EVAL_IMAGES, reference_problem

log = logging.getLogger(__name__)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default="builtin", help="prompt set name (builtin, builtin:NAME) or a text file, one prompt a line")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: the model's own, e.g. 10 for builtin:fashion, 50 for Stable Diffusion)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's own, e.g. 2 for builtin:fashion, 7.5 for SD)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default 8)")
    p.add_argument("--kernels", default="simulated", choices=["simulated", "real"],
                   help="simulated (default: decode + float math, the reference) or real (low-bit kernels where the "
                        "layer's format has one; `diffsqueeze inspect` lists them)")
    p.add_argument("--decode", default="forward", choices=["forward", "once"],
                   help="packed layers without a kernel decode their weight every forward (default) or once at load")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's own)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="pipeline dtype (default: float16 on cuda, float32 on cpu)")


def _check_size_args(args: argparse.Namespace) -> None:
    from diffsqueeze.errors import DiffsqueezeError

    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise DiffsqueezeError(f"--{name} must be >= 1 (pixels), got {getattr(args, name)}")


def check_models(*specs: str) -> None:
    """Every model a command will load, before it loads or generates anything: the spec's syntax
    (:func:`~diffsqueeze.models.io.check_model_spec`), a folder's ``model_index.json`` readable,
    and a hub id in the local cache or on the hub (a small request; refused while offline).

    Raises:
        ModelLoadError: the first spec that names no loadable model, with the cause.
    """
    from diffsqueeze.errors import ModelLoadError
    from diffsqueeze.models import check_model_spec

    for spec in specs:
        check_model_spec(spec)
        problem = _model_problem(spec)
        if problem:
            raise ModelLoadError(problem)


def _model_problem(spec: str) -> str | None:
    from diffsqueeze.errors import one_line
    from diffsqueeze.models.io import hub_unreachable, model_folder

    folder = None if spec.startswith("builtin:") else model_folder(spec)
    if folder is not None:
        try:
            json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"model '{spec}': {folder / 'model_index.json'} cannot be read ({type(exc).__name__}: {one_line(str(exc))})"
    if spec.startswith("builtin:") or Path(spec).exists():
        return None  # a folder check_model_spec accepted
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "model_index.json"), str):
        return None
    if constants.HF_HUB_OFFLINE:
        return (f"model '{spec}' is no local folder and not in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
                f"download it while online, or give a local diffusers folder")
    try:
        found = HfApi().file_exists(spec, "model_index.json")
    except Exception as exc:  # no network, a gated repo, a server error: the cause goes into the message
        return hub_unreachable(spec, exc) or f"model '{spec}': the Hugging Face hub cannot be asked for it " \
            f"({type(exc).__name__}: {one_line(str(exc))})"
    return None if found else (f"model '{spec}' is no local folder, and the Hugging Face hub has no diffusers pipeline "
                               f"of that id (no model_index.json; a private model needs a login)")


def _device_dtype(args: argparse.Namespace) -> tuple[str, str]:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, dtype


def cmd_grid(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.metrics.grid import grid_for_models
    from diffsqueeze.metrics.pipeline_info import sampling_note
    from diffsqueeze.models.prompts import load_prompts

    _check_size_args(args)
    if args.names and len(args.names) != len(args.models):
        raise DiffsqueezeError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    if (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise DiffsqueezeError("--steps and --batch-size must be >= 1")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise DiffsqueezeError(f"--out '{out}' must end in .png, .jpg or .webp")
    load_prompts(args.prompts)  # a missing, huge or runaway-line file fails before any model loads
    check_models(*args.models)  # every column, before the first is generated
    quiet_libraries()
    device, dtype = _device_dtype(args)
    image, info = grid_for_models(args.models, None, args.seeds, args.steps, args.guidance, device=device,
                                  dtype=dtype, names=args.names, batch_size=args.batch_size, cell=args.cell,
                                  prompt_set=args.prompts, max_prompts=args.max_prompts, height=args.height,
                                  width=args.width, kernels=args.kernels, decode=args.decode)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    info["prompt_source"] = args.prompts
    guidance = "none" if info["guidance_scale"] is None else f"{info['guidance_scale']:g}"
    note = sampling_note(args.steps, args.guidance, info["num_inference_steps"], info["guidance_scale"])
    print(f"sampling: {info['num_inference_steps']} steps, guidance {guidance}" + (f" ({note})" if note else ""))
    out.with_suffix(".json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"grid: {out} ({len(info['prompts']) * len(args.seeds)} rows x {len(args.models)} models; provenance in {out.with_suffix('.json')})")
    return 0


def add_grid_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze grid --models A B C --prompts FILE|builtin --seeds 0 1 --out grid.png``."""
    p = subparsers.add_parser("grid", help="side-by-side image grid: rows prompt x seed, columns models",
                              description="Generate every (prompt, seed) with every model (same sampler, steps, "
                              "guidance) and draw one PNG; columns are labelled with the denoiser size and a "
                              "metric from the model's metrics.json if it has one.")
    p.add_argument("--models", nargs="+", required=True, help="builtin:NAME, diffusers folders, run directories or hub ids")
    p.add_argument("--names", nargs="+", default=None, help="column names (default: the model specs)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds (default 0 1)")
    p.add_argument("--max-prompts", type=int, default=4, help="use the first N prompts of the set (default 4; 0 = all)")
    p.add_argument("--out", default="grid.png", help="output image (default grid.png); a .json with the provenance goes beside it")
    p.add_argument("--cell", type=int, default=128, help="cell size in pixels (default 128)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_grid)
    return p


REF_ACCEPTS = ("--ref takes 'fp' (the --baseline model's own outputs), a folder of images, a .safetensors statistics "
               "file or a builtin dataset")


def check_eval_reference(ref: str, baseline: str | None) -> None:
    """``eval --ref``: usable, and ``fp`` only with ``--baseline``.

    Raises:
        DiffsqueezeError: one line naming what --ref accepts.
    """
    from diffsqueeze.errors import DiffsqueezeError

    if ref == "fp":
        if baseline is None:
            raise DiffsqueezeError("--ref fp (the default) means the --baseline model's own outputs: give --baseline "
                                   "MODEL, or a --ref that is a folder of images, a .safetensors statistics file or a "
                                   "builtin dataset")
        return
    problem = reference_problem(ref)
    if problem:
        raise DiffsqueezeError(f"--ref {problem}; {REF_ACCEPTS}")


def cmd_eval(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.metrics.evaluate import EvalJob, run_eval_job
    from diffsqueeze.metrics.frechet import MIN_FID_IMAGES
    from diffsqueeze.metrics.references import reference_image_problem
    from diffsqueeze.metrics.report import write_report
    from diffsqueeze.models.prompts import load_prompts

    # Every input, cheapest first, before any model is loaded or image generated.
    check_eval_reference(args.ref, args.baseline)
    _check_size_args(args)
    job = EvalJob(model=args.model, reference=args.ref, num_images=args.num_images, batch_size=args.batch_size,
                  prompts=args.prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  baseline=args.baseline, clip_model=args.clip_model, fid_backend=args.fid_backend,
                  features=args.features, resize=args.resize, save_images=args.save_images,
                  kid_subset_size=args.kid_subset_size, height=args.height, width=args.width,
                  kernels=args.kernels, decode=args.decode, threads=args.threads)
    if args.clip_model is not None and not args.clip_model.strip():
        raise DiffsqueezeError("--clip-model is empty")
    load_prompts(args.prompts)
    check_models(args.model, *([args.baseline] if args.baseline else []))
    problem = reference_image_problem(args.ref)  # decodes every image of a --ref folder
    if problem:
        raise DiffsqueezeError(f"--ref: {problem}")
    quiet_libraries()
    _, dtype = _device_dtype(args)  # the device stays args.device: None lets accelerate place each process
    out = Path(args.out)
    metrics = run_eval_job(job, out, device=args.device, dtype=dtype, overwrite=args.overwrite, progress=not args.no_progress)
    if metrics is None:  # not the main process
        return 0
    write_report(out)
    f = metrics["fid"]
    line = (f"FID {f['value']:.4f}" + (f"  KID {f['kid_mean']:.5f} +- {f['kid_std']:.5f}" if f.get("kid_mean") is not None else "")
            + f"  [{f['backend']}, {f['weights']} sha256 {f['weights_sha256'][:12]}, resize {f['resize']}, "
            f"{f['num_generated']} generated vs {f['num_reference']} reference ({f['reference']}), "
            f"{f['sampler'].split('(')[0]} {f['steps']} steps, guidance {'none' if f['guidance'] is None else f['guidance']}, seeds 0..{job.num_images - 1}, "
            f"prompts {job.prompts}, kernels {f['kernels']}/{f['decode']} on {f['device']}, {f['torch_threads']} torch "
            f"thread{'s' if f['torch_threads'] != 1 else ''} per process]")
    print(line)
    if min(f["num_generated"], f["num_reference"]) < MIN_FID_IMAGES:
        print(f"  (not meaningful: a Frechet distance needs >= {MIN_FID_IMAGES} images on each side; "
              f"use --num-images {MIN_FID_IMAGES} or more)")
    if "clip_score" in metrics and metrics["clip_score"]["value"] is None:
        print(metrics["clip_score"]["note"])
    elif "clip_score" in metrics:
        print(f"CLIP score {metrics['clip_score']['value']:.3f}  [{metrics['clip_score']['clip_model']}]")
    if "fidelity" in metrics:
        fd = metrics["fidelity"]
        print(f"fidelity to {args.baseline}: PSNR {fd['psnr']:.2f} dB  SSIM {fd['ssim']:.4f}  ({fd['lpips_note']})")
    print(f"metrics: {out / 'metrics.json'}  report: {out / 'report.md'}")
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze eval --model PATH_OR_ID --ref REF --num-images N [--batch-size B] [--out DIR] [--baseline MODEL]``."""
    p = subparsers.add_parser(
        "eval", help="FID/KID, CLIP score and fidelity of a model (multi-process with accelerate launch)",
        description="Generate N images (image i: seed i, prompt i mod P), score FID/KID against --ref, the CLIP score "
        "(--clip-model) and PSNR/SSIM against --baseline for the same prompts and seeds. Run under "
        "`accelerate launch -m diffsqueeze eval ...` to shard across processes (identical results for any number). "
        "Resumable: rerun the same command to continue.")
    p.add_argument("--model", required=True, help="builtin:NAME, diffusers folder, run directory or hub id")
    p.add_argument("--ref", default="fp", help="reference: 'fp' (the --baseline model's own outputs), a folder of images, "
                   "a .safetensors statistics file or builtin:fashion-mnist (default fp)")
    p.add_argument("--num-images", type=int, default=64, help=f"images to generate (default 64, at most {MAX_EVAL_IMAGES:,})")
    p.add_argument("--out", default="eval-out", help="output folder: shards, metrics.json, report (default eval-out)")
    p.add_argument("--baseline", default=None, help="model to compare with for the same prompts and seeds (PSNR/SSIM, --ref fp)")
    p.add_argument("--clip-model", default=None, help="CLIP for the CLIP score: local folder, hub id or builtin:fashion-clip")
    p.add_argument("--fid-backend", default="torchmetrics", choices=["torchmetrics", "clean-fid"], help="feature pipeline (default torchmetrics)")
    p.add_argument("--resize", default="clean", choices=["clean", "bilinear_aa", "bilinear", "tf_bilinear"],
                   help="resize to 299x299 for Inception (default clean; see docs/metrics.md)")
    p.add_argument("--features", default="inception", choices=["inception", "tiny-random"],
                   help="feature network: inception (FID weights) or tiny-random (tests/smoke only, meaningless numbers)")
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, clipped to the set sizes (default 1000)")
    p.add_argument("--save-images", action="store_true", help="also write the images as PNG (images/, images-baseline/)")
    p.add_argument("--overwrite", action="store_true", help="discard shards of a previous job with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process for generation and features (default 1); images are identical for "
                        "any number of processes at the same value, so use more processes, not threads, for speed")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_eval)
    return p


def cmd_prune_sweep(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.metrics.compare import write_marked_section
    from diffsqueeze.metrics.references import reference_image_problem
    from diffsqueeze.run.prune_sweep import (
        PLOT_FILE,
        Series,
        prune_sweep,
        sweep_markdown,
    )
    from diffsqueeze.models.conditioning import pipeline_prompts
    from diffsqueeze.models.prompts import load_prompts

    check_models(args.model)
    load_prompts(args.prompts)  # a missing prompt file fails before the model loads
    series = [Series(tuple(c.partition("@")[0].split("+")), c.partition("@")[2])
              if "@" in c else Series(tuple(c.split("+")), pattern)
              for c in args.components for pattern in ([None] if "@" in c else args.patterns)]
    problem = reference_problem(args.ref) or reference_image_problem(args.ref) if args.ref else None
    if problem:
        raise DiffsqueezeError(f"--ref: {problem}")
    if args.results and not Path(args.results).is_file():
        raise DiffsqueezeError(f"--results '{args.results}' is not a file")
    quiet_libraries()
    device, dtype = _device_dtype(args)
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    prompts = pipeline_prompts(pipe, args.prompts)
    result = prune_sweep(pipe, series, sorted(set(args.sparsities)), prompts, args.num_images, Path(args.out),
                         steps=args.steps, guidance=args.guidance, real_reference=args.ref, clip_model=args.clip_model,
                         batch_size=args.batch_size, features=args.features)
    out = Path(args.out)
    print((out / "sweep.md").read_text(encoding="utf-8"))
    print(f"sweep: {out / 'sweep.md'}  {out / 'sweep.json'}  plot: {out / PLOT_FILE}")
    if args.results:
        write_marked_section(Path(args.results), "prune_sweep", sweep_markdown(result, command=_sweep_command(args)),
                             "Pruning: quality against sparsity")
        print(f"table written into {args.results}")
    return 0


def _sweep_command(args: argparse.Namespace) -> str:
    """The command that regenerates a sweep table (written under it)."""
    parts = ["diffsqueeze prune-sweep", f"--model {args.model}", "--components " + " ".join(args.components),
             "--patterns " + " ".join(args.patterns), "--sparsities " + " ".join(f"{s:g}" for s in args.sparsities),
             f"--num-images {args.num_images}", f"--prompts {args.prompts}", f"--features {args.features}"]
    for flag, value in (("--ref", args.ref), ("--clip-model", args.clip_model), ("--steps", args.steps),
                        ("--guidance", args.guidance)):
        if value is not None:
            parts.append(f"{flag} {value}")
    parts += [f"--out {args.out}", f"--results {args.results}"]
    return " ".join(parts)


def add_prune_sweep_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze prune-sweep --model M --components unet text_encoder unet+text_encoder --sparsities ...``."""
    p = subparsers.add_parser(
        "prune-sweep", help="quality against sparsity of magnitude pruning, and the knee where it collapses",
        description="Prune fresh copies of the model at each sparsity (per component, components joined with '+' "
        "pruned together; unstructured and/or N:M), generate the same images as the original (image i: prompt i mod "
        "P, seed i) and score FID vs the original, PSNR/SSIM, CLIP score (and FID vs real with --ref). Writes "
        "sweep.md, sweep.json and quality_vs_sparsity.svg, and names the knee of each series.")
    p.add_argument("--model", required=True, help="builtin:NAME, diffusers folder, run directory or hub id")
    p.add_argument("--components", nargs="+", default=["denoiser"],
                   help="one series per entry: a component (unet, text_encoder, denoiser) or several joined by '+'; "
                        "a '@N:M' suffix (unet@2:4) gives that entry its own pattern instead of --patterns")
    p.add_argument("--patterns", nargs="+", default=["unstructured"], help="unstructured and/or N:M (e.g. 2:4)")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                   help="unstructured sparsities (N:M series use 1 - N/M)")
    p.add_argument("--num-images", type=int, default=64, help="images per row (default 64)")
    p.add_argument("--ref", default=None, help="real reference for FID vs real (a folder, builtin:fashion-mnist); default none")
    p.add_argument("--clip-model", default=None, help="CLIP for the CLIP score (builtin:fashion-clip, a folder or hub id)")
    p.add_argument("--out", default="prune-sweep", help="output folder (default prune-sweep)")
    p.add_argument("--results", default=None, help="also write the table into this Markdown file (docs/RESULTS.md)")
    p.add_argument("--features", default="inception", choices=["inception", "tiny-random"],
                   help="feature network for FID: inception (FID weights) or tiny-random (tests only, meaningless numbers)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_prune_sweep)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.metrics.report import write_report

    dirs = [Path(d) for d in args.dirs]
    for d in dirs:
        if not d.is_dir():
            raise DiffsqueezeError(f"'{d}' is not a directory")
    out = Path(args.out) if args.out else (dirs[0] if len(dirs) == 1 else None)
    if out is None:
        raise DiffsqueezeError("several directories: give --out DIR for the comparison report")
    path = write_report(dirs[0], dirs[1:], out_dir=out, title=args.title)
    print(f"report: {path}  {path.with_suffix('.html')}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze report RUN_DIR... [--out DIR]``."""
    p = subparsers.add_parser("report", help="report.md / report.html from metrics.json of one or more runs",
                              description="Rewrite a run's (or eval's) report from its metrics.json; with several "
                              "directories, write one comparison report (table per run, quality-vs-size plot across runs).")
    p.add_argument("dirs", nargs="+", help="run or eval directories holding metrics.json")
    p.add_argument("--out", default=None, help="output folder (default: the directory itself; required for several)")
    p.add_argument("--title", default=None, help="report title")
    p.set_defaults(func=cmd_report)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from diffsqueeze.errors import DiffsqueezeError
    from diffsqueeze.models.io import model_folder
    from diffsqueeze.run.target_exports import check_target, export_target

    folder = model_folder(args.run) if Path(args.run).exists() else None
    if folder is None or not (folder / "model_index.json").is_file():
        raise DiffsqueezeError(f"'{args.run}' holds no exported model (a run directory with model/, or its model/)")
    out = Path(args.out) if args.out else folder.parent / f"export-{args.format}"
    if out.exists():
        raise DiffsqueezeError(f"--out '{out}' exists; choose another folder or remove it")
    check_target(args.format)  # before the model loads: a package that cannot load the export is one line
    quiet_libraries()
    report = export_target(args.format, folder, out, allow_float=args.allow_float)
    for comp, entry in report["components"].items():
        sizes = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(entry["quantized_layer_bytes"].items()))
        print(f"{comp}: {entry['file']} {entry['bytes'] / 2**20:.2f} MiB (quantized layers: {sizes}; "
              f"{len(entry['float_layers'])} written in float)")
    print(f"exported: {out}   (load it with plain diffusers: {out / 'LOAD.md'})")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """``diffsqueeze export RUN --format gguf|torchao [--out DIR] [--allow-float]``."""
    p = subparsers.add_parser("export", help="write a run's model in a format plain diffusers loads (GGUF, torchao)",
                              description="Write the run's compressed model so that plain diffusers loads it: GGUF "
                              "files, or torchao tensors in safetensors with a TorchAoConfig, holding the run's own "
                              "codes for the compressed components, the rest as a diffusers folder, and LOAD.md with "
                              "the lines that load it. Layers the format cannot express are refused by name (or, with "
                              "--allow-float, written in float and listed).")
    p.add_argument("run", help="run directory or its model/ folder")
    # run/target_exports.py:EXPORT_FORMATS, spelled out: the parser is built before torch is imported
    p.add_argument("--format", required=True, choices=("gguf", "torchao"), help="target format")
    p.add_argument("--out", default=None, help="output folder, must not exist (default: RUN/export-FORMAT)")
    p.add_argument("--allow-float", action="store_true",
                   help="write layers the format cannot express as float weights (their computation then differs)")
    p.set_defaults(func=cmd_export)
    return p
