"""One run per output folder: an OS file lock held for the run's life.

The lock is ``.<name>.lock`` beside the run directory, not inside it, because ``--overwrite``
replaces the whole folder by a rename: a lock on a file inside the old folder would not stop a run
that opens the new one. ``flock`` locks belong to the open file and the kernel drops them when the
process dies however it dies (SIGKILL included), so a crashed run never leaves a stale lock; the
file itself stays (removing it would race with a process that has just opened it) and holds the
last holder's process id and start time, for the message a refused run prints.

A run takes the lock exclusively on its ``output_dir`` before it reads or changes anything there
(the command line does so before its heavy imports), and, when its ``model:`` is a run directory,
a shared lock on that one: another run may read the same model, but no run may re-run or
overwrite it while it is being read. Paths are resolved first, so an ``output_dir`` that is a
symbolic link locks (and is written at) the folder it points to. Standard library only.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from diffsqueeze.errors import RunDirError
from diffsqueeze.pipelines.manifest import is_run_dir

_HELD: dict[tuple[Path, int], list] = {}  # (lock path, mode) -> [fd, count]: re-entrant within a process


def launched_as_follower() -> bool:
    """A non-main process of a multi-process launch (``RANK`` > 0): it writes nothing of the run,
    so it takes no lock (the main process holds them for the whole launch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def lock_path(run_dir: Path) -> Path:
    """The lock file of ``run_dir`` (symbolic links resolved)."""
    target = Path(run_dir).resolve()
    return target.with_name(f".{target.name}.lock")


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its id yet"


def _in_use(path: Path) -> str:
    """Who holds ``path``: a writing run (named) or only runs reading it as their model."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return "the model of a diffsqueeze run in progress (it reads this folder)"
    except BlockingIOError:
        return f"in use by another diffsqueeze run ({_holder(path)})"
    finally:
        os.close(fd)


def _acquire(path: Path, mode: int) -> None:
    key = (path, mode)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    _HELD[key] = [fd, 1]


def release(path: Path, mode: int) -> None:
    """Drop one hold of the lock ``path`` in ``mode``; the last one closes it (the OS releases it)."""
    key = (path, mode)
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _HELD[key]
        os.close(entry[0])


class RunLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) gives it up."""

    def __init__(self, path: Path, mode: int):
        self.path, self.mode = path, mode

    def release(self) -> None:
        release(self.path, self.mode)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_output_dir(output_dir: str | Path) -> RunLock:
    """Take ``output_dir`` for this process's run (exclusive; re-entrant within the process).

    Raises:
        RunDirError: another run holds it, or a running run reads it as its model; naming the
            holder's process.
    """
    path = lock_path(Path(output_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _acquire(path, fcntl.LOCK_EX)
    except BlockingIOError:
        raise RunDirError(f"output_dir '{output_dir}' is {_in_use(path)}; wait for it to finish or choose "
                          "another output_dir") from None
    fd = _HELD[(path, fcntl.LOCK_EX)][0]
    if _HELD[(path, fcntl.LOCK_EX)][1] == 1:  # the first hold writes who holds it
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv[:4])}\n".encode(), 0)
    return RunLock(path, fcntl.LOCK_EX)


def model_run_dir(model: str) -> Path | None:
    """The run directory a ``model:`` spec reads (the run itself or its ``model/``), or None."""
    if model.startswith("builtin:"):
        return None
    p = Path(model)
    if not p.exists():
        return None
    p = p.resolve()
    for candidate in (p, p.parent):
        if is_run_dir(candidate):
            return candidate
    return None


def hold_model_run(model: str) -> RunLock | None:
    """When ``model`` is a run directory, hold it shared for this run's life (None otherwise):
    other runs may read it too, none may re-run or overwrite it meanwhile.

    Raises:
        RunDirError: a run is writing that folder now (naming its process).
    """
    run_dir = model_run_dir(model)
    if run_dir is None:
        return None
    path = lock_path(run_dir)
    try:
        _acquire(path, fcntl.LOCK_SH)
    except BlockingIOError:
        raise RunDirError(f"model '{model}' is the output_dir of a diffsqueeze run in progress ({_holder(path)}); "
                          "wait for it to finish") from None
    except OSError:  # a read-only place: nobody can be writing a run there either
        return None
    return RunLock(path, fcntl.LOCK_SH)
