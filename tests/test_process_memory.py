"""Process memory readings used by the benchmark scripts."""

from __future__ import annotations

import math
import sys

import pytest

from diffsqueeze.process_memory import current_rss_mb, peak_rss_mb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux-only")
def test_peak_is_at_least_current_and_grows_with_an_allocation():
    now, peak = current_rss_mb(), peak_rss_mb()
    assert 0 < now <= peak
    block = bytearray(64 * 2**20)  # 64 MiB, touched so it becomes resident
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert peak_rss_mb() >= now + 60
    del block
    assert not math.isnan(current_rss_mb())
