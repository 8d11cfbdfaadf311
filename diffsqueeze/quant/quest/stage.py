"""The ``quest`` stage: QuEST selective finetuning after PTQ (docs/methods.md §6).

Starts from the ``ptq`` stage's quantized denoiser and finetunes two sets of layers against the
frozen FP teacher, on the recorded calibration data (same recording as ``ptq``):

* **stage 1, time-embedding layers** — the per-block projections of the timestep embedding.
  ``time_layers: [auto]`` finds them by measurement, not by name
  (:mod:`~diffsqueeze.quant.quest.time_layers`): layers whose input changes
  with the timestep but not with the latent or the text tokens (the time-embedding path), minus those whose output
  feeds another such layer (the shared timestep MLP). On a diffusers UNet that is every
  ``resnets.*.time_emb_proj``; on an SD3/DiT transformer the adaLN modulation projections
  (``norm1.linear``, ``norm1_context.linear``, ``norm_out.linear``). Trainable: their weights,
  biases, rounding variables V and input activation scales of the current timestep group.
  Per calibration timestep t, ``stage1.epochs`` epochs over ``stage1.samples`` samples.
* **stage 2, bit-sensitive layers** — by name pattern (default ``*ff.net.*``, the transformer
  feed-forward layers, QuEST's SD choice) or the ``top_k`` of a measured sensitivity ranking
  (:mod:`diffsqueeze.quant.quest.sensitivity`). Trainable: their weights and every activation scale
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

import logging
import random
import time

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.calibration import (
    CalibBatch,
    CalibrationData,
    collect_calibration,
)
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.distributed import sum_gradients, sum_value
from diffsqueeze.pipelines.faults import maybe_kill
from diffsqueeze.pipelines.stage import ComponentStage
from diffsqueeze.pipelines.stage_helpers import (
    call_denoiser,
    capture_outputs,
    matches_any,
    own_rows,
    stage_component,
    train_loop,
)
from diffsqueeze.prune.masks import enforce_masks, masked_gradients
from diffsqueeze.quant.nn.layers import QuantMixin, quant_layer_types
from diffsqueeze.quant.nn.quantizers import ActQuantizer
from diffsqueeze.quant.nn.recompute import recomputed_quantized_weights
from diffsqueeze.quant.nn.routing import attach_timestep_routing, timestep_routing
from diffsqueeze.quant.quest.config import QuestConfig
from diffsqueeze.quant.quest.sensitivity import (
    SENSITIVITY_FILE,
    calibration_subset,
    measure_sensitivity,
    write_sensitivity,
)
from diffsqueeze.quant.quest.time_layers import detect_time_layers
from diffsqueeze.quant.quest.training import (
    GroupScales,
    branch_params,
    denoiser_error,
    enforce_masks_of,
    grid_weights,
    peak_memory_mb,
    quest_loss,
    steps_in_backward,
)

log = logging.getLogger(__name__)


class QuestStage(ComponentStage):
    """QuEST selective finetuning of a PTQ-quantized denoiser (docs/methods.md §6)."""

    config: QuestConfig

    def check(self, pipe: DiffusionPipeline) -> None:
        cfg = self.config
        name = stage_component(pipe, cfg.component)
        names = [n for n, m in module_components(pipe)[name].named_modules() if isinstance(m, quant_layer_types())]
        if "auto" not in cfg.time_layers and not any(matches_any(n, cfg.time_layers) for n in names):
            raise RecipeError("time_layers", f"no Linear/Conv2d layer of '{name}' matches {list(cfg.time_layers)}")
        sl = cfg.sensitive_layers
        globs = sl.patterns if sl.select == "pattern" else sl.candidates
        if cfg.stage2.epochs and not any(matches_any(n, globs) and not matches_any(n, cfg.exclude) for n in names):
            key = "patterns" if sl.select == "pattern" else "candidates"
            raise RecipeError(f"sensitive_layers.{key}", f"no Linear/Conv2d layer of '{name}' matches {list(globs)}")

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        cfg = self.config
        t_start = time.perf_counter()
        comp = self._comp = stage_component(pipe, cfg.component)
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
        summary["peak_memory_mb"] = peak_memory_mb(device)
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
                     if isinstance(m, quant_layer_types()) and matches_any(n, cfg.time_layers)]
        skipped = [n for n in found if n not in qlayers or matches_any(n, cfg.exclude)]
        if skipped:
            log.info("quest: time-embedding layers not quantized or excluded, not finetuned: %s", skipped)
        return [n for n in found if n not in skipped]

    def _sensitive_layers(self, student, teacher, data, qlayers, time_names, ctx) -> tuple[list[str], list | None]:
        cfg = self.config
        sl = cfg.sensitive_layers
        if not cfg.stage2.epochs:
            return [], None
        allowed = [n for n in qlayers if not matches_any(n, cfg.exclude) and n not in time_names]
        if sl.select == "pattern":
            return [n for n in allowed if matches_any(n, sl.patterns)], None
        cands = [n for n in allowed if matches_any(n, sl.candidates)]
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
        scales = GroupScales([q for lay in layers.values() for q in lay.act_quantizers() if lay.quant_acts])
        report: dict = {"layers": len(names), "epochs_per_timestep": cfg.epochs, "timesteps": {}}
        weights = [p for lay in layers.values() for p in (lay.weight, lay.bias) if p is not None]
        weights += branch_params(layers)
        t0 = time.perf_counter()
        steps = 0
        with grid_weights(layers, cfg.learn_rounding) as alphas:
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
                            with capture_outputs(teacher, names, store):
                                out = call_denoiser(teacher, b.kwargs)
                            targets.append((out, store))
                    groups = [{"params": weights + alphas, "lr": cfg.lr}, {"params": scales.params, "lr": cfg.act_lr}]
                    opt = torch.optim.Adam([g for g in groups if g["params"]])

                    def step_loss(it: int, batches=batches, targets=targets):  # epochs over this timestep's batches
                        i = it % len(batches)
                        loss = self._student_loss(student, batches[i], *targets[i], names, scales)
                        return loss, loss, {"loss": f"{float(loss.detach()):.4g}"}

                    iters = cfg.epochs * len(batches)
                    first, last = train_loop(opt, iters, step_loss, f"quest stage 1, t={data.timesteps[k]:g}",
                                             after_step=lambda: self._after_step(student, names, scales, ctx))
                    steps += iters
                    report["timesteps"][f"{data.timesteps[k]:g}"] = {"first_loss": first, "last_loss": last}
                    del batches, targets, step_loss  # one timestep's inputs and targets at a time
        wall = time.perf_counter() - t0
        report.update(steps=steps, wall_time_s=round(wall, 3),
                      s_per_epoch=round(wall / max(cfg.epochs * len(data.timesteps), 1), 4),
                      peak_memory_mb=peak_memory_mb(device))
        return report

    # ---- stage 2: bit-sensitive layers, epochs over all timesteps --------------------------

    def _stage2(self, student, teacher, data, device, qlayers, names, act_qs, ctx, rng) -> dict:
        cfg = self.config.stage2
        layers = {n: qlayers[n] for n in names}
        scales = GroupScales(act_qs)
        report: dict = {"layers": len(names), "epochs": cfg.epochs, "epoch_losses": [], "epoch_times_s": []}
        steps = 0
        with grid_weights(layers, rounding=False):
            weights = [lay.weight for lay in layers.values()] + branch_params(layers)
            for p in (*weights, *scales.params):
                p.requires_grad_(True)
            opt = torch.optim.Adam([{"params": scales.params, "lr": cfg.act_lr}]) if scales.params else None
            with masked_gradients(self._pipe, ctx.state.masks), steps_in_backward(weights, cfg.lr):
                for _ in ctx.progress(range(cfg.epochs), "quest stage 2 (sensitive layers)", cfg.epochs):
                    t0 = time.perf_counter()
                    order = list(range(len(data.timesteps)))
                    rng.shuffle(order)
                    total, n = 0.0, 0
                    for k in order:  # one timestep's batch on the device at a time, teacher per batch
                        for b in calibration_subset(data, cfg.samples, cfg.batch_size, device, [k]):
                            store: dict = {}
                            with torch.no_grad(), capture_outputs(teacher, names, store):
                                t_out = call_denoiser(teacher, b.kwargs)
                            # the gradient step of train_loop, on batches streamed from the recording;
                            # the weights step inside the backward, the activation scales after it
                            with torch.enable_grad():
                                loss = self._student_loss(student, b, t_out, store, names, scales)
                                if opt is not None:
                                    opt.zero_grad(set_to_none=True)
                                loss.backward()
                            if opt is not None:
                                sum_gradients(scales.params)
                                opt.step()
                            self._after_step(student, names, scales, ctx)
                            maybe_kill("tick")
                            total += sum_value(float(loss.detach())) * b.size
                            n += b.size
                            steps += 1
                    report["epoch_losses"].append(total / max(n, 1))
                    report["epoch_times_s"].append(round(time.perf_counter() - t0, 3))
        times = report["epoch_times_s"]
        report.update(steps=steps, s_per_epoch=round(sum(times) / max(len(times), 1), 4),
                      peak_memory_mb=peak_memory_mb(device))
        return report

    # ---- one optimizer step, both stages ----------------------------------------------------

    def _student_loss(self, student, b: CalibBatch, t_out: torch.Tensor, t_layers: dict, names: list[str],
                      scales: GroupScales) -> torch.Tensor:
        """The student's loss against the teacher's outputs on batch ``b``; holds the scales for the step."""
        _, kwargs, (t_out, t_layers), share = own_rows((), b.kwargs, t_out, t_layers)  # data-parallel: own rows
        store: dict = {}
        with capture_outputs(student, names, store), recomputed_quantized_weights():
            out = call_denoiser(student, kwargs)  # on-grid weights recomputed in the backward, not kept
        loss = quest_loss(out, t_out, store, t_layers, self.config.layer_loss_weight) * share
        scales.hold()
        return loss

    def _after_step(self, student, names: list[str], scales: GroupScales, ctx: StageContext) -> None:
        """After the optimizer step: other timestep groups' scales put back, pruned weights re-zeroed."""
        scales.release()
        if ctx.state.masks:
            enforce_masks_of(student, self._comp, ctx.state.masks, names)


__all__ = ["QuestStage", "QuestConfig", "detect_time_layers", "denoiser_error"]
