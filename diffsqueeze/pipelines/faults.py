"""Deterministic crash injection, so tests can kill a run at an exact point and resume it.

Set ``DIFFSQUEEZE_KILL_AT=<point>:<n>`` to SIGKILL the process the n-th time ``point`` is reached
(points: ``tick`` = one step of a stage's progress loop, ``checkpoint`` = half-way through writing
a checkpoint, ``export`` = the exported model written beside ``model/``, not yet moved in place). Unset, this costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def maybe_kill(point: str) -> None:
    """Kill the process hard if ``DIFFSQUEEZE_KILL_AT`` says this is the moment."""
    spec = os.environ.get("DIFFSQUEEZE_KILL_AT")
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
