"""Running out of disk as one line naming the folder: checked before the export where its size can
be estimated, and recognized when a write fails anyway (the OS's error, or safetensors' own error
type, which carries the OS's message but is not an ``OSError``)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from diffsqueeze.errors import RunDirError

MB = 2**20
_FULL = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = ("No space left on device", "Disk quota exceeded")


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``what`` (about ``needed`` bytes) into ``folder`` when it cannot fit.

    Raises:
        RunDirError: naming the folder, the estimate and the free space.
    """
    free = free_bytes(folder)
    if needed > free:
        raise RunDirError(f"no space left on device in {folder}: about {needed / MB:.0f} MB needed for {what}, "
                          f"{free / MB:.0f} MB free; free some space or choose another output_dir, then --resume")


def disk_error(exc: BaseException, folder: Path) -> RunDirError | None:
    """The one-line error for a write that failed because the disk (or quota) is full or the file
    system refused it, or None for any other failure. Looks through the exception's causes."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        if (isinstance(seen, OSError) and seen.errno in _FULL) or any(t in text for t in _FULL_TEXT):
            return RunDirError(f"no space left on device in {folder} ({free_bytes(folder) / MB:.0f} MB free now); "
                               "free some space, then continue with --resume")
        if isinstance(seen, OSError) and seen.errno in (errno.EROFS, errno.EACCES, errno.EIO):
            where = seen.filename or folder
            return RunDirError(f"cannot write {where}: {seen.strerror or type(seen).__name__}")
        seen = seen.__cause__ or seen.__context__
    return None
