"""Measured layer sensitivity (docs/methods.md §6, QuEST stage 2 selection).

The sensitivity of a quantized layer is the error of the denoiser output when *only that
layer* is quantized (at the bits the ``ptq`` stage gave it: its own weight and activation
quantizers) and everything else is the FP teacher, averaged over the calibration set:

    mse_L = mean over samples of mean((eps_theta^{L quantized}(x_t, t, c) - eps_theta^{fp}(x_t, t, c))^2)

It is measured by temporarily placing the student's quantized module inside the (frozen)
teacher denoiser, one layer at a time, so layers whose stored weights are already on the grid
(learned rounding writes them back) are measured as they are. The ranking is written to
``<run_dir>/sensitivity.json`` and shown by ``diffsqueeze inspect RUN --sensitivity``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from diffsqueeze.pipelines.calibration import CalibBatch, CalibrationData
from diffsqueeze.pipelines.stage_helpers import call_denoiser
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.nn.routing import TimestepContext
from diffsqueeze.quant.nn.swaps import swap_module

log = logging.getLogger(__name__)
SENSITIVITY_FILE = "sensitivity.json"


def calibration_subset(data: CalibrationData, samples: int, batch_size: int, device,
                       steps: Iterable[int] | None = None) -> Iterator[CalibBatch]:
    """Per calibration timestep, ``samples`` recorded inputs spread evenly over all recorded ones.

    A recorded call holds ``[unconditional..., conditional...]`` inputs; taking the first
    ``samples`` would pick only unconditional ones, so the subset is evenly spaced instead.
    One timestep's recording is read (on the CPU) at a time; batches go to ``device``.
    """
    for k in (range(len(data.timesteps)) if steps is None else steps):
        n = sum(e["n"] for e in data.files if e["step_index"] == k)
        if not n:
            continue
        m = min(samples, n)
        idx = torch.linspace(0, n - 1, m).round().long() if m > 1 else torch.tensor([n // 2])
        for start in range(0, m, batch_size):
            yield data.step_rows(k, idx[start:start + batch_size], device)


def quantized_layers(denoiser: torch.nn.Module) -> dict[str, QuantMixin]:
    """Quantized layers (``QuantLinear``/``QuantConv2d``) of a denoiser, by name."""
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, QuantMixin)}


@torch.no_grad()
def measure_sensitivity(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    data: CalibrationData,
    layers: list[str] | None = None,
    samples_per_timestep: int = 2,
    batch_size: int = 8,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
) -> list[dict]:
    """Rank quantized layers by the denoiser-output MSE when only that layer is quantized.

    Args:
        student: the quantized denoiser (its layers are borrowed one at a time, not changed).
        teacher: the frozen FP denoiser of the same architecture.
        data: calibration data (the same the ``ptq`` stage used).
        layers: names to measure (default: every quantized layer of ``student``).
        samples_per_timestep: calibration samples per timestep (cost: layers x timesteps x samples).
        batch_size: largest batch per forward.
        progress: ``ctx.progress``-like wrapper.

    Returns:
        One dict per layer, most sensitive first: ``name``, ``mse``, ``rel_mse`` (mse over the
        mean square of the FP output), ``weights`` / ``activations`` (formats).
    """
    qlayers = quantized_layers(student)
    names = list(qlayers) if layers is None else [n for n in layers if n in qlayers]
    device = next(student.parameters()).device  # a streamed teacher's parameters are on meta
    sums = {n: 0.0 for n in names}
    ref_energy, count = 0.0, 0
    tctx = TimestepContext()
    linked = [(q, q.tctx) for n in names for q in qlayers[n].act_quantizers()]
    batches = list(calibration_subset(data, samples_per_timestep, batch_size, device))
    work: Iterable = range(len(batches))
    if progress is not None:
        work = progress(work, "sensitivity", len(batches))
    try:
        for q, _ in linked:
            q.tctx = tctx
        for i in work:
            b = batches[i]
            tctx.t = b.timestep
            ref = call_denoiser(teacher, b.kwargs).float()
            ref_energy += float(ref.pow(2).mean()) * ref.shape[0]
            count += ref.shape[0]
            for n in names:
                old = swap_module(teacher, n, qlayers[n])
                try:
                    out = call_denoiser(teacher, b.kwargs).float()
                finally:
                    swap_module(teacher, n, old)
                sums[n] += float((out - ref).pow(2).mean()) * ref.shape[0]
    finally:
        for q, old_ctx in linked:
            q.tctx = old_ctx
    energy = ref_energy / max(count, 1)
    rows = []
    for n in names:
        mse = sums[n] / max(count, 1)
        lay = qlayers[n]
        rows.append({"name": n, "mse": mse, "rel_mse": mse / energy if energy > 0 else float("nan"),
                     "weights": [q.fmt.name for q in lay.weight_quantizers()] if lay.quant_weights else "fp",
                     "activations": [q.fmt.name for q in lay.act_quantizers()] if lay.quant_acts else "fp"})
    rows.sort(key=lambda r: r["mse"], reverse=True)
    return rows


def write_sensitivity(run_dir: Path, rows: list[dict], meta: dict) -> Path:
    """Write the ranking to ``run_dir/sensitivity.json`` (atomic rename)."""
    path = Path(run_dir) / SENSITIVITY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**meta, "layers": rows}, indent=1), encoding="utf-8")
    tmp.replace(path)
    return path


def format_sensitivity(report: dict, top: int = 0) -> str:
    """A table of the ranking, most sensitive first (``top`` rows; 0 = all)."""
    rows = report["layers"][: top or None]
    lines = [f"layer sensitivity of {report.get('component', 'denoiser')}: denoiser-output MSE with only that "
             f"layer quantized ({report.get('samples_per_timestep', '?')} calibration samples per timestep, "
             f"{report.get('timesteps', '?')} timesteps)",
             f"{'rank':>4}  {'mse':>11}  {'rel':>9}  {'w':<10} {'a':<10} layer"]
    for i, r in enumerate(rows):
        w = ",".join(r["weights"]) if isinstance(r["weights"], list) else r["weights"]
        a = ",".join(r["activations"]) if isinstance(r["activations"], list) else r["activations"]
        lines.append(f"{i + 1:>4}  {r['mse']:>11.4e}  {r['rel_mse']:>9.3e}  {w:<10} {a:<10} {r['name']}")
    return "\n".join(lines)


__all__ = ["measure_sensitivity", "write_sensitivity", "format_sensitivity", "SENSITIVITY_FILE"]
