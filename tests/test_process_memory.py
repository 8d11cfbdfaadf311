"""Process memory readings used by the benchmark scripts."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh process: in the test process, freed but still resident heap pages of earlier tests
# can absorb the allocation, and RSS then does not grow.
CHECK = """
import math
from diffsqueeze.process_memory import current_rss_mb, peak_rss_mb
now, peak = current_rss_mb(), peak_rss_mb()
assert 0 < now <= peak, (now, peak)
block = bytearray(64 * 2**20)  # 64 MiB, touched so it becomes resident
for i in range(0, len(block), 4096):
    block[i] = 1
assert peak_rss_mb() >= now + 60, (now, peak_rss_mb())
del block
assert not math.isnan(current_rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux-only")
def test_peak_is_at_least_current_and_grows_with_an_allocation():
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


RESET = """
from diffsqueeze.process_memory import current_rss_mb, peak_rss_mb, reset_peak_rss
block = bytearray(128 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
high = peak_rss_mb()
del block
assert reset_peak_rss()
assert peak_rss_mb() < high - 100, (high, peak_rss_mb())
assert peak_rss_mb() >= current_rss_mb() - 1
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux-only")
def test_reset_starts_a_new_peak():
    result = subprocess.run([sys.executable, "-c", RESET], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


FREED = """
import torch
from diffsqueeze.process_memory import current_rss_mb, return_freed_memory
assert return_freed_memory()
big = torch.ones(4 * 2**20)  # a 16 MiB block freed: glibc alone would raise its heap threshold to it
del big
blocks, pins = [], []
for _ in range(100):
    blocks.append(torch.ones(2**20))  # 4 MiB each
    pins.append(torch.ones(64))  # small live allocations between them pin the heap
before = current_rss_mb()
del blocks
assert before - current_rss_mb() > 300, (before, current_rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_leave_the_resident_set():
    # without return_freed_memory() the 400 MiB stay resident (measured: 0 MiB released)
    result = subprocess.run([sys.executable, "-c", FREED], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
