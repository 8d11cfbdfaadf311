"""Inputs of chosen layers over the calibration data: what any method that fits a layer to what it
sees (output-loss scale search, smoothing, activation ranges; Hessian- or GPTQ-style methods) reads.

Forward pre-hooks on the named layers record their inputs while the denoiser replays recorded
calibration batches; a quantized layer's input is recorded as its quantizer sees it (after
smoothing). Two shapes of result:

- :func:`capture_input_samples`: a few rows of the first batch at a few timesteps spread over the
  trajectory, per layer (small: the output-loss search evaluates candidate scales on them);
- :func:`capture_input_rows`: ``(rows, channels)`` per (layer, timestep group), capped by random
  subsampling, with a NaN/Inf check naming the layer and timestep (activation statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from diffsqueeze.pipelines.calibration import CalibrationData, CalibrationError
from diffsqueeze.pipelines.stage_helpers import call_denoiser
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.nn.routing import timestep_routing
from diffsqueeze.quant.ptq.tracing import act_rows

@dataclass(frozen=True)
class CalibrationReplay:
    """How a stage replays recorded calibration data: the recording, the batch size, the device the
    denoiser is on, and at most ``limit`` samples per timestep (None: all)."""

    data: CalibrationData
    batch_size: int
    device: torch.device
    limit: int | None = None

    def batches(self, steps: Sequence[int] | None = None) -> Iterator:
        """The recording's batches (of the given calibration steps only, if ``steps``)."""
        if steps is None:
            return self.data.batches(self.batch_size, self.device, limit=self.limit)
        return self.data.batches(self.batch_size, self.device, steps=list(steps), limit=self.limit)


SAMPLE_STEPS = 4
"""Calibration timesteps (spread over the trajectory) whose inputs :func:`capture_input_samples` keeps."""
SAMPLE_ROWS_PER_STEP = 2
"""Rows (spread over the batch) kept per layer and chosen timestep."""


def capture_input_samples(denoiser: torch.nn.Module, names: Sequence[str],
                          replay: CalibrationReplay) -> dict[str, torch.Tensor]:
    """Layer name -> a few of its inputs (``SAMPLE_ROWS_PER_STEP`` rows of the first batch at each of
    ``SAMPLE_STEPS`` timesteps spread over the trajectory), concatenated along dim 0."""
    store: dict[str, torch.Tensor] = {}

    def record(name, module, x, batch):
        idx = torch.linspace(0, x.shape[0] - 1, min(SAMPLE_ROWS_PER_STEP, x.shape[0]))
        rows = x[idx.round().long().unique()].clone()
        store[name] = rows if name not in store else torch.cat([store[name], rows])

    n = len(replay.data.steps)
    chosen = sorted({round(i * (n - 1) / max(SAMPLE_STEPS - 1, 1)) for i in range(min(n, SAMPLE_STEPS))})
    batches = [next(replay.batches(steps=[k])) for k in chosen]
    _replay(denoiser, names, batches, record)
    return store


def capture_input_rows(denoiser: torch.nn.Module, names: Sequence[str], replay: CalibrationReplay,
                       group_of: list[int], max_values: int, progress: Callable | None = None) -> dict[tuple[str, int], torch.Tensor]:
    """(layer name, timestep group) -> float ``(rows, channels)`` of its inputs over every calibration
    batch, randomly subsampled to at most ``max(64, max_values // channels)`` rows.

    Raises:
        CalibrationError: an input holds NaN/Inf (naming the layer, timestep and calibration step).
    """
    modules = dict(denoiser.named_modules())
    store: dict[tuple[str, int], torch.Tensor] = {}

    def record(name, module, x, batch):
        if not bool(torch.isfinite(x).all()):
            raise CalibrationError(f"NaN/Inf in the input of layer '{name}' at timestep {batch.timestep:g} "
                                   f"(calibration step {batch.step}); the model diverges under these settings")
        rows = act_rows(x, isinstance(modules[name], torch.nn.Conv2d)).float()
        key = (name, group_of[batch.step])
        cap = max(64, max_values // rows.shape[1])
        have = store.get(key)
        rows = rows if have is None else torch.cat([have, rows])
        if rows.shape[0] > cap:
            idx = torch.randperm(rows.shape[0], device=rows.device)[:cap]
            rows = rows[idx]
        store[key] = rows

    batches = replay.batches()
    if progress is not None:
        batches = progress(batches, "ptq: activation statistics", None)
    _replay(denoiser, names, batches, record)
    return store


def _replay(denoiser: torch.nn.Module, names: Sequence[str], batches, record: Callable) -> None:
    """Run the denoiser on ``batches`` with ``record(name, module, input, batch)`` called on the first
    positional input of each named layer (a quantized layer's input as its quantizer sees it)."""
    modules = dict(denoiser.named_modules())
    current = {"batch": None}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach()
            if isinstance(module, QuantMixin):  # the statistics of what the quantizer sees
                x = module.smoothed_input(x)
            record(name, module, x, current["batch"])
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad(), timestep_routing(denoiser):
            for b in batches:
                current["batch"] = b
                call_denoiser(denoiser, b.kwargs)
    finally:
        for h in handles:
            h.remove()
