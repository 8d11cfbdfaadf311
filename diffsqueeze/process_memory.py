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


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 2**20


def return_freed_memory() -> bool:
    """Make freed tensor memory go back to the system (glibc, Linux; False elsewhere).

    glibc serves allocations below a threshold from its heap and raises that threshold (up to
    32 MB) each time a larger block is freed; a compression run allocates and frees weight-sized
    temporaries layer after layer, and the heap then keeps GBs that are free but resident
    (measured: the PTQ stage of an SDXL-architecture UNet peaked 3.5 GB above the loaded model).
    Fixing the threshold at 1 MiB puts every tensor of 1 MiB or more in its own mapping, unmapped
    when freed; ``malloc_trim`` hands back what the heap already holds.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False
