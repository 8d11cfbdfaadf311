"""Atomic stage checkpoints: write into a temp folder, fsync, rename.

A checkpoint holds the state dict of every component changed so far (one safetensors file each)
and the compression state. A folder that exists under its final name is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from diffsqueeze.errors import RunDirError
from diffsqueeze.models.roles import module_components
from diffsqueeze.models.state import CompressionState
from diffsqueeze.pipelines.faults import maybe_kill
from diffsqueeze.quant.nn.swaps import finalize_modules, restore_modules

COMPONENTS_FILE = "components.json"


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (rename durability) where the OS allows it."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(new: Path, target: Path, aside: Path) -> None:
    """Put the finished folder ``new`` at ``target``: the folder there (if any) is renamed to
    ``aside``, ``new`` takes its place, and only then is the old one deleted. A crash leaves
    either the old folder at ``target`` or the new one, never neither without ``aside``."""
    shutil.rmtree(aside, ignore_errors=True)
    if target.exists():
        target.rename(aside)
    new.rename(target)
    fsync_dir(target.absolute().parent)
    shutil.rmtree(aside, ignore_errors=True)


def _write_fsync(path: Path, tensors: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_checkpoint(pipe: DiffusionPipeline, state: CompressionState, changed: set[str], final: Path) -> None:
    """Write the checkpoint of the changed components and the state to ``final`` atomically."""
    final = Path(final)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    modules = module_components(pipe)
    names = sorted(changed)
    for i, name in enumerate(names):
        # Shared tensors (tied weights) are stored once each by cloning the second and later
        # names (safetensors refuses aliases); the rest are written as they are: cloning all
        # would hold a second copy of a 10 GB UNet.
        sd, seen = {}, set()
        for k, v in modules[name].state_dict().items():
            ptr = v.untyped_storage().data_ptr() if v.numel() else None
            sd[k] = v.clone() if ptr in seen else v
            if ptr is not None:
                seen.add(ptr)
        _write_fsync(tmp / f"{name}.safetensors", sd)
        if i == 0:
            maybe_kill("checkpoint")
    state.save(tmp)
    (tmp / COMPONENTS_FILE).write_text(json.dumps(names), encoding="utf-8")
    fsync_dir(tmp)
    replace_folder(tmp, final, final.with_name(f".old-{final.name}"))


def read_checkpoint(pipe: DiffusionPipeline, folder: Path) -> tuple[CompressionState, set[str]]:
    """Load a checkpoint's component weights into ``pipe``; return its state and changed set.

    Raises:
        RunDirError: a file is missing or damaged.
    """
    folder = Path(folder)
    try:
        names = json.loads((folder / COMPONENTS_FILE).read_text(encoding="utf-8"))
        state = CompressionState.load(folder)
        restore_modules(pipe, state)
        modules = module_components(pipe)
        for name in names:
            sd = load_file(str(folder / f"{name}.safetensors"))
            device = next(modules[name].parameters()).device
            modules[name].load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=True)
        if state.modules:
            finalize_modules(pipe)
        return state, set(names)
    except Exception as exc:  # any damage makes the checkpoint unusable; say which
        why = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise RunDirError(f"checkpoint {folder} cannot be read ({why}); delete that folder to run its stage again, "
                          f"or replace the run with --overwrite") from exc
