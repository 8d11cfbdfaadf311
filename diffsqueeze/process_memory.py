"""Resident memory of the current process, for the memory columns of the benchmark scripts.

Read from ``/proc/self/status`` (Linux): ``VmRSS`` now and ``VmHWM``, the peak of this process
image. Unlike ``ru_maxrss``, ``VmHWM`` is not inherited across fork/exec, so a benchmark worker
started from a large parent reports its own peak. NaN where ``/proc`` is not available.
"""

from __future__ import annotations

from pathlib import Path


def _status_mb(key: str) -> float:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def current_rss_mb() -> float:
    """Resident set size now, MiB."""
    return _status_mb("VmRSS:")


def peak_rss_mb() -> float:
    """Peak resident set size of this process image (``VmHWM``), MiB."""
    return _status_mb("VmHWM:")


def reset_peak_rss() -> bool:
    """Start a new peak: ``VmHWM`` drops to the current RSS (Linux ``clear_refs`` value 5), so
    the next :func:`peak_rss_mb` is the peak of what ran since. False where it cannot be reset
    (then the peak stays the process's own since it started)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
