"""The ``quest`` stage: QuEST selective finetuning after PTQ (METHODS.md §6).

Starts from the ``ptq`` stage's quantized denoiser and finetunes two sets of layers against the
frozen FP teacher, on the recorded calibration data (same recording as ``ptq``):

* **stage 1, time-embedding layers** — the per-block projections of the timestep embedding.
  ``time_layers: [auto]`` finds them by measurement, not by name: layers whose input changes
  with the timestep but not with the latent or the text tokens (the time-embedding path), minus those whose output
  feeds another such layer (the shared timestep MLP). On a diffusers UNet that is every
  ``resnets.*.time_emb_proj``; on an SD3/DiT transformer the adaLN modulation projections
  (``norm1.linear``, ``norm1_context.linear``, ``norm_out.linear``). Trainable: their weights,
  biases, rounding variables V and input activation scales of the current timestep group.
  Per calibration timestep t, ``stage1.epochs`` epochs over ``stage1.samples`` samples.
* **stage 2, bit-sensitive layers** — by name pattern (default ``*ff.net.*``, the transformer
  feed-forward layers, QuEST's SD choice) or the ``top_k`` of a measured sensitivity ranking
  (:mod:`diffsqueeze.quant.sensitivity`). Trainable: their weights and every activation scale
  of the current timestep group. ``stage2.epochs`` epochs, each over all timesteps (shuffled).

Loss (both stages): ``sum_k MSE(out_k^q, out_k^fp) + MSE(eps^q, eps^fp)`` over the hooked
(trained) layers k and the denoiser output, teacher and student on the same recorded input.

Weights train through a straight-through estimator on the *quantized* forward (the student
always runs on the grid), and at the end of each stage are re-quantized onto their grid
(hard rounding / round-to-nearest with the PTQ scales); pruned weights stay exactly zero.

Memory (24 GB card for SD-1.5): the teacher runs per batch under ``no_grad`` (stage 1 caches
its few targets per timestep), only one timestep's batch is on the device at a time (data
streamed from the run directory), gradients exist only for the selected parameters, optional
gradient checkpointing of the student's blocks.
"""

from __future__ import annotations

import fnmatch
import logging
import random
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import find_roles, module_components
from diffsqueeze.pipelines.calibration import CalibrationData, collect_calibration
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.faults import maybe_kill
from diffsqueeze.pipelines.stage import register_stage
from diffsqueeze.prune.masks import enforce_masks, masked_gradients
from diffsqueeze.quant.modules import QuantMixin, quant_layer_types
from diffsqueeze.quant.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.sensitivity import SENSITIVITY_FILE, calibration_subset, measure_sensitivity, write_sensitivity
from diffsqueeze.quant.timestep import attach_timestep_routing, timestep_routing

log = logging.getLogger(__name__)


# ---- config ------------------------------------------------------------------------------


def _positive(obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        v = getattr(obj, name)
        if v < 0 or (v == 0 and name not in allow_zero):
            raise RecipeError(name, f"must be {'>= 0' if name in allow_zero else '> 0'}, got {v}")


@dataclass(frozen=True)
class QuestStage1Config:
    """Stage 1 (time-embedding layers), per calibration timestep.

    Attributes:
        epochs: epochs per timestep over its samples (QuEST code: 200-400; 0 skips stage 1).
        samples: calibration samples per timestep (paper: 2-8).
        batch_size: samples per optimizer step.
        lr: Adam lr of weights, biases and rounding variables (paper: 1e-5).
        act_lr: Adam lr of the layers' activation scales (paper: same optimizer, 1e-5).
        learn_rounding: also train AdaRound rounding variables V (hard rounding in the forward,
            soft-rounding gradient); the weights are hard-rounded at the end.
    """

    epochs: int = 300
    samples: int = 8
    batch_size: int = 8
    lr: float = 1e-5
    act_lr: float = 1e-5
    learn_rounding: bool = True

    def __post_init__(self) -> None:
        _positive(self, ("epochs", "samples", "batch_size", "lr", "act_lr"), allow_zero=("epochs", "lr", "act_lr"))


@dataclass(frozen=True)
class QuestStage2Config:
    """Stage 2 (bit-sensitive layers), epochs over all calibration timesteps.

    Attributes:
        epochs: passes over all timesteps (paper: 20; 0 skips stage 2).
        samples: calibration samples per timestep (paper: 64).
        batch_size: samples per optimizer step.
        lr: Adam lr of the selected layers' weights (paper: 1e-5).
        act_lr: Adam lr of all activation scales of the current timestep group (paper: 1e-4).
    """

    epochs: int = 20
    samples: int = 64
    batch_size: int = 8
    lr: float = 1e-5
    act_lr: float = 1e-4

    def __post_init__(self) -> None:
        _positive(self, ("epochs", "samples", "batch_size", "lr", "act_lr"), allow_zero=("epochs", "lr", "act_lr"))


@dataclass(frozen=True)
class SensitiveLayersConfig:
    """Which layers stage 2 finetunes.

    Attributes:
        select: ``pattern`` (layers matching ``patterns``) or ``sensitivity`` (the ``top_k``
            quantized layers among ``candidates`` by measured sensitivity).
        patterns: globs on layer names (default: transformer feed-forward layers, QuEST's SD
            choice; ``["*to_q", "*to_k", "*to_v"]`` is its choice for other models).
        candidates: globs of the layers the sensitivity ranking may pick.
        top_k: layers picked from the ranking.
        samples: calibration samples per timestep for the ranking.
    """

    select: Literal["pattern", "sensitivity"] = "pattern"
    patterns: tuple[str, ...] = ("*ff.net.*",)
    candidates: tuple[str, ...] = ("*",)
    top_k: int = 8
    samples: int = 2

    def __post_init__(self) -> None:
        _positive(self, ("top_k", "samples"))
        if self.select == "pattern" and not self.patterns:
            raise RecipeError("patterns", "select: pattern needs at least one glob")


@dataclass(frozen=True)
class QuestConfig:
    """Config of the ``quest`` stage (METHODS §6); runs after a ``ptq`` stage.

    Attributes:
        component: the quantized component (``denoiser`` or a component name).
        time_layers: ``[auto]`` (measured, see the module docstring) or globs of layer names.
        sensitive_layers: stage 2's layer selection.
        exclude: globs of layers never finetuned.
        stage1 / stage2: schedules of the two stages.
        layer_loss_weight: weight of the per-layer output MSE terms (paper: 1).
        gradient_checkpointing: recompute the student's blocks in the backward pass (diffusers'
            own checkpointing; trades ~30% time for activation memory on large models).
        measure_error: report the denoiser-output MSE against the teacher before and after.
    """

    component: str = "denoiser"
    time_layers: tuple[str, ...] = ("auto",)
    sensitive_layers: SensitiveLayersConfig = field(default_factory=SensitiveLayersConfig)
    exclude: tuple[str, ...] = ()
    stage1: QuestStage1Config = field(default_factory=QuestStage1Config)
    stage2: QuestStage2Config = field(default_factory=QuestStage2Config)
    layer_loss_weight: float = 1.0
    gradient_checkpointing: bool = False
    measure_error: bool = True

    def __post_init__(self) -> None:
        if not self.time_layers:
            raise RecipeError("time_layers", "[auto] or at least one glob (set stage1.epochs: 0 to skip stage 1)")
        if "auto" in self.time_layers and len(self.time_layers) > 1:
            raise RecipeError("time_layers", "'auto' cannot be combined with globs")
        if self.layer_loss_weight < 0:
            raise RecipeError("layer_loss_weight", f"must be >= 0, got {self.layer_loss_weight}")


# ---- finding the layers ------------------------------------------------------------------


def call_denoiser(denoiser: nn.Module, kwargs: dict) -> torch.Tensor:
    out = denoiser(**{**kwargs, "return_dict": False})
    return out[0] if isinstance(out, (tuple, list)) else out


def _latent_key(kwargs: dict) -> str:
    for key in ("sample", "hidden_states"):
        if torch.is_tensor(kwargs.get(key)):
            return key
    raise ValueError("denoiser inputs have neither 'sample' nor 'hidden_states'")


def _rows(kwargs: dict, n: int) -> dict:
    """Sample 0 of a batch repeated ``n`` times (tensors with a batch dim; nested dicts too)."""
    b = kwargs[_latent_key(kwargs)].shape[0]

    def rep(v):
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b:
            return v[:1].repeat(n, *([1] * (v.dim() - 1)))
        if isinstance(v, dict):
            return {k: rep(x) for k, x in v.items()}
        return v
    return {k: rep(v) for k, v in kwargs.items()}


def detect_time_layers(teacher: nn.Module, kwargs: dict, other_t: float) -> list[str]:
    """Per-block time-embedding projections of a denoiser, found by measurement.

    1. One batch of three copies of a recorded input: as is; every spatial/token input changed
       (tensors with per-sample rank >= 2: the latent and the text-token embeddings; pooled
       vectors and the timestep kept); timestep changed. A Linear/Conv2d layer is on the *time
       path* when its input differs between rows 0 and 2 but not between rows 0 and 1. (On an
       MMDiT the first block's context projections ``add_q/k/v_proj`` see the timestep through
       the context's adaLN but also the text tokens, so they are not on it.)
    2. One forward where every time-path layer's output is cut into a fresh leaf tensor: a
       time-path layer whose output reaches another time-path layer's input is part of the
       shared timestep MLP; the others are the per-block projections (QuEST stage 1).
    """
    base = _rows(kwargs, 3)
    for v in base.values():
        if torch.is_tensor(v) and v.dim() >= 3 and v.is_floating_point():
            v[1] = torch.randn_like(v[1])
    base["timestep"] = base["timestep"].clone()
    base["timestep"][2] = other_t
    layers = {n: m for n, m in teacher.named_modules() if isinstance(m, quant_layer_types())}
    inputs: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            call_denoiser(teacher, base)
    finally:
        for h in handles:
            h.remove()

    def same(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    path = [n for n, x in inputs.items() if x.shape[0] == 3 and same(x[0], x[1]) and not same(x[0], x[2])]
    leaves: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def cut(name):
        def hook(module, args, out):
            leaves[name] = out.detach().requires_grad_(True)
            return leaves[name]
        return hook

    def see(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [layers[n].register_forward_hook(cut(n)) for n in path]
    handles += [layers[n].register_forward_pre_hook(see(n)) for n in path]
    try:
        with torch.enable_grad():
            call_denoiser(teacher, _rows(kwargs, 1))
            upstream = set()
            for n in path:
                x = seen.get(n)
                if x is None or not x.requires_grad:
                    continue
                others = [m for m in path if m != n and m in leaves]
                grads = torch.autograd.grad(x.sum(), [leaves[m] for m in others], allow_unused=True,
                                            retain_graph=True)
                upstream.update(m for m, g in zip(others, grads) if g is not None)
    finally:
        for h in handles:
            h.remove()
    return [n for n in path if n not in upstream]


def _match(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


# ---- training helpers ---------------------------------------------------------------------


class _GridWeight(nn.Module):
    """Stand-in for a layer's weight quantizer while finetuning.

    Forward value: exactly the quantizer's on-grid weight (hard rounding when V exists);
    gradients: straight-through to W, and the soft-rounding gradient to V.
    """

    def __init__(self, inner: WeightQuantizer):
        super().__init__()
        self.inner = inner

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = self.inner
        if q.alpha is not None:
            q.soft = False
            hard = q.quantize_learned(w).detach()
            q.soft = True
            soft = q.quantize_learned(w)
            out = hard + (soft - soft.detach())
        else:
            out = q.quantize_rtn(w.detach()).detach()
        return out + (w - w.detach())


@contextmanager
def _grid_weights(layers: dict[str, QuantMixin], rounding: bool) -> Iterator[list[nn.Parameter]]:
    """Wrap the layers' weight quantizers (STE), optionally with rounding variables; yields V.

    On exit the weights are re-quantized onto their grid (hard rounding or RTN with the PTQ
    scales) and the quantizers restored.
    """
    swapped = []
    for lay in layers.values():
        for attr in ("weight_quant", "weight_quant_2"):
            q = getattr(lay, attr, None)
            if isinstance(q, WeightQuantizer):
                swapped.append((lay, attr, q))
    if rounding:
        for lay, attr, q in swapped:
            part = lay.weight[:, : lay.split] if attr == "weight_quant" and lay.split else (
                lay.weight[:, lay.split:] if attr == "weight_quant_2" else lay.weight)
            q.init_rounding(part)
    try:
        for lay, attr, q in swapped:
            setattr(lay, attr, _GridWeight(q))
        yield [q.alpha for _, _, q in swapped if q.alpha is not None]
    finally:
        for lay, attr, q in swapped:
            setattr(lay, attr, q)
        with torch.no_grad():
            for lay in layers.values():
                if not lay.weight_quantizers():
                    continue
                w = lay.weight
                parts = [(q.finalize_rounding(w[:, sl]) if q.alpha is not None else q.quantize_rtn(w[:, sl]))
                         for q, sl in lay.weight_parts()]
                w.copy_(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])


@contextmanager
def _capture_outputs(module: nn.Module, names: list[str], store: dict) -> Iterator[None]:
    handles = [module.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: store.__setitem__(n, out)) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _GroupScales:
    """Activation scales trained for the current timestep group only.

    Adam moves a parameter even where its gradient is zero (momentum), so after each step the
    rows of the other groups are put back.
    """

    def __init__(self, quantizers: list[ActQuantizer]):
        self.quantizers = quantizers
        self.params = [q.scale for q in quantizers]

    def restore_others(self, snapshot: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for q, snap in zip(self.quantizers, snapshot):
                g = q.current_group()
                row = q.scale[g].clone()
                q.scale.copy_(snap)
                q.scale[g] = row.clamp(min=1e-8)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]


def _loss(student_out, teacher_out, s_layers: dict, t_layers: dict, weight: float) -> tuple[torch.Tensor, float]:
    out_loss = F.mse_loss(student_out.float(), teacher_out.float())
    layer_loss = sum((F.mse_loss(s_layers[n].float(), t_layers[n].float()) for n in t_layers),
                     out_loss.new_zeros(()))
    return out_loss + weight * layer_loss, float(out_loss.detach())


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@torch.no_grad()
def denoiser_error(student: nn.Module, teacher: nn.Module, data: CalibrationData, device, limit: int,
                   batch_size: int) -> float:
    """Mean denoiser-output MSE of the student against the teacher over calibration samples."""
    total, n = 0.0, 0
    with timestep_routing(student):
        for b in calibration_subset(data, limit, batch_size, device):
            ref = call_denoiser(teacher, b.kwargs).float()
            out = call_denoiser(student, b.kwargs).float()
            total += float((out - ref).pow(2).mean()) * ref.shape[0]
            n += ref.shape[0]
    return total / max(n, 1)


# ---- the stage -----------------------------------------------------------------------------


@register_stage("quest", QuestConfig)
class QuestStage:
    """QuEST selective finetuning of a PTQ-quantized denoiser (METHODS §6)."""

    def __init__(self, config: QuestConfig):
        self.config = config

    def _denoiser_name(self, pipe: DiffusionPipeline) -> str:
        return find_roles(pipe).denoiser if self.config.component == "denoiser" else self.config.component

    def check(self, pipe: DiffusionPipeline) -> None:
        cfg = self.config
        comps = module_components(pipe)
        name = self._denoiser_name(pipe)
        if name not in comps:
            raise RecipeError("component", f"no component '{cfg.component}' in {type(pipe).__name__}; "
                              f"its components: {', '.join(comps)} (or 'denoiser')")
        names = [n for n, m in comps[name].named_modules() if isinstance(m, quant_layer_types())]
        if "auto" not in cfg.time_layers and not any(_match(n, cfg.time_layers) for n in names):
            raise RecipeError("time_layers", f"no Linear/Conv2d layer of '{name}' matches {list(cfg.time_layers)}")
        sl = cfg.sensitive_layers
        globs = sl.patterns if sl.select == "pattern" else sl.candidates
        if cfg.stage2.epochs and not any(_match(n, globs) and not _match(n, cfg.exclude) for n in names):
            key = "patterns" if sl.select == "pattern" else "candidates"
            raise RecipeError(f"sensitive_layers.{key}", f"no Linear/Conv2d layer of '{name}' matches {list(globs)}")

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        cfg = self.config
        t_start = time.perf_counter()
        comp = self._comp = self._denoiser_name(pipe)
        student = module_components(pipe)[comp]
        qlayers = {n: m for n, m in student.named_modules() if isinstance(m, QuantMixin)}
        if not qlayers:
            raise RecipeError("quest", f"'{comp}' has no quantized layers: put a ptq stage before quest")
        data = collect_calibration(ctx)
        teacher = module_components(ctx.teacher())[comp]
        device = next(student.parameters()).device
        rng = random.Random(ctx.seed)
        summary: dict = {"component": comp, "calibration_timesteps": len(data.timesteps)}
        err_limit = max(cfg.stage1.samples, 2)
        if cfg.measure_error:
            summary["denoiser_mse_before"] = denoiser_error(student, teacher, data, device, err_limit,
                                                            cfg.stage2.batch_size)

        time_names = self._time_layers(teacher, data, device, qlayers)
        sens_names, ranking = self._sensitive_layers(student, teacher, data, qlayers, time_names, ctx)
        summary["time_layers"] = time_names
        summary["sensitive_layers"] = sens_names
        if ranking is not None:
            summary["sensitivity_file"] = SENSITIVITY_FILE
            summary["sensitivity_top"] = [{"name": r["name"], "mse": r["mse"]} for r in ranking[: cfg.sensitive_layers.top_k]]

        flags = {p: p.requires_grad for p in student.parameters()}
        act_qs = [m for m in student.modules() if isinstance(m, ActQuantizer)]
        lsq = [(q, q.lsq) for q in act_qs]
        gc = cfg.gradient_checkpointing and getattr(student, "_supports_gradient_checkpointing", False)
        try:
            student.requires_grad_(False)
            for q in act_qs:
                q.lsq = True  # straight-through activation gradients (and LSQ scale gradients)
            if gc:
                student.enable_gradient_checkpointing()
            self._pipe = pipe
            with timestep_routing(student):
                if cfg.stage1.epochs and time_names:
                    summary["stage1"] = self._stage1(student, teacher, data, device, qlayers, time_names, ctx)
                if cfg.stage2.epochs and sens_names:
                    summary["stage2"] = self._stage2(student, teacher, data, device, qlayers, sens_names, act_qs,
                                                     ctx, rng)
        finally:
            if gc:
                student.disable_gradient_checkpointing()
            for q, flag in lsq:
                q.lsq = flag
            for p, flag in flags.items():
                p.requires_grad_(flag)
        enforce_masks(pipe, ctx.state.masks)
        attach_timestep_routing(student)
        ctx.mark_changed(comp)
        if cfg.measure_error:
            summary["denoiser_mse_after"] = denoiser_error(student, teacher, data, device, err_limit,
                                                           cfg.stage2.batch_size)
        summary["peak_memory_mb"] = _peak_mb(device)
        summary["peak_memory_kind"] = "cuda_allocated" if device.type == "cuda" else "process_rss"
        summary["wall_time_s"] = round(time.perf_counter() - t_start, 3)
        return summary

    # ---- layer selection ------------------------------------------------------------------

    def _time_layers(self, teacher, data: CalibrationData, device, qlayers: dict) -> list[str]:
        cfg = self.config
        if not cfg.stage1.epochs:
            return []
        if "auto" in cfg.time_layers:
            first = next(calibration_subset(data, 1, 1, device))
            other = max(data.timesteps, key=lambda t: abs(t - first.timestep))
            if other == first.timestep:
                other = first.timestep * 0.5 + 1.0
            found = detect_time_layers(teacher, first.kwargs, other)
        else:
            found = [n for n, m in teacher.named_modules()
                     if isinstance(m, quant_layer_types()) and _match(n, cfg.time_layers)]
        skipped = [n for n in found if n not in qlayers or _match(n, cfg.exclude)]
        if skipped:
            log.info("quest: time-embedding layers not quantized or excluded, not finetuned: %s", skipped)
        return [n for n in found if n not in skipped]

    def _sensitive_layers(self, student, teacher, data, qlayers, time_names, ctx) -> tuple[list[str], list | None]:
        cfg = self.config
        sl = cfg.sensitive_layers
        if not cfg.stage2.epochs:
            return [], None
        allowed = [n for n in qlayers if not _match(n, cfg.exclude) and n not in time_names]
        if sl.select == "pattern":
            return [n for n in allowed if _match(n, sl.patterns)], None
        cands = [n for n in allowed if _match(n, sl.candidates)]
        t0 = time.perf_counter()
        ranking = measure_sensitivity(student, teacher, data, cands, sl.samples, cfg.stage2.batch_size, ctx.progress)
        meta = {"component": self._comp, "samples_per_timestep": sl.samples,
                "timesteps": len(data.timesteps), "wall_time_s": round(time.perf_counter() - t0, 3)}
        write_sensitivity(ctx.run_dir, ranking, meta)
        return [r["name"] for r in ranking[: sl.top_k]], ranking

    # ---- stage 1: time-embedding layers, per timestep -------------------------------------

    def _stage1(self, student, teacher, data: CalibrationData, device, qlayers, names, ctx) -> dict:
        cfg = self.config.stage1
        layers = {n: qlayers[n] for n in names}
        scales = _GroupScales([q for lay in layers.values() for q in lay.act_quantizers() if lay.quant_acts])
        report: dict = {"layers": len(names), "epochs_per_timestep": cfg.epochs, "timesteps": {}}
        weights = [p for lay in layers.values() for p in (lay.weight, lay.bias) if p is not None]
        t0 = time.perf_counter()
        steps = 0
        with _grid_weights(layers, cfg.learn_rounding) as alphas:
            for p in (*weights, *alphas, *scales.params):
                p.requires_grad_(True)
            with masked_gradients(self._pipe, ctx.state.masks):  # hooks on the params that now need grads
                for k in ctx.progress(range(len(data.timesteps)), "quest stage 1 (time embedding)",
                                      len(data.timesteps)):
                    batches = list(calibration_subset(data, cfg.samples, cfg.batch_size, device, [k]))
                    targets = []
                    with torch.no_grad():
                        for b in batches:  # teacher targets cached for this timestep's epochs
                            store: dict = {}
                            with _capture_outputs(teacher, names, store):
                                out = call_denoiser(teacher, b.kwargs)
                            targets.append((out, store))
                    groups = [{"params": weights + alphas, "lr": cfg.lr}, {"params": scales.params, "lr": cfg.act_lr}]
                    opt = torch.optim.Adam([g for g in groups if g["params"]])
                    first = last = None
                    for _ in range(cfg.epochs):
                        for b, (t_out, t_layers) in zip(batches, targets):
                            value = self._step(student, b, t_out, t_layers, names, opt, scales, ctx)
                            first = value if first is None else first
                            last = value
                            steps += 1
                    report["timesteps"][f"{data.timesteps[k]:g}"] = {"first_loss": first, "last_loss": last}
                    del batches, targets
        wall = time.perf_counter() - t0
        report.update(steps=steps, wall_time_s=round(wall, 3),
                      s_per_epoch=round(wall / max(cfg.epochs * len(data.timesteps), 1), 4),
                      peak_memory_mb=_peak_mb(device))
        return report

    # ---- stage 2: bit-sensitive layers, epochs over all timesteps --------------------------

    def _stage2(self, student, teacher, data, device, qlayers, names, act_qs, ctx, rng) -> dict:
        cfg = self.config.stage2
        layers = {n: qlayers[n] for n in names}
        scales = _GroupScales([q for q in act_qs])
        report: dict = {"layers": len(names), "epochs": cfg.epochs, "epoch_losses": [], "epoch_times_s": []}
        steps = 0
        with _grid_weights(layers, rounding=False):
            weights = [lay.weight for lay in layers.values()]
            for p in (*weights, *scales.params):
                p.requires_grad_(True)
            groups = [{"params": weights, "lr": cfg.lr}, {"params": scales.params, "lr": cfg.act_lr}]
            opt = torch.optim.Adam([g for g in groups if g["params"]])
            with masked_gradients(self._pipe, ctx.state.masks):
                for _ in ctx.progress(range(cfg.epochs), "quest stage 2 (sensitive layers)", cfg.epochs):
                    t0 = time.perf_counter()
                    order = list(range(len(data.timesteps)))
                    rng.shuffle(order)
                    total, n = 0.0, 0
                    for k in order:  # one timestep's batch on the device at a time, teacher per batch
                        for b in calibration_subset(data, cfg.samples, cfg.batch_size, device, [k]):
                            store: dict = {}
                            with torch.no_grad(), _capture_outputs(teacher, names, store):
                                t_out = call_denoiser(teacher, b.kwargs)
                            total += self._step(student, b, t_out, store, names, opt, scales, ctx) * b.size
                            n += b.size
                            steps += 1
                    report["epoch_losses"].append(total / max(n, 1))
                    report["epoch_times_s"].append(round(time.perf_counter() - t0, 3))
        times = report["epoch_times_s"]
        report.update(steps=steps, s_per_epoch=round(sum(times) / max(len(times), 1), 4),
                      peak_memory_mb=_peak_mb(device))
        return report

    def _step(self, student, b, t_out, t_layers, names, opt, scales: _GroupScales, ctx) -> float:
        store: dict = {}
        with torch.enable_grad(), _capture_outputs(student, names, store):
            out = call_denoiser(student, b.kwargs)
            loss, out_mse = _loss(out, t_out, store, t_layers, self.config.layer_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        snap = scales.snapshot() if scales.params else []
        opt.step()
        if scales.params:
            scales.restore_others(snap)
        if ctx.state.masks:
            enforce_masks_of(student, self._comp, ctx.state.masks, names)
        maybe_kill("tick")
        return float(loss.detach())


def enforce_masks_of(module: nn.Module, comp: str, masks: dict, names: list[str]) -> None:
    """Re-zero pruned weights of the trained layers after an optimizer step."""
    with torch.no_grad():
        for key, mask in masks.items():
            c, pname = key.split("/", 1)
            layer, _, attr = pname.rpartition(".")
            if c == comp and layer in names:
                p = getattr(module.get_submodule(layer), attr)
                p.mul_(mask.to(device=p.device, dtype=p.dtype))


__all__ = ["QuestStage", "QuestConfig", "detect_time_layers", "denoiser_error"]
