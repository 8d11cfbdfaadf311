"""Calibration data (docs/methods.md §1, Q-Diffusion): the FP pipeline's denoiser inputs on its own
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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.conditioning import (
    ConditioningError,
    check_size,
    generate,
    pipeline_prompts,
)
from diffsqueeze.models.roles import find_roles

log = logging.getLogger(__name__)
CALIB_DIR = "calibration"
META = "meta.json"
FORMAT = 2  # recording layout: per-file argument structure (1: flat tensors + shared statics)


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
        size: number of samples (rows of the batched inputs).
    """

    kwargs: dict[str, Any]
    timestep: float
    step: int
    size: int


def _flatten(value: Any, path: str, n: int, tensors: dict[str, torch.Tensor]) -> dict:
    """The structure of one argument value, its tensors moved into ``tensors`` under ``path``.

    A tensor is *batched* when its leading dimension is the batch size ``n`` of the denoiser's
    main input: those are sliced into batches, the others (Flux's ``img_ids``/``txt_ids``,
    masks shared by the batch) are passed whole with every slice.
    """
    if torch.is_tensor(value):
        tensors[path] = value
        return {"tensor": path, "batched": value.dim() > 0 and value.shape[0] == n}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise CalibrationError(f"cannot record denoiser argument '{path}': a dict with non-string keys")
        return {"dict": {k: _flatten(v, f"{path}.{k}", n, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_flatten(v, f"{path}.{i}", n, tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise CalibrationError(f"cannot record denoiser argument '{path}' of type {type(value).__name__} "
                           f"(tensors, numbers, strings, None and dicts/lists/tuples of them are recorded)")


def _rebuild(structure: dict, tensors: dict[str, torch.Tensor], rows: slice | torch.Tensor | None) -> Any:
    """The argument value of ``structure``; batched tensors take ``rows`` (``None``: all)."""
    if "tensor" in structure:
        t = tensors[structure["tensor"]]
        return t[rows] if structure["batched"] and rows is not None else t
    if "dict" in structure:
        return {k: _rebuild(v, tensors, rows) for k, v in structure["dict"].items()}
    if "list" in structure:
        return [_rebuild(v, tensors, rows) for v in structure["list"]]
    if "tuple" in structure:
        return tuple(_rebuild(v, tensors, rows) for v in structure["tuple"])
    return structure["value"]


def record_arguments(arguments: dict[str, Any], main: str) -> tuple[dict[str, torch.Tensor], dict, int]:
    """Flatten one denoiser call: ``(tensors, structure, batch size)``.

    The batch size is the leading dimension of the main input ``main`` (the denoiser's first
    parameter: ``sample``, ``hidden_states``); a scalar timestep is expanded to one per row so
    every batch slice carries its own.
    """
    x = arguments.get(main)
    if not torch.is_tensor(x) or x.dim() == 0:
        raise CalibrationError(f"the denoiser's main input '{main}' is not a batched tensor")
    n = x.shape[0]
    t = arguments.get("timestep")
    if t is not None and (not torch.is_tensor(t) or t.numel() == 1):
        arguments = {**arguments, "timestep": torch.as_tensor(t).reshape(-1).expand(n).clone()}
    tensors: dict[str, torch.Tensor] = {}
    structure = {name: _flatten(value, name, n, tensors) for name, value in arguments.items()}
    return tensors, structure, n


def replay_arguments(structure: dict, tensors: dict[str, torch.Tensor],
                     rows: slice | torch.Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments of a recorded call (rows ``rows`` of its batched tensors)."""
    return {name: _rebuild(s, tensors, rows) for name, s in structure.items()}


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
            tensors = {name: t.to(device) for name, t in tensors.items()}
            chunk = batch_size or n
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                kwargs = replay_arguments(entry["structure"], tensors, slice(start, stop))
                yield CalibBatch(kwargs, entry["timestep"], k, stop - start)
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
        structure, pool = self._pool(self.files)
        total = self.num_samples
        gen = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(total, generator=gen)
            for start in range(0, max(total - batch_size, 0) + 1, batch_size):
                yield _on(replay_arguments(structure, pool, order[start:start + batch_size]), device)


    def _pool(self, entries: list[dict]) -> tuple[dict, dict[str, torch.Tensor]]:
        """The recorded calls ``entries`` as one: batched tensors concatenated, the others
        (identical in every call, checked) once. Returns ``(structure, tensors)``."""
        parts = [load_file(str(self.folder / entry["file"])) for entry in entries]
        structure = entries[0]["structure"]
        batched = {name for name, flag in _tensor_flags(structure).items() if flag}
        for entry, part in zip(entries, parts, strict=True):
            if entry["structure"] != structure:
                raise CalibrationError(f"calibration file {entry['file']} records other arguments than "
                                       f"{entries[0]['file']}: cannot mix them in one batch")
            for name in set(part) - batched:
                if not torch.equal(part[name], parts[0][name]):
                    raise CalibrationError(f"calibration input '{name}' (not batched) differs between "
                                           f"{entries[0]['file']} and {entry['file']}: cannot mix them in one batch")
        try:
            pool = {name: torch.cat([part[name] for part in parts]) if name in batched else parts[0][name]
                    for name in parts[0]}
        except RuntimeError as exc:
            raise CalibrationError(f"calibration inputs differ in shape between timesteps ({exc}); "
                                   f"they cannot be mixed in one batch") from None
        return structure, pool

    def step_rows(self, step: int, rows: torch.Tensor, device: torch.device | str = "cpu") -> CalibBatch:
        """Samples ``rows`` (indices over all recorded calls of calibration timestep ``step``,
        in recording order) as one batch."""
        entries = [e for e in self.files if e["step_index"] == step]
        structure, pool = self._pool(entries)
        return CalibBatch(_on(replay_arguments(structure, pool, rows), device), entries[0]["timestep"], step, len(rows))


def _on(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor (in nested dicts, lists, tuples) moved to ``device``."""
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _on(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on(v, device) for v in value)
    return value


def _tensor_flags(structure: Any) -> dict[str, bool]:
    """Every tensor key in a recorded structure and whether it is batched."""
    if isinstance(structure, dict) and "tensor" in structure:
        return {structure["tensor"]: structure["batched"]}
    flags: dict[str, bool] = {}
    children = structure.values() if isinstance(structure, dict) else structure
    for child in children:
        if isinstance(child, (dict, list)):
            flags.update(_tensor_flags(child))
    return flags


def calibration_key(model: str, calib: Any, seed: int) -> str:
    """Cache key of a recording: model spec, calibration config and seed."""
    from diffsqueeze.config_parse import to_plain

    blob = json.dumps({"model": model, "calibration": to_plain(calib), "seed": seed, "format": FORMAT},
                      sort_keys=True)
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
        calib: :class:`~diffsqueeze.pipelines.calibration_config.CalibrationConfig`.
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
        prompts = pipeline_prompts(pipe, calib.prompts)
        check_size(pipe, calib.height, calib.width, "calibration")
    except DiffsqueezeError as exc:
        raise CalibrationError(f"calibration.prompts: {exc}" if not isinstance(exc, ConditioningError)
                               else str(exc)) from None
    folder.mkdir(parents=True, exist_ok=True)
    denoiser = getattr(pipe, find_roles(pipe).denoiser)
    steps = calibration_steps(calib.num_inference_steps, calib.timesteps)
    step_index = {s: i for i, s in enumerate(steps)}
    sig = inspect.signature(denoiser.forward)
    main = next(iter(sig.parameters))
    state = {"call": 0, "batch": 0, "timesteps": {}}
    files: list[dict] = []

    def hook(module, args, kwargs):
        step = state["call"]
        state["call"] += 1
        if step not in step_index:
            return
        arguments = dict(sig.bind_partial(*args, **kwargs).arguments)
        arguments.pop("return_dict", None)
        tensors, structure, n = record_arguments(arguments, main)
        t = tensors.get("timestep")
        t_value = float(t.reshape(-1)[0]) if t is not None else float(step)
        check_finite_inputs(tensors, f"timestep {t_value:g} (sampler step {step})")
        state["timesteps"][step] = t_value
        name = f"s{step:04d}_b{state['batch']:04d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / name))
        files.append({"file": name, "step": step, "step_index": step_index[step], "timestep": t_value, "n": n,
                      "structure": structure})

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

            def run(output_type: str, batch_prompts=batch_prompts, generator=generator):
                return generate(pipe, batch_prompts, generator, calib.num_inference_steps, calib.guidance_scale,
                                output_type, calib.height, calib.width)

            with torch.no_grad():
                try:
                    run("latent")
                except ValueError as exc:
                    # pixel-space pipelines without a latent output (builtin:fashion) reject it
                    # before calling the denoiser; their decoded output is as cheap
                    if "output_type" not in str(exc) or state["call"]:
                        raise
                    run("pt")
            if state["call"] < calib.num_inference_steps:
                raise CalibrationError(f"the pipeline called its denoiser {state['call']} times for "
                                       f"{calib.num_inference_steps} steps; cannot place calibration timesteps")
    finally:
        handle.remove()
        pipe.scheduler = old_scheduler
    meta = {"format": FORMAT, "steps": steps, "timesteps": [state["timesteps"][s] for s in steps], "files": files}
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.rename(folder / META)
    log.info("recorded %d calibration inputs at %d timesteps in %s", sum(f["n"] for f in files), len(steps), folder)
    return CalibrationData(folder)


def collect_calibration(ctx, pipe=None) -> CalibrationData:
    """Record (or reuse) the run's calibration data from the FP teacher: ``run_dir/calibration/<key>``."""
    calib = ctx.calibration
    key = calibration_key(ctx.model_spec, calib, ctx.recipe_seed)
    folder = Path(ctx.run_dir) / CALIB_DIR / key
    if (folder / META).is_file():  # recorded already: no teacher is loaded for it
        return CalibrationData(folder)
    teacher = pipe if pipe is not None else ctx.teacher()
    return record_calibration(teacher, calib, folder, ctx.recipe_seed, ctx.progress)
