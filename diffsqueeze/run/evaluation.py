"""Scoring at the end of ``diffsqueeze run``: the compressed pipeline against the original.

:func:`evaluate_run` draws the compressed-vs-original grid, runs the evaluation job
(:func:`diffsqueeze.metrics.evaluate.run_eval_job`) when the recipe asks for FID images, scores
the intermediate stage checkpoints, and writes ``metrics.json`` and the reports.

It reads the run's manifest (:mod:`diffsqueeze.pipelines.manifest`) and stage checkpoints
(:mod:`diffsqueeze.run.checkpoint`), so it sits in :mod:`diffsqueeze.run`, above both the metrics
and the pipelines: the runner imports it, and nothing in :mod:`diffsqueeze.metrics` may import it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.atomic_files import atomic_write_text
from diffsqueeze.metrics.clip_score import ClipScorer, aggregate
from diffsqueeze.metrics.config import EvalConfig
from diffsqueeze.metrics.evaluate import METRICS_FORMAT, EvalJob, run_eval_job
from diffsqueeze.metrics.feature_nets import load_feature_net
from diffsqueeze.metrics.fidelity import fidelity_summary, per_image_fidelity
from diffsqueeze.metrics.grid import (
    GridColumn,
    generate_images,
    grid_rows,
    make_paired_grid,
)
from diffsqueeze.models.conditioning import clip_not_applicable, conditioning_of, pipeline_prompts
from diffsqueeze.metrics.pipeline_info import (
    denoiser_bytes,
    denoiser_name,
    resolve_sampling,
    sampler_description,
)

__all__ = ["evaluate_run"]


def evaluate_run(pipe, teacher, cfg: EvalConfig, out_dir: Path, history: list[dict],
                 compute: str = "simulated: the in-memory model, bit-identical to model/") -> dict:
    """Score a compressed pipeline against the original at the end of ``diffsqueeze run``.

    Writes ``grids/compressed-vs-original.png``, ``metrics.json``, ``report.md`` and
    ``report.html`` into ``out_dir`` and returns a short summary for the manifest.

    Args:
        pipe: the compressed pipeline.
        teacher: the original (FP) pipeline.
        cfg: the recipe's ``eval:`` section.
        out_dir: the run directory.
        history: the stages' summaries (``CompressionState.history``).
        compute: how ``pipe`` computes (recorded in ``metrics.json``).
    """
    from diffsqueeze.metrics.report import write_report

    out_dir = Path(out_dir)
    device = str(next(iter(p.device for p in getattr(pipe, denoiser_name(pipe)).parameters())))
    prompts = pipeline_prompts(teacher, cfg.prompts)
    text = conditioning_of(teacher).has_text
    clip = ClipScorer.from_spec(cfg.clip_model, device=device) if cfg.clip_model and text else None
    metrics: dict[str, Any] = {"format": METRICS_FORMAT, "kind": "run", "model": str(out_dir / "model"),
                               "baseline": "original (FP) pipeline", "compute": compute}

    steps, guidance = resolve_sampling(teacher, cfg.num_inference_steps, cfg.guidance_scale)
    cfg = dataclasses.replace(cfg, num_inference_steps=steps, guidance_scale=guidance)
    grid_prompts = prompts[: cfg.grid_prompts]
    row_prompts, row_seeds, _ = grid_rows(grid_prompts, cfg.seeds)
    ours, theirs = (generate_images(p, row_prompts, row_seeds, cfg.num_inference_steps, cfg.guidance_scale,
                                    cfg.batch_size, cfg.height, cfg.width) for p in (pipe, teacher))
    generation = {"sampler": sampler_description(pipe), "steps": cfg.num_inference_steps, "guidance": cfg.guidance_scale,
                  "prompt_source": cfg.prompts, "conditioning": conditioning_of(teacher).kind,
                  "size": f"{ours.shape[-2]}x{ours.shape[-1]}"}
    size, measured = denoiser_bytes(pipe, out_dir / "model" if (out_dir / "model").is_dir() else None)
    tsize, tmeasured = denoiser_bytes(teacher)
    metrics["size"] = {"denoiser_bytes": size, "measured": measured}
    base: dict[str, Any] = {"model": "original", "size": {"denoiser_bytes": tsize, "measured": tmeasured}}
    grid_scope = {**generation, "seeds": list(cfg.seeds), "images": f"grid: {len(grid_prompts)} prompts x {len(cfg.seeds)} seeds"}

    if cfg.grid:
        grid_dir = out_dir / "grids"
        grid_dir.mkdir(parents=True, exist_ok=True)
        cols = [GridColumn("original", theirs), GridColumn("compressed", ours)]
        cell = 64 if ours.shape[-1] <= 64 else 128  # small images upscaled, large ones shrunk: the grid fits a screen
        make_paired_grid(cols, grid_prompts, cfg.seeds, cell=cell).save(grid_dir / "compressed-vs-original.png")
        metrics["grid"] = "grids/compressed-vs-original.png"

    if cfg.num_images > 0:
        job = EvalJob(model=str(out_dir / "model"), reference=cfg.reference, num_images=cfg.num_images,
                      batch_size=cfg.batch_size, prompts=cfg.prompts, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, baseline="original", clip_model=cfg.clip_model,
                      fid_backend=cfg.fid_backend, save_images=cfg.save_images, features=cfg.features,
                      height=cfg.height, width=cfg.width)
        extractor = load_feature_net(cfg.features, device=device, resize="clean")
        job_metrics = run_eval_job(job, out_dir / "eval", pipe=pipe, baseline_pipe=teacher, extractor=extractor, clip=clip,
                                   device=device, dtype=_dtype_name(pipe), overwrite=True)
        for k in ("fid", "clip_score", "fidelity", "generation"):
            if k in job_metrics:
                metrics[k] = job_metrics[k]
        for k in ("fid", "clip_score"):
            if k in job_metrics.get("baseline_scores", {}):
                base[k] = job_metrics["baseline_scores"][k]
    else:
        metrics["generation"] = grid_scope
        if cfg.fidelity:
            metrics["fidelity"] = {**fidelity_summary(per_image_fidelity(ours, theirs)), **{"scope": grid_scope["images"]}}
        if clip is not None:
            metrics["clip_score"] = {"value": aggregate(clip.cosine_x100(ours, row_prompts)), "n": len(row_prompts),
                                     **clip.provenance(), **grid_scope}
            base["clip_score"] = {"value": aggregate(clip.cosine_x100(theirs, row_prompts)), "n": len(row_prompts)}
        metrics["fid"] = {"value": None, "note": "FID/KID skipped: eval.num_images is 0"}
    if cfg.clip_model and not text:
        metrics["clip_score"] = {"value": None, "note": clip_not_applicable(teacher)}
    metrics["baseline_scores"] = base
    metrics["stages"] = [dict(h) for h in history]
    if cfg.score_stages and len(history) > 1:
        _score_stages(metrics["stages"][:-1], teacher, cfg, out_dir, row_prompts, row_seeds, theirs, clip)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    write_report(out_dir)
    summary = {k: (metrics.get(k) or {}).get("value") for k in ("fid", "clip_score")}
    summary.update(psnr=(metrics.get("fidelity") or {}).get("psnr"), ssim=(metrics.get("fidelity") or {}).get("ssim"),
                   metrics="metrics.json", report="report.md")
    return summary


def _score_stages(stages: list[dict], teacher, cfg: EvalConfig, out_dir: Path, prompts: list[str], seeds: list[int],
                  original: torch.Tensor, clip: ClipScorer | None) -> None:
    """Add size, fidelity and CLIP score (on the grid's prompts and seeds) to each intermediate stage.

    A stage's model is the original with the stage checkpoint loaded; its size is the bytes of the
    checkpoint's denoiser file (unpacked state dict) or, if the stage left the denoiser alone, the
    original's. The last stage is the exported model, scored as "compressed".
    """
    import copy

    from diffsqueeze.pipelines.manifest import read_manifest
    from diffsqueeze.run.checkpoint import read_checkpoint

    manifest = read_manifest(out_dir) or {}
    entries = {e.get("index"): e for e in manifest.get("stages", [])}
    name = denoiser_name(teacher)
    for st in stages:
        folder = out_dir / str(entries.get(st.get("index"), {}).get("checkpoint", ""))
        if not folder.is_dir() or folder == out_dir:
            st["scores_note"] = "no checkpoint to score"
            continue
        model = copy.deepcopy(teacher)
        try:
            read_checkpoint(model, folder)
        except DiffsqueezeError as exc:
            st["scores_note"] = f"checkpoint unreadable: {exc}"
            continue
        images = generate_images(model, prompts, seeds, cfg.num_inference_steps, cfg.guidance_scale, cfg.batch_size,
                                 cfg.height, cfg.width)
        weights = folder / f"{name}.safetensors"
        size = (weights.stat().st_size, "disk (stage checkpoint, unpacked)") if weights.is_file() else denoiser_bytes(model)
        st["size"] = {"denoiser_bytes": size[0], "measured": size[1]}
        st["fidelity"] = {k: float(v.mean()) for k, v in per_image_fidelity(images, original).items()}
        st["scope"] = f"grid: {len(prompts)} images (prompt x seed)"
        if clip is not None:
            st["clip_score"] = {"value": aggregate(clip.cosine_x100(images, prompts))}
        del model


def _dtype_name(pipe) -> str:
    """The denoiser's dtype as the evaluation job names it (``float32`` for anything else)."""
    dtype = next(getattr(pipe, denoiser_name(pipe)).parameters()).dtype
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "float32")
