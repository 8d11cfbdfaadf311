"""``manifest.json``: the run's record (recipe hash, stage status, timings, memory, summaries), and
the checks on an ``output_dir`` that come before any work.

The manifest is always replaced atomically, so a reader (or a resumed run) never sees half a
file. A folder holding ``manifest.json`` is a run directory, even when that file is damaged; no
other folder is ever replaced. A run that replaces another one (``--overwrite``) is written into
``.<name>.replacement`` beside it and renamed into place once its model is exported
(:func:`replacement_dir`). This module needs the standard library only, so the command line runs
these checks before its heavy imports.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from diffsqueeze.errors import RecipeError, RunDirError
from diffsqueeze.version import __version__

MANIFEST = "manifest.json"
STATUSES = ("pending", "running", "done", "failed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` is a run directory: it holds ``manifest.json`` (readable or not)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest of ``run_dir``, or None if there is none.

    Raises:
        RunDirError: the file is not JSON, or JSON of another shape than a manifest.
    """
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
    problem = _shape_problem(data)
    if problem:
        raise _damaged(path, problem)
    return data


def _shape_problem(data: Any) -> str | None:
    if not isinstance(data, dict):
        return f"it holds a JSON {type(data).__name__}, not a manifest object"
    stages = data.get("stages", [])
    if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
        return "'stages' is not a list of stage records"
    for i, s in enumerate(stages):
        if not isinstance(s.get("checkpoint"), str) or not isinstance(s.get("hash"), str):
            return f"stage {i} has no valid 'checkpoint'/'hash'"
    if "status" in data and not isinstance(data["status"], str):
        return "'status' is not a string"
    return None


def _damaged(path: Path, why: str) -> RunDirError:
    why = " ".join(why.split())
    return RunDirError(f"{path} is damaged ({why}); replace the run with `diffsqueeze run RECIPE --overwrite` "
                       f"or delete the folder")


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace ``manifest.json``."""
    path = Path(run_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    manifest["updated"] = now()
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def new_manifest(recipe_hash: str, model: str, stages: list[tuple[str, str]]) -> dict:
    """A fresh manifest with every stage pending."""
    return {
        "diffsqueeze_version": __version__,
        "recipe_hash": recipe_hash,
        "model": model,
        "status": "running",
        "created": now(),
        "stages": [
            {"index": i, "name": name, "hash": h, "status": "pending", "checkpoint": f"stages/{i}-{name}"}
            for i, (name, h) in enumerate(stages)
        ],
    }


# ---- output_dir: checked before any work ------------------------------------------------------


def replacement_dir(run_dir: Path) -> Path:
    """Where a run that replaces ``run_dir`` is written until its model is exported."""
    run_dir = Path(run_dir).absolute()
    return run_dir.with_name(f".{run_dir.name}.replacement")


def replaced_dir(run_dir: Path) -> Path:
    """Where the replaced run lies for the moment between the two renames of a swap."""
    run_dir = Path(run_dir).absolute()
    return run_dir.with_name(f".{run_dir.name}.replaced")


def check_output_dir(output_dir: str, model: str | None = None, probe: bool = True) -> None:
    """Fail on an ``output_dir`` that cannot take a run, without writing anything but a probe.

    Refused: the model's own folder, a folder inside it or one holding it (``--overwrite`` would
    replace the source before it is read); a path that is or lies under a regular file; and, with
    ``probe``, a folder where no file can be created (the probe is created in the nearest folder
    that exists, and removed).

    Raises:
        RecipeError: at ``output_dir``, saying why and what to do.
    """
    out = Path(output_dir)
    if model and not model.startswith("builtin:") and Path(model).exists():
        m, o = Path(model).resolve(), out.resolve()
        if m == o:
            raise RecipeError("output_dir", f"'{output_dir}' is the model's own folder (model: {model}); the run would "
                              f"replace its source: choose another output_dir")
        if m in o.parents:
            raise RecipeError("output_dir", f"'{output_dir}' lies inside the model folder '{model}'; choose an "
                              f"output_dir outside it")
        if o in m.parents:
            raise RecipeError("output_dir", f"'{output_dir}' holds the model '{model}'; the run would replace its "
                              f"source: choose another output_dir")
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == out.absolute() else f"lies under '{existing}', which is a file"
        raise RecipeError("output_dir", f"'{output_dir}' {what}, not a directory; choose another output_dir")
    if probe:
        probe_writable(existing, output_dir)


def probe_writable(folder: Path, output_dir: str) -> None:
    """Create and remove a file in ``folder``.

    Raises:
        RecipeError: no file can be created there.
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".diffsqueeze-probe-", dir=str(folder))
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RecipeError("output_dir", f"'{output_dir}': cannot create files in '{folder}' "
                          f"({exc.strerror or type(exc).__name__}); choose a writable output_dir") from None


def _holds_files(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> tuple[Path | None, dict | None]:
    """What ``run_dir`` holds, against ``--resume`` / ``--overwrite``; reads only (except to finish a
    swap that was cut off, :func:`recover_replacement`).

    Returns:
        The folder holding the run to continue (``run_dir``, or its unfinished replacement when
        resuming one) and that run's manifest; ``(None, None)`` to start a new run.

    Raises:
        RunDirError: a non-empty folder that is not a run; a run without either flag; a damaged
            manifest without ``--overwrite``.
    """
    run_dir = Path(run_dir)
    recover_replacement(run_dir)
    if _holds_files(run_dir) and not is_run_dir(run_dir):
        verb = "refusing to replace it" if overwrite else "choose another output_dir"
        raise RunDirError(f"output_dir '{run_dir}' is not empty and is not a diffsqueeze run directory; {verb}")
    staging = replacement_dir(run_dir)
    if resume and is_run_dir(staging):  # an interrupted --overwrite
        if is_run_dir(run_dir) and not overwrite:  # which of the two to continue is the user's to say
            done, pending = _progress(read_manifest(staging))
            raise RunDirError(f"output_dir '{run_dir}' holds a run and '{staging.name}' beside it an unfinished "
                              f"--overwrite of it ({done} of {pending} stages done); pass --resume --overwrite to "
                              "continue that replacement, or --overwrite alone to discard it and start afresh")
        return staging, read_manifest(staging)
    if overwrite:
        return None, None
    if not _holds_files(run_dir):
        return None, None
    old = read_manifest(run_dir)
    if not resume:
        raise RunDirError(f"output_dir '{run_dir}' already holds a run (recipe {old.get('recipe_hash')}, "
                          f"status {old.get('status')}); pass --resume to continue it or --overwrite to replace it")
    return run_dir, old


def _progress(manifest: dict | None) -> tuple[int, int]:
    stages = (manifest or {}).get("stages") or []
    return sum(1 for e in stages if isinstance(e, dict) and e.get("status") == "done"), len(stages)


def recover_replacement(run_dir: Path) -> None:
    """Finish a swap that was cut off between its renames (the replacement had its model). A
    symbolic link left there by an earlier version (which swapped links too) is removed as a link."""
    run_dir, old = Path(run_dir), replaced_dir(run_dir)
    if not os.path.lexists(old):
        return
    if not os.path.lexists(run_dir):
        staging = replacement_dir(run_dir)
        (staging if staging.is_dir() else old).rename(run_dir)
    if old.is_symlink():
        old.unlink()
    elif old.exists():
        shutil.rmtree(old)
