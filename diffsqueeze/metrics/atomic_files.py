"""Atomic file writes for everything the metrics write (statistics, shards, metrics.json, reports).

A reader (a resumed job, another process, a report rewrite) sees the old file or the new one,
never half of one: the content goes to a temp file beside the target, then ``os.replace`` moves
it over the target in one step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_replace", "atomic_write_text"]


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block finishes, rename it onto ``path``.

    Write the whole file to the yielded path inside the ``with`` block. If the block raises,
    ``path`` keeps its old content. The temp name starts with a dot (hidden from folder listings)
    and holds the process id, so processes writing the same target never share a temp file.

    Args:
        path: the file to (re)write; its folder must exist.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_replace`)."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
