"""Run a recipe's stages in order with atomic checkpoints, a manifest and ``--resume``."""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import yaml

from diffsqueeze.errors import RunDirError
from diffsqueeze.loading import load_pipeline, load_with_state
from diffsqueeze.process_memory import peak_rss_mb
from diffsqueeze.models import save_pipeline
from diffsqueeze.pipelines.checkpoint import (
    fsync_dir,
    read_checkpoint,
    write_checkpoint,
)
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.manifest import (
    new_manifest,
    now,
    read_manifest,
    write_manifest,
)
from diffsqueeze.pipelines.run_evaluation import evaluate_run
from diffsqueeze.quant.export.save import export_pipeline, needs_packed_export
from diffsqueeze.recipe import Recipe
from diffsqueeze.stages import STAGES

log = logging.getLogger(__name__)
MODEL_DIR = "model"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunDirError("device: cuda was asked for but no CUDA device is available (use device: auto or cpu)")
    return torch.device(name)


def stage_seed(seed: int, index: int) -> int:
    """A stage's seed, fixed by the recipe seed and the stage's position."""
    return int(hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:8], 16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reusable_stages(old: dict | None, hashes: list[str], run_dir: Path) -> int:
    """How many leading stages of an earlier run match this recipe and have a checkpoint."""
    if not old:
        return 0
    n = 0
    for entry, h in zip(old.get("stages", []), hashes):
        if entry.get("status") != "done" or entry.get("hash") != h or not (run_dir / entry["checkpoint"]).is_dir():
            break
        n += 1
    return n


def prepare_run_dir(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, dict | None, int]:
    """Check the output directory against the recipe; return it, the old manifest and reusable stages.

    Raises:
        RunDirError: the directory holds another run (or other files) and neither ``--resume``
            (with a matching recipe) nor ``--overwrite`` was given.
    """
    run_dir = Path(recipe.output_dir)
    if overwrite and run_dir.exists():
        if run_dir.is_dir() and any(run_dir.iterdir()) and read_manifest(run_dir) is None:
            raise RunDirError(f"output_dir '{run_dir}' is not a diffsqueeze run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        old = read_manifest(run_dir)
        if old is None:
            raise RunDirError(f"output_dir '{run_dir}' is not empty and is not a diffsqueeze run directory; choose another output_dir")
        if not resume:
            raise RunDirError(f"output_dir '{run_dir}' already holds a run (recipe {old.get('recipe_hash')}, "
                              f"status {old.get('status')}); pass --resume to continue it or --overwrite to replace it")
        n = reusable_stages(old, recipe.stage_hashes(), run_dir)
        if n == 0 and old.get("model") != recipe.model:
            raise RunDirError(f"output_dir '{run_dir}' holds a run of a different model ({old.get('model')}); "
                              f"nothing to resume: choose another output_dir or pass --overwrite")
        return run_dir, old, n
    return run_dir, None, 0


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every stage of ``recipe``, export the model, evaluate; return the run directory.

    Validation (stage configs against the loaded pipeline) happens before any stage runs.
    """
    registry = STAGES
    stages = [registry[s.name].stage_cls(s.config) for s in recipe.stages]
    run_dir, old, reuse = prepare_run_dir(recipe, resume, overwrite)
    device = resolve_device(recipe.device)
    pipe, state = load_with_state(recipe.model, str(device), recipe.dtype)
    for stage in stages:
        stage.check(pipe)

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_plain(), sort_keys=False), encoding="utf-8")
    hashes = recipe.stage_hashes()
    manifest = new_manifest(recipe.recipe_hash(), recipe.model, [(s.name, h) for s, h in zip(recipe.stages, hashes)])
    if old:
        manifest["created"] = old.get("created", manifest["created"])
        manifest["stages"][:reuse] = old["stages"][:reuse]
    _remove_stale(run_dir, manifest, reuse)
    write_manifest(run_dir, manifest)

    changed: set[str] = set()
    if reuse:
        state, changed = read_checkpoint(pipe, run_dir / manifest["stages"][reuse - 1]["checkpoint"])
        log.info("resuming after stage %d (%s)", reuse - 1, recipe.stages[reuse - 1].name)
    ctx = StageContext(recipe=recipe, index=0, run_dir=run_dir, device=device, seed=recipe.seed, state=state,
                       teacher_factory=lambda: load_pipeline(recipe.model, str(device), recipe.dtype), changed=changed)
    for i in range(reuse, len(stages)):
        _run_stage(pipe, stages[i], i, ctx, manifest)
    export_model(pipe, ctx, run_dir, manifest)
    if recipe.eval is not None:
        manifest["eval"] = {"status": "running"}
        write_manifest(run_dir, manifest)
        manifest["eval"] = {"status": "done", "metrics": evaluate_run(pipe, ctx.teacher(), recipe.eval, run_dir, ctx.state.history)}
    manifest["status"] = "complete"
    manifest["finished"] = now()
    write_manifest(run_dir, manifest)
    return run_dir


def _remove_stale(run_dir: Path, manifest: dict, reuse: int) -> None:
    """Delete checkpoints, temp folders and the model of stages that will run again."""
    for entry in manifest["stages"][reuse:]:
        shutil.rmtree(run_dir / entry["checkpoint"], ignore_errors=True)
    stages_dir = run_dir / "stages"
    if stages_dir.is_dir():
        for tmp in stages_dir.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    for name in (MODEL_DIR, f".tmp-{MODEL_DIR}"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _run_stage(pipe, stage, i: int, ctx: StageContext, manifest: dict) -> None:
    entry = manifest["stages"][i]
    ctx.index, ctx.seed = i, stage_seed(ctx.recipe.seed, i)
    seed_everything(ctx.seed)
    entry.update(status="running", started=now())
    write_manifest(ctx.run_dir, manifest)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    try:
        summary = stage.apply(pipe, ctx)
    except BaseException as exc:
        entry.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=5))
        manifest["status"] = "failed"
        write_manifest(ctx.run_dir, manifest)
        raise
    wall = time.perf_counter() - t0
    ctx.state.history.append({"index": i, "name": entry["name"], "summary": summary})
    write_checkpoint(pipe, ctx.state, ctx.changed, ctx.run_dir / entry["checkpoint"])
    entry.update(status="done", finished=now(), wall_time_s=round(wall, 3), peak_rss_mb=round(peak_rss_mb(), 1), summary=summary)
    if ctx.device.type == "cuda":
        entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
    write_manifest(ctx.run_dir, manifest)
    log.info("stage %d (%s) done in %.1f s", i, entry["name"], wall)


def export_model(pipe, ctx: StageContext, run_dir: Path, manifest: dict) -> None:
    """Save the compressed pipeline to ``model/`` atomically."""
    tmp, final = run_dir / f".tmp-{MODEL_DIR}", run_dir / MODEL_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    qmap = export_pipeline(pipe, ctx.state, tmp) if needs_packed_export(ctx.state) else None
    if qmap is None:  # no quantized layers (e.g. pruning only): plain diffusers folder + masks
        save_pipeline(pipe, tmp, ctx.state)
    fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    manifest["model"] = ctx.recipe.model
    manifest["export"] = {"path": MODEL_DIR, "bytes": sum(f.stat().st_size for f in final.rglob("*") if f.is_file())}
    if qmap is not None:
        manifest["export"]["packed"] = {c: v["bytes"] for c, v in qmap["components"].items()}
    write_manifest(run_dir, manifest)
