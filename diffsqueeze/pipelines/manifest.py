"""``manifest.json``: the run's record (recipe hash, stage status, timings, memory, summaries).

Always replaced atomically, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from diffsqueeze.errors import RunDirError
from diffsqueeze.version import __version__

MANIFEST = "manifest.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_manifest(run_dir: Path) -> dict | None:
    """The manifest of ``run_dir``, or None if there is none."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is damaged ({exc}); delete the run directory or rerun with --overwrite") from exc


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
