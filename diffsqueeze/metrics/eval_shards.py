"""The evaluation job's files: which batches a process owns, its shards, PNGs and ``job.json``.

Batch ``b`` holds images ``[b*B, (b+1)*B)``; process ``r`` of ``W`` owns the batches with
``b mod W == r``. Batches are produced one at a time (:func:`process_batches`), never listed:
memory does not grow with ``--num-images`` before the first image (a list of every batch of a
billion-image job once took 24 GB). Each batch's results go into one shard,
``shards/batch-000012.safetensors``, written atomically with the job's key, start and count in its
metadata; a shard whose metadata does not match is redone.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.atomic_files import atomic_replace, atomic_write_text

__all__ = ["SHARD_DIR", "JOB_FILE", "batch_count", "process_batches", "shard_path", "save_shard", "shard_matches",
           "save_pngs", "pngs_present", "prepare_out_dir", "gather"]

log = logging.getLogger(__name__)

SHARD_DIR = "shards"
JOB_FILE = "job.json"


def batch_count(num_images: int, batch_size: int) -> int:
    return -(-num_images // batch_size)


def process_batches(num_images: int, batch_size: int, rank: int = 0, world: int = 1) -> Iterator[tuple[int, int, int]]:
    """``(batch, start, count)`` of the batches process ``rank`` of ``world`` owns, in order, lazily."""
    for b in range(rank, batch_count(num_images, batch_size), world):
        start = b * batch_size
        yield b, start, min(batch_size, num_images - start)


def shard_path(out_dir: Path, b: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"batch-{b:06d}.safetensors"


def save_shard(tensors: dict[str, torch.Tensor], path: Path, key: str, start: int, count: int) -> None:
    from safetensors.torch import save_file

    with atomic_replace(path) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"key": key, "start": str(start), "count": str(count)})


def _open_matching(path: Path, key: str, start: int, count: int, tensors: bool):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("start") != str(start) or meta.get("count") != str(count):
                return None
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as exc:  # damaged shard (killed mid-write before the rename cannot happen; foreign file can)
        log.warning("ignoring unreadable shard %s: %s", path, exc)
        return None


def shard_matches(path: Path, key: str, start: int, count: int) -> bool:
    """Whether ``path`` is this job's shard of images ``[start, start + count)`` (metadata only)."""
    return _open_matching(path, key, start, count, tensors=False) is not None


def save_pngs(images: torch.Tensor, folder: Path, start: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, t in enumerate(images):
        with atomic_replace(folder / f"{start + k:06d}.png") as tmp:
            PIL.Image.fromarray(t.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


def pngs_present(out_dir: Path, start: int, count: int, baseline: bool) -> bool:
    folders = [out_dir / "images"] + ([out_dir / "images-baseline"] if baseline else [])
    return all((f / f"{i:06d}.png").is_file() for f in folders for i in range(start, start + count))


def prepare_out_dir(out_dir: Path, key: str, payload: dict, overwrite: bool) -> None:
    """Write ``job.json``; refuse a folder holding another job's shards unless ``overwrite``."""
    shard_dir = out_dir / SHARD_DIR
    job_file = out_dir / JOB_FILE
    if job_file.is_file():
        old = json.loads(job_file.read_text(encoding="utf-8"))
        if old.get("key") != key:
            changed = sorted(k for k in set(old.get("payload", {})) | set(payload)
                             if old.get("payload", {}).get(k) != payload.get(k))
            if not overwrite:
                raise DiffsqueezeError(f"'{out_dir}' holds an evaluation with other settings (differs in: "
                                       f"{', '.join(changed) or 'format'}); use another --out or pass --overwrite")
            shutil.rmtree(shard_dir, ignore_errors=True)
            for name in ("images", "images-baseline"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
    shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job_file, json.dumps({"key": key, "payload": payload}, indent=2))


def gather(out_dir: Path, num_images: int, batch_size: int, key: str) -> dict[str, torch.Tensor]:
    """Every shard's per-image values, concatenated in image order."""
    parts: dict[str, list[torch.Tensor]] = {}
    for b, start, count in process_batches(num_images, batch_size):
        shard = _open_matching(shard_path(out_dir, b), key, start, count, tensors=True)
        if shard is None:
            raise DiffsqueezeError(f"shard {b} missing in {Path(out_dir) / SHARD_DIR} after all processes finished")
        for k, v in shard.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}
