"""Calibration data (METHODS.md §1, Q-Diffusion): the FP pipeline's denoiser inputs on its own
sampling trajectories, at ``n_t`` timesteps spread uniformly over the trajectory.

The FP pipeline runs on the calibration prompts; a forward pre-hook on the denoiser records
every argument of the calls at steps ``range(0, n_steps, n_steps // n_t)[:n_t]`` (with
classifier-free guidance the pipeline's batched call carries conditional and unconditional
inputs, both recorded). Each recorded call is one safetensors file in the run directory;
:class:`CalibrationData` streams them back in batches, one file at a time, so the data never
sits in (GPU) memory as a whole (training that mixes timesteps in every batch holds it in host
memory instead: :meth:`CalibrationData.shuffled_batches`). A finished recording is reused
(``meta.json`` is written last).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, save_file

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.prompts import load_prompts
from diffsqueeze.models.roles import find_roles

log = logging.getLogger(__name__)
CALIB_DIR = "calibration"
META = "meta.json"
NESTED = "."  # flattened key separator for dict arguments (added_cond_kwargs.text_embeds)


class CalibrationError(DiffsqueezeError):
    """Calibration data could not be recorded or is unusable (NaN/Inf, empty prompt set)."""


def calibration_steps(n_steps: int, n_t: int) -> list[int]:
    """Sampler step indices recorded: ``range(0, n_steps, n_steps // n_t)``, first ``n_t``."""
    if not 1 <= n_t <= n_steps:
        raise ValueError(f"need 1 <= timesteps ({n_t}) <= num_inference_steps ({n_steps})")
    return list(range(0, n_steps, n_steps // n_t))[:n_t]


@dataclass(frozen=True)
class CalibBatch:
    """One batch of recorded denoiser inputs.

    Attributes:
        kwargs: keyword arguments for ``denoiser(**kwargs)`` (tensors on the target device).
        timestep: the scheduler's timestep value of this batch.
        step: index of the calibration timestep (0..n_t-1, sampling order).
    """

    kwargs: dict[str, Any]
    timestep: float
    step: int

    @property
    def size(self) -> int:
        return batch_size_of(self.kwargs)


def batch_size_of(kwargs: dict[str, Any]) -> int:
    for key in ("sample", "hidden_states"):
        if torch.is_tensor(kwargs.get(key)):
            return kwargs[key].shape[0]
    return next(v.shape[0] for v in kwargs.values() if torch.is_tensor(v) and v.dim() > 0)


def _flatten(arguments: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, static = {}, {}
    for name, value in arguments.items():
        if torch.is_tensor(value):
            tensors[name] = value
        elif isinstance(value, dict) and value and all(torch.is_tensor(v) for v in value.values()):
            tensors.update({f"{name}{NESTED}{k}": v for k, v in value.items()})
        elif value is None or isinstance(value, (bool, int, float, str)):
            static[name] = value
        else:
            raise CalibrationError(f"cannot record denoiser argument '{name}' of type {type(value).__name__}")
    return tensors, static


def _unflatten(tensors: dict[str, torch.Tensor], static: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = dict(static)
    for key, value in tensors.items():
        if NESTED in key:
            outer, inner = key.split(NESTED, 1)
            out.setdefault(outer, {})[inner] = value
        else:
            out[key] = value
    return out


def check_finite_inputs(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CalibrationError` naming the argument and ``where`` on NaN/Inf."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CalibrationError(f"calibration input '{name}' holds NaN/Inf at {where}; the FP model "
                                   f"diverges on the calibration prompts (check dtype, guidance_scale, sampler)")


class CalibrationData:
    """A finished recording in ``folder`` (see module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text(encoding="utf-8"))
        self.steps: list[int] = meta["steps"]
        self.timesteps: list[float] = meta["timesteps"]
        self.files: list[dict] = meta["files"]
        self.static: dict[str, Any] = meta["static"]

    @property
    def num_samples(self) -> int:
        """Recorded denoiser inputs (cond and uncond counted separately) over all timesteps."""
        return sum(f["n"] for f in self.files)

    def batches(self, batch_size: int | None = None, device: torch.device | str = "cpu",
                steps: Iterable[int] | None = None, limit: int | None = None) -> Iterator[CalibBatch]:
        """Stream recorded inputs, one file at a time, in chunks of at most ``batch_size``.

        Args:
            batch_size: largest batch; ``None`` keeps each recorded call whole.
            device: where the tensors go.
            steps: calibration-timestep indices to include (default all).
            limit: stop after this many samples per calibration timestep.
        """
        wanted = set(range(len(self.steps))) if steps is None else set(steps)
        seen: dict[int, int] = {}
        for entry in self.files:
            k = entry["step_index"]
            if k not in wanted or (limit is not None and seen.get(k, 0) >= limit):
                continue
            tensors = load_file(str(self.folder / entry["file"]))
            n = entry["n"]
            if limit is not None:
                n = min(n, limit - seen.get(k, 0))
            chunk = batch_size or n
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                part = {name: t[start:stop].to(device) for name, t in tensors.items()}
                yield CalibBatch(_unflatten(part, self.static), entry["timestep"], k)
            seen[k] = seen.get(k, 0) + n

    def shuffled_batches(self, batch_size: int, device: torch.device | str = "cpu",
                         seed: int = 0) -> Iterator[dict[str, Any]]:
        """Endless kwargs batches mixing every calibration timestep, reshuffled each epoch.

        Training on :meth:`batches` would see one timestep for several steps in a row (files
        come in sampling order) and drift toward it; here every batch draws rows from the whole
        recording. The recording is held in host memory for this (its size on disk: the
        calibration config sets it); batches go to ``device`` one at a time. Every batch is full:
        an epoch's last ``total % batch_size`` rows wait for the next permutation (a recording
        smaller than ``batch_size`` comes whole).
        """
        parts = [load_file(str(self.folder / entry["file"])) for entry in self.files]
        names = set(parts[0])
        for entry, part in zip(self.files, parts):
            if set(part) != names:
                raise CalibrationError(f"calibration file {entry['file']} records arguments {sorted(part)}, "
                                       f"the first one {sorted(names)}: cannot mix them in one batch")
        try:
            pool = {name: torch.cat([part[name] for part in parts]) for name in names}
        except RuntimeError as exc:
            raise CalibrationError(f"calibration inputs differ in shape between timesteps ({exc}); "
                                   f"they cannot be mixed in one batch") from None
        total = next(iter(pool.values())).shape[0]
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(total, generator=gen)
            for start in range(0, max(total - batch_size, 0) + 1, batch_size):
                idx = order[start:start + batch_size]
                yield _unflatten({name: t[idx].to(device) for name, t in pool.items()}, self.static)


def calibration_key(model: str, calib: Any, seed: int) -> str:
    """Cache key of a recording: model spec, calibration config and seed."""
    from diffsqueeze.config_parse import to_plain

    blob = json.dumps({"model": model, "calibration": to_plain(calib), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scheduler(pipe, name: str):
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise CalibrationError(f"unknown sampler '{name}' (a diffusers scheduler class name, e.g. DDIMScheduler)")
    return cls.from_config(pipe.scheduler.config)


def record_calibration(
    pipe,
    calib,
    folder: Path,
    seed: int,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
) -> CalibrationData:
    """Run the FP pipeline on the calibration prompts and record the denoiser's inputs.

    Args:
        pipe: the FP pipeline (the teacher); it is not modified (the sampler is restored).
        calib: :class:`diffsqueeze.recipe.CalibrationConfig`.
        folder: output folder; reused if it holds a finished recording.
        seed: generator seed of the trajectories.
        progress: ``ctx.progress``-like wrapper.

    Raises:
        CalibrationError: empty prompt set, unknown sampler, NaN/Inf in the denoiser's inputs.
    """
    folder = Path(folder)
    if (folder / META).is_file():
        return CalibrationData(folder)
    try:
        prompts = load_prompts(calib.prompts)
    except DiffsqueezeError as exc:
        raise CalibrationError(f"calibration.prompts: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    denoiser = getattr(pipe, find_roles(pipe).denoiser)
    steps = calibration_steps(calib.num_inference_steps, calib.timesteps)
    step_index = {s: i for i, s in enumerate(steps)}
    sig = inspect.signature(denoiser.forward)
    state = {"call": 0, "batch": 0, "static": None, "timesteps": {}}
    files: list[dict] = []

    def hook(module, args, kwargs):
        step = state["call"]
        state["call"] += 1
        if step not in step_index:
            return
        arguments = dict(sig.bind_partial(*args, **kwargs).arguments)
        arguments.pop("return_dict", None)
        tensors, static = _flatten(arguments)
        n = batch_size_of(tensors)
        t = torch.as_tensor(tensors.get("timestep", arguments.get("timestep")))
        t_value = float(t.reshape(-1)[0])
        tensors["timestep"] = t.reshape(-1).expand(n).clone() if t.numel() == 1 else t
        check_finite_inputs(tensors, f"timestep {t_value:g} (sampler step {step})")
        state["static"] = static
        state["timesteps"][step] = t_value
        name = f"s{step:04d}_b{state['batch']:04d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
        files.append({"file": name, "step": step, "step_index": step_index[step], "timestep": t_value, "n": n})

    old_scheduler = pipe.scheduler
    sampler = getattr(calib, "sampler", "default")
    n_batches = math.ceil(calib.num_samples / calib.batch_size)
    batches = range(n_batches)
    if progress is not None:
        batches = progress(batches, "calibration", n_batches)
    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if sampler != "default":
            pipe.scheduler = _scheduler(pipe, sampler)
        for b in batches:
            n = min(calib.batch_size, calib.num_samples - b * calib.batch_size)
            batch_prompts = [prompts[(b * calib.batch_size + i) % len(prompts)] for i in range(n)]
            state["call"], state["batch"] = 0, b
            generator = torch.Generator(device="cpu").manual_seed(seed + b)
            call = dict(prompt=batch_prompts, num_inference_steps=calib.num_inference_steps,
                        guidance_scale=calib.guidance_scale, generator=generator)
            with torch.no_grad():
                try:
                    pipe(**call, output_type="latent")
                except ValueError as exc:
                    # pixel-space pipelines without a latent output (builtin:fashion) reject it
                    # before calling the denoiser; their decoded output is as cheap
                    if "output_type" not in str(exc) or state["call"]:
                        raise
                    pipe(**call, output_type="pt")
            if state["call"] < calib.num_inference_steps:
                raise CalibrationError(f"the pipeline called its denoiser {state['call']} times for "
                                       f"{calib.num_inference_steps} steps; cannot place calibration timesteps")
    finally:
        handle.remove()
        pipe.scheduler = old_scheduler
    meta = {"steps": steps, "timesteps": [state["timesteps"][s] for s in steps], "files": files,
            "static": state["static"] or {}}
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.rename(folder / META)
    log.info("recorded %d calibration inputs at %d timesteps in %s", sum(f["n"] for f in files), len(steps), folder)
    return CalibrationData(folder)


def collect_calibration(ctx, pipe=None) -> CalibrationData:
    """Record (or reuse) the run's calibration data from the FP teacher: ``run_dir/calibration/<key>``."""
    calib = ctx.recipe.calibration
    key = calibration_key(ctx.recipe.model, calib, ctx.recipe.seed)
    teacher = pipe if pipe is not None else ctx.teacher()
    return record_calibration(teacher, calib, Path(ctx.run_dir) / CALIB_DIR / key, ctx.recipe.seed, ctx.progress)
