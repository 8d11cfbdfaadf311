"""Run a recipe's stages in order with atomic checkpoints, a manifest, ``--resume`` and a safe ``--overwrite``."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import shutil
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import yaml

from diffsqueeze.config_parse import join_path
from diffsqueeze.errors import DiffsqueezeError, RecipeError, RunDirError, one_line
from diffsqueeze.loading import load_pipeline, load_with_state
from diffsqueeze.metrics.references import reference_image_problem
from diffsqueeze.models import save_pipeline
from diffsqueeze.pipelines.calibration import collect_calibration
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.distributed import barrier, init_from_env, is_main, local_device, rank
from diffsqueeze.pipelines.faults import maybe_kill
from diffsqueeze.pipelines.manifest import (
    check_output_dir,
    check_run_dir,
    is_run_dir,
    new_manifest,
    now,
    probe_writable,
    replaced_dir,
    replacement_dir,
    write_manifest,
)
from diffsqueeze.pipelines.run_lock import hold_model_run, hold_output_dir, model_run_dir
from diffsqueeze.process_memory import peak_rss_mb, reset_peak_rss, return_freed_memory
from diffsqueeze.quant.export.save import export_pipeline, export_size_estimate, needs_packed_export
from diffsqueeze.recipe import Recipe
from diffsqueeze.run.checkpoint import (
    fsync_dir,
    read_checkpoint,
    replace_folder,
    write_checkpoint,
)
from diffsqueeze.run.disk_space import check_free_space, disk_error
from diffsqueeze.run.evaluation import evaluate_run
from diffsqueeze.run.generation_check import check_generates
from diffsqueeze.run.target_exports import EXPORT_FORMATS, check_recipe_targets, write_recipe_targets
from diffsqueeze.run.teacher import load_teacher
from diffsqueeze.stages import STAGES

log = logging.getLogger(__name__)
MODEL_DIR = "model"
#: What the end-of-run evaluation writes into a run directory.
EVAL_OUTPUTS = ("metrics.json", "report.md", "report.html", "grids", "eval")


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


def plan_run(recipe: Recipe, resume: bool, overwrite: bool) -> tuple[Path, dict | None, int]:
    """Decide, without changing anything, where the run is written, what it continues and how many stages it reuses.

    A new run in a fresh (or empty) ``output_dir`` is written there; ``--resume`` continues the
    run in place; ``--overwrite`` of a run writes the new run into :func:`replacement_dir`, which
    replaces ``output_dir`` once its model exists; ``--resume --overwrite`` continues such a
    replacement that was interrupted (``--resume`` alone refuses to choose between the two).

    Returns:
        The folder the run writes into, the manifest it continues (or None) and the stages it reuses.

    Raises:
        RecipeError: output_dir cannot be written.
        RunDirError: the directory holds another run (or other files) and neither ``--resume``
            (with a matching recipe) nor ``--overwrite`` was given.
    """
    run_dir = Path(recipe.output_dir)
    check_output_dir(recipe.output_dir, recipe.model, probe=True)
    where, old = check_run_dir(run_dir, resume, overwrite)
    if overwrite and is_run_dir(run_dir) and where != replacement_dir(run_dir):
        probe_writable(replacement_dir(run_dir).parent, recipe.output_dir)
        return replacement_dir(run_dir), None, 0
    if where is None:
        return run_dir, None, 0
    n = reusable_stages(old, recipe.stage_hashes(), where)
    if n == 0 and old.get("model") != recipe.model:
        raise RunDirError(f"output_dir '{run_dir}' holds a run of a different model ({old.get('model')}); "
                          f"nothing to resume: choose another output_dir or pass --overwrite")
    return where, old, n


def _check_stages(recipe: Recipe, stages: list, pipe) -> None:
    """Every stage's ``check(pipe)``; its errors carry the stage's key path (``stages[1].ptq.include``)."""
    for i, (spec, stage) in enumerate(zip(recipe.stages, stages)):
        where = f"stages[{i}].{spec.name}"
        try:
            stage.check(pipe)
        except RecipeError as exc:
            path = exc.path if exc.path.startswith("stages[") else join_path(where, exc.path)
            raise RecipeError(path, exc.message) from None
        except DiffsqueezeError as exc:
            raise RecipeError(where, str(exc)) from None


def run_recipe(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every stage of ``recipe``, export the model, evaluate; return the run directory.

    Everything that can fail on the input (output_dir, the stages' configs against the loaded
    pipeline, the checkpoint a resumed run continues from) is checked before the first file is
    written. Nothing of an earlier run is deleted before what replaces it exists; a failure
    (or Ctrl-C) after that point is recorded in the manifest (status ``failed``, the error).
    """
    stages = [STAGES[s.name].stage_cls(s.config) for s in recipe.stages]
    return_freed_memory()  # freed weight-sized temporaries must not stay resident (process_memory.py)
    device = local_device(resolve_device(recipe.device))
    if init_from_env(device):
        if resume:
            raise RunDirError("--resume is not supported under a multi-process launch yet; resume with one process")
        if not is_main():
            return _run_as_follower(recipe, stages, device)
    shown = Path(recipe.output_dir)
    if shown.resolve() != shown.absolute():  # through a symbolic link: the run is written where it
        recipe = dataclasses.replace(recipe, output_dir=str(shown.resolve()))  # points; the link stays

    check_output_dir(recipe.output_dir, recipe.model, probe=True)  # a folder the lock file can go beside
    with ExitStack() as held:
        held.enter_context(hold_output_dir(recipe.output_dir))
        if (lock := hold_model_run(recipe.model)) is not None:
            held.enter_context(lock)
        _run_main(recipe, stages, device, resume, overwrite)
    return shown


def _run_main(recipe: Recipe, stages: list, device: torch.device, resume: bool, overwrite: bool) -> None:
    """:func:`run_recipe` in the main process, holding its output_dir (and its model's run directory)."""
    run_dir = Path(recipe.output_dir)
    work, old, reuse = plan_run(recipe, resume, overwrite)
    source = model_fingerprint(recipe.model)
    if recipe.eval is not None and (problem := reference_image_problem(recipe.eval.reference)):
        raise RecipeError("eval.reference", problem)  # found now, not after every stage has run
    pipe, state = load_with_state(recipe.model, str(device), recipe.dtype)
    _check_stages(recipe, stages, pipe)
    check_recipe_targets(recipe, pipe)
    changed: set[str] = set()
    if reuse:  # read (and so validate) the checkpoint before anything is written
        state, changed = read_checkpoint(pipe, work / old["stages"][reuse - 1]["checkpoint"])
        log.info("resuming after stage %d (%s)", reuse - 1, recipe.stages[reuse - 1].name)

    if old is None and work == replacement_dir(run_dir):
        shutil.rmtree(work, ignore_errors=True)  # an earlier, abandoned replacement: this one starts afresh
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_plain(), sort_keys=False), encoding="utf-8")
    hashes = recipe.stage_hashes()
    manifest = new_manifest(recipe.recipe_hash(), recipe.model, [(s.name, h) for s, h in zip(recipe.stages, hashes)])
    if source:
        manifest["model_manifest_sha256"] = source
    if old:
        manifest["created"] = old.get("created", manifest["created"])
        manifest["stages"][:reuse] = old["stages"][:reuse]
    write_manifest(work, manifest)

    ctx = _stage_context(recipe, stages, pipe, state, device, work, changed, manifest.setdefault("teacher", {}),
                         source)
    try:
        if reuse == 0 and any(STAGES[s.name].calibrated for s in recipe.stages):
            _record_calibration_first(pipe, ctx, manifest)
        for i in range(reuse, len(stages)):
            _run_stage(pipe, stages[i], i, ctx, manifest)
        export_model(pipe, ctx, work, manifest, allow_unpacked=recipe.export.allow_unpacked)
        _remove_leftovers(work, manifest, model_changed=reuse < len(stages))
        if work != run_dir:
            swap_in(work, run_dir)  # the new model exists: the old run goes
            ctx.run_dir = run_dir
        if recipe.export.formats:  # written where they stay: their LOAD.md names the folder
            manifest["export"]["formats"] = write_recipe_targets(recipe, run_dir)
            write_manifest(run_dir, manifest)
        if recipe.eval is not None:
            manifest["eval"] = {"status": "running"}
            write_manifest(run_dir, manifest)
            try:
                scored, compute = pipe, "simulated: the in-memory model, bit-identical to model/"
                if recipe.export.reload_for_eval:  # score the model as it will be deployed
                    scored = load_pipeline(str(run_dir / MODEL_DIR), str(device), recipe.dtype,
                                           kernels=recipe.export.kernels, decode=recipe.export.decode)
                    compute = f"model/ reloaded with kernels={recipe.export.kernels}, decode={recipe.export.decode}"
                metrics = evaluate_run(scored, ctx.teacher(), recipe.eval, run_dir, ctx.state.history, compute)
            except BaseException as exc:
                manifest["eval"] = {"status": "failed", "error": error_text(exc)}
                raise
            manifest["eval"] = {"status": "done", "metrics": metrics}
    except BaseException as exc:
        _record_failure(Path(ctx.run_dir), manifest, exc)
        plain = disk_error(exc, Path(ctx.run_dir))
        if plain is not None:
            raise plain from exc
        raise
    manifest["status"] = "complete"
    manifest["finished"] = now()
    write_manifest(run_dir, manifest)
    barrier()  # the other processes of a data-parallel launch end with the run


def model_fingerprint(model: str) -> str | None:
    """sha256 of the manifest of the run directory ``model`` reads (None for other models): a
    re-run of that folder rewrites its manifest, so the teacher, loaded later, can tell."""
    run_dir = model_run_dir(model)
    if run_dir is None:
        return None
    return hashlib.sha256((run_dir / "manifest.json").read_bytes()).hexdigest()


def _check_model_unchanged(model: str, fingerprint: str | None) -> None:
    """Refuse to load the teacher from a run directory that changed after the student was read."""
    if fingerprint is not None and model_fingerprint(model) != fingerprint:
        raise RunDirError(f"model '{model}' changed after this run read it (its manifest differs): student and "
                          "teacher would be different models; run again")


def _run_as_follower(recipe: Recipe, stages: list, device: torch.device) -> Path:
    """A non-main process of a data-parallel launch (pipelines/distributed.py): the same stages with
    the same seeds on its own copy of the model, its gradient steps summed with the others'; it
    writes nothing of the run (calibration and stage caches go to a scratch folder, removed at
    the end) and returns when the main process has finished the run."""
    scratch = Path(tempfile.mkdtemp(prefix=f"diffsqueeze-rank{rank()}-"))
    try:
        pipe, state = load_with_state(recipe.model, str(device), recipe.dtype)
        _check_stages(recipe, stages, pipe)
        ctx = _stage_context(recipe, stages, pipe, state, device, scratch)
        if any(STAGES[s.name].calibrated for s in recipe.stages):
            collect_calibration(ctx, pipe)
        for i, stage in enumerate(stages):
            _enter_stage(ctx, i)
            summary = stage.apply(pipe, ctx)
            ctx.state.history.append({"index": i, "name": recipe.stages[i].name, "summary": summary})
        barrier()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Path(recipe.output_dir)


def _stage_context(recipe: Recipe, stages: list, pipe, state, device: torch.device, run_dir: Path,
                   changed: set[str] | None = None, teacher_record: dict | None = None,
                   source: str | None = None) -> StageContext:
    """The context the stages share; the teacher loads on first use, holding apart only the
    components some stage writes (``teacher_record``: the manifest's account of it), from the
    same model the student was read from (``source``: :func:`model_fingerprint` at that read)."""
    written = set().union(*(stage.writes(pipe) for stage in stages))

    def teacher():
        _check_model_unchanged(recipe.model, source)
        return load_teacher(recipe, pipe, written, device, teacher_record)

    return StageContext(index=0, run_dir=run_dir, device=device, seed=recipe.seed, state=state,
                        model_spec=recipe.model, recipe_seed=recipe.seed, calibration=recipe.calibration,
                        changed=set() if changed is None else changed,
                        teacher_factory=teacher)


def _enter_stage(ctx: StageContext, i: int) -> None:
    """Stage ``i``'s index and seed, the global generators seeded with it (every process alike)."""
    ctx.index, ctx.seed = i, stage_seed(ctx.recipe_seed, i)
    seed_everything(ctx.seed)


def _record_calibration_first(pipe, ctx: StageContext, manifest: dict) -> None:
    """Record the calibration data from the pipeline before any stage changes it: it is still
    the original, so no teacher copy is loaded for it (stages then find the recording on disk)."""
    reset_peak_rss()
    t0 = time.perf_counter()
    collect_calibration(ctx, pipe)
    manifest["calibration"] = {"wall_time_s": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    write_manifest(ctx.run_dir, manifest)


def error_text(exc: BaseException) -> str:
    """``Type: message`` in one line (``KeyboardInterrupt`` alone when there is no message)."""
    text = one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _record_failure(folder: Path, manifest: dict, exc: BaseException) -> None:
    manifest["status"] = "failed"
    manifest["error"] = error_text(exc)
    try:
        write_manifest(folder, manifest)
    except OSError as err:  # the original error matters more than the record of it
        log.warning("could not record the failure in %s: %s", folder / "manifest.json", err)


def swap_in(new: Path, run_dir: Path) -> None:
    """Put the finished replacement ``new`` at ``run_dir``: two renames, then the old run is deleted.

    A crash between the renames is repaired by the next run on that output_dir
    (:func:`~diffsqueeze.pipelines.manifest.recover_replacement`).
    """
    replace_folder(new, run_dir, replaced_dir(run_dir))


def _remove_leftovers(run_dir: Path, manifest: dict, model_changed: bool) -> None:
    """After the export: delete what no longer belongs to the run (checkpoints of stages the recipe
    lost, half-written temp folders and, when a stage ran again, the evaluation and the
    ``export-<format>`` folders of the model it replaced)."""
    keep = {Path(e["checkpoint"]).name for e in manifest["stages"]}
    stages_dir = run_dir / "stages"
    if stages_dir.is_dir():
        for child in stages_dir.iterdir():
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    shutil.rmtree(run_dir / f".tmp-{MODEL_DIR}", ignore_errors=True)
    if model_changed:  # the evaluation and the exports of the model this run replaced
        for name in (*EVAL_OUTPUTS, *(f"export-{fmt}" for fmt in EXPORT_FORMATS)):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _run_stage(pipe, stage, i: int, ctx: StageContext, manifest: dict) -> None:
    entry = manifest["stages"][i]
    _enter_stage(ctx, i)
    entry.update(status="running", started=now())
    write_manifest(ctx.run_dir, manifest)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    return_freed_memory()
    reset_peak_rss()  # the entry's peak_rss_mb is this stage's own
    t0 = time.perf_counter()
    try:
        summary = stage.apply(pipe, ctx)
        wall = time.perf_counter() - t0  # the stage's own work, without the check below
        check_generates(pipe, ctx.calibration, ctx.recipe_seed, f"stage {i} ({entry['name']})")
        ctx.state.history.append({"index": i, "name": entry["name"], "summary": summary})
        write_checkpoint(pipe, ctx.state, ctx.changed, ctx.run_dir / entry["checkpoint"])
    except BaseException as exc:  # the stage is not done until its checkpoint is written
        entry.update(status="failed", error=error_text(exc), traceback=traceback.format_exc(limit=5))
        raise  # run_recipe records the run as failed and writes the manifest
    entry.update(status="done", finished=now(), wall_time_s=round(wall, 3), peak_rss_mb=round(peak_rss_mb(), 1), summary=summary)
    if ctx.device.type == "cuda":
        entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)
    write_manifest(ctx.run_dir, manifest)
    log.info("stage %d (%s) done in %.1f s", i, entry["name"], wall)


def export_model(pipe, ctx: StageContext, run_dir: Path, manifest: dict, allow_unpacked: bool = False) -> None:
    """Save the compressed pipeline to ``model/`` atomically (``allow_unpacked``: the recipe's
    ``export.allow_unpacked``)."""
    tmp, final = run_dir / f".tmp-{MODEL_DIR}", run_dir / MODEL_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    return_freed_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    packed = needs_packed_export(ctx.state)
    check_free_space(run_dir, export_size_estimate(pipe), "the export of model/")
    qmap = export_pipeline(pipe, ctx.state, tmp, allow_unpacked=allow_unpacked) if packed else None
    if qmap is None:  # no quantized layers (e.g. pruning only): plain diffusers folder + masks
        save_pipeline(pipe, tmp, ctx.state)
    fsync_dir(tmp)
    maybe_kill("export")  # crash tests: the new model written, not yet in place
    replace_folder(tmp, final, run_dir / f".old-{MODEL_DIR}")
    manifest["model"] = ctx.model_spec
    manifest["export"] = {"path": MODEL_DIR, "bytes": sum(f.stat().st_size for f in final.rglob("*") if f.is_file()),
                          "wall_time_s": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if qmap is not None:
        manifest["export"]["packed"] = {c: v["bytes"] for c, v in qmap["components"].items()}
    write_manifest(run_dir, manifest)
