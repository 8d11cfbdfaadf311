"""The ``binarize`` stage: BinaryDM multi-basis binarization, W1A4 by default (docs/methods.md §7).

Steps (each explicit):

1. calibration data from the FP teacher (:mod:`diffsqueeze.pipelines.calibration`): training
   inputs in the data-free mode, and one recorded call to find the structure and count OPs;
2. the denoiser's *blocks* (children named ``*block*``: every entry of ``down_blocks``,
   ``up_blocks``, ``transformer_blocks``, ... and ``mid_block``) in execution order, grouped by
   their distance from the middle of that sequence: group 0 is the innermost (the UNet mid block),
   the last group the outermost (first down and last up block; first and last transformer block);
3. the layer policy (:mod:`~diffsqueeze.quant.binarydm.policy`): Linear/Conv2d layers outside
   every block (first conv, last conv, time-embedding MLP, patch embedding, context/pooled-text
   projections, output projection) and those matching ``keep_fp`` (``*norm*``: norms and the AdaLN
   modulations computed inside them) stay FP; the layers of the ``order2_groups`` outermost groups
   (and ``order2`` globs) get order 2, the rest ``order``;
4. swaps to :class:`~diffsqueeze.quant.nn.binary_layers.BinaryConv2d` / ``BinaryLinear``, LMB scales
   initialized from the weights, LSQ input quantizers and attention q/k/probs/v quantizers;
5. LRM projections fitted once on the teacher's block outputs (:mod:`~diffsqueeze.quant.binarydm.lrm`);
6. training (AdamW, cosine): progressive initialization switches binarization on group by group,
   innermost first, over the first ``progressive_fraction`` of the iterations; activation
   quantizers get their LSQ initialization ``s = 2 mean|x| / sqrt(Qp)`` (from one batch of every
   calibration timestep) and switch on after that. Distillation batches mix the timesteps.
   Loss: distillation (MSE to the teacher's output on calibration inputs, data-free) or the
   diffusion loss on a dataset (:mod:`~diffsqueeze.quant.binarydm.data`), plus
   ``lrm.weight * L_LRM``;
7. records for reload, pruning masks re-enforced, accounting (packed size, OPs) in the summary.

The config lives in :mod:`~diffsqueeze.quant.binarydm.config`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.calibration import (
    CalibBatch,
    CalibrationData,
    collect_calibration,
)
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.stage import ComponentStage
from diffsqueeze.pipelines.stage_helpers import (
    call_denoiser,
    capture_outputs,
    own_rows,
    stage_component,
    train_loop,
)
from diffsqueeze.prune.masks import enforce_masks, masked_gradients
from diffsqueeze.quant.binarydm.act_scales import init_act_scales
from diffsqueeze.quant.binarydm.config import BinarizeConfig
from diffsqueeze.quant.binarydm.data import (
    act_init_batches,
    check_dataset_mode,
    dataset_batches,
    first_sample,
)
from diffsqueeze.quant.binarydm.lrm import LowRankMimicking, block_outputs
from diffsqueeze.quant.binarydm.policy import (
    BinaryLayerPlan,
    block_candidates,
    block_groups,
    plan_layers,
    progressive_schedule,
)
from diffsqueeze.quant.export.accounting import (
    activation_bits_summary,
    fp32_bytes,
    ops_count,
    write_packed,
)
from diffsqueeze.quant.nn.attention import is_attention
from diffsqueeze.quant.nn.binary_layers import (
    ATTENTION_KIND,
    BinaryMixin,
    act_quantizers_of,
    install_attention_quant,
    make_binary_module,
)
from diffsqueeze.quant.nn.layers import act_param_shape
from diffsqueeze.quant.nn.recompute import recomputed_quantized_weights
from diffsqueeze.quant.nn.swaps import swap_module

__all__ = ["BinarizeConfig", "BinarizeStage"]

PACKED_DIR = "packed"


class BinarizeStage(ComponentStage):
    """BinaryDM: learnable multi-basis binarization, LRM and progressive initialization."""

    config: BinarizeConfig

    def check(self, pipe: DiffusionPipeline) -> None:
        """Reject, before any work, a config the pipeline cannot run (a :class:`RecipeError`)."""
        cfg = self.config
        comp = stage_component(pipe, cfg.component)
        root = module_components(pipe)[comp]
        blocks = block_candidates(root)
        if not blocks:
            raise RecipeError("component", f"'{comp}' has no children named *block* (down_blocks, "
                              f"transformer_blocks, ...); the binarize policy needs them")
        plans = plan_layers(root, blocks, [blocks], cfg)
        if not any(p.order for p in plans):
            raise RecipeError("include", f"no Linear/Conv2d layer of '{comp}' is left to binarize with include="
                              f"{list(cfg.include)} exclude={list(cfg.exclude)} keep_fp={list(cfg.keep_fp)}")
        if any(isinstance(m, BinaryMixin) for m in root.modules()):
            raise RecipeError("component", f"'{comp}' is already binarized by an earlier stage")
        if cfg.train.mode == "dataset" and cfg.train.iters:
            check_dataset_mode(pipe, root)

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        """Binarize the component in place (steps 1-7 above); returns the stage's summary."""
        cfg = self.config
        t0 = time.perf_counter()
        comp = stage_component(pipe, cfg.component)
        denoiser = module_components(pipe)[comp]
        teacher = module_components(ctx.teacher())[comp]
        device = next(denoiser.parameters()).device
        data = collect_calibration(ctx)
        first = next(data.batches(cfg.train.batch_size, device))
        blocks, groups = block_groups(denoiser, first.kwargs)
        plans = plan_layers(denoiser, blocks, groups, cfg)
        binary = self.swap_layers(denoiser, comp, plans, ctx)
        attention = self.quantize_attention(denoiser, comp, blocks, ctx) if cfg.activations and cfg.activations.attention else {}
        for q in act_quantizers_of(denoiser):
            q.enabled = False
        lrm = None
        if cfg.lrm.weight > 0 and cfg.train.iters:
            lrm = LowRankMimicking(blocks, cfg.lrm.rank_divisor)
            self._fit_lrm(lrm, teacher, data, device)
        training = self._train(pipe, denoiser, teacher, binary, groups, lrm, data, device, ctx)
        # whatever training did, the result is fully binarized with activations on
        for m in binary.values():
            m.weight_quant.enabled = True
        if cfg.activations is not None and not training.get("activations_initialized"):
            init_act_scales(denoiser, act_init_batches(data, cfg.train.batch_size, device))
        for q in act_quantizers_of(denoiser):
            q.enabled = True
        denoiser.requires_grad_(False)
        enforce_masks(pipe, ctx.state.masks)
        ctx.mark_changed(comp)
        summary = {
            "component": comp,
            "blocks": blocks,
            "groups_innermost_first": groups,
            "binarized_layers": len(binary),
            "order2_layers": sum(1 for m in binary.values() if m.order == 2),
            "fp_layers": {p.name: p.why for p in plans if p.order is None},
            "quantized_attention_modules": len(attention),
            "activations": activation_bits_summary(denoiser),
            "masked_layers": sum(1 for m in binary.values() if m.weight_quant.masked),
            "training": training,
            "calibration": {"timesteps": data.timesteps, "samples": data.num_samples},
        }
        summary.update(self._accounting(denoiser, teacher, first, comp, ctx))
        summary["wall_time_s"] = round(time.perf_counter() - t0, 3)
        return summary

    # ---- swaps ------------------------------------------------------------------------------

    def _act_record(self, layer: nn.Module) -> dict | None:
        acts = self.config.activations
        if acts is None:
            return None
        shape = act_param_shape(layer, acts.granularity == "channel")
        return {"format": f"int{acts.bits}_sym", "shape": list(shape), "groups": 1, "n_timesteps": 1}

    def swap_layers(self, denoiser: nn.Module, comp: str, plans: list[BinaryLayerPlan], ctx: StageContext) -> dict[str, BinaryMixin]:
        out = {}
        for plan in plans:
            if plan.order is None:
                continue
            layer = denoiser.get_submodule(plan.name)
            masked = f"{comp}/{plan.name}.weight" in ctx.state.masks
            record = {"order": plan.order, "masked": masked, "act": self._act_record(layer), "group": plan.group}
            new = make_binary_module(layer, record)
            new.weight_quant.init_from(new.weight)
            if not self.config.learn_scales:
                new.weight_quant.requires_grad_(False)
            swap_module(denoiser, plan.name, new)
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": new.KIND, **record}
            out[plan.name] = new
        return out

    def quantize_attention(self, denoiser: nn.Module, comp: str, blocks: list[str], ctx: StageContext) -> dict:
        acts = self.config.activations
        out = {}
        for name, m in denoiser.named_modules():
            if not is_attention(m) or not any(name.startswith(b + ".") for b in blocks):
                continue
            prob_bits = acts.prob_bits or acts.bits
            out[name] = install_attention_quant(m, acts.bits, prob_bits)
            ctx.state.modules[f"{comp}/{name}"] = {"kind": ATTENTION_KIND, "bits": acts.bits, "prob_bits": prob_bits}
        return out

    # ---- LRM and activation init ---------------------------------------------------------------

    @torch.no_grad()
    def _fit_lrm(self, lrm: LowRankMimicking, teacher: nn.Module, data: CalibrationData, device) -> None:
        """Fit the LRM projections on the teacher's block outputs (``lrm.fit_batches`` batches)."""
        feats: dict[str, list[torch.Tensor]] = {}
        batches = data.batches(self.config.train.batch_size, device)
        for _, b in zip(range(self.config.lrm.fit_batches), batches):
            with capture_outputs(teacher, lrm.blocks) as raw:
                call_denoiser(teacher, b.kwargs)
            for k, v in block_outputs(raw).items():
                feats.setdefault(k, []).append(v.detach())
        lrm.fit({k: torch.cat(v) for k, v in feats.items()})

    # ---- training ----------------------------------------------------------------------------

    def _train(self, pipe, denoiser, teacher, binary, groups, lrm, data, device, ctx) -> dict:
        """Train the binarized denoiser (AdamW; progressive initialization, then activations on).

        Returns:
            The training summary: schedule, first/last 10% mean losses (main and LRM).
        """
        cfg, tc = self.config, self.config.train
        n_groups = len(groups)
        layers_of_group = [[m for m in binary.values() if m.config.get("group") == g] for g in range(n_groups)]
        if not tc.iters:
            return {"mode": tc.mode, "iters": 0}
        prog_steps, switch_on = progressive_schedule(tc.iters, cfg.progressive_fraction if cfg.progressive else 0.0,
                                                     n_groups)
        acts_on_at = prog_steps if cfg.activations is not None else None
        for m in binary.values():
            m.weight_quant.enabled = not cfg.progressive
        scales = {id(p) for m in binary.values() for p in m.weight_quant.parameters()}
        scales |= {id(q.scale) for q in act_quantizers_of(denoiser)}
        denoiser.requires_grad_(True)
        if not cfg.learn_scales:
            for m in binary.values():
                m.weight_quant.requires_grad_(False)
        params = [p for p in denoiser.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([
            {"params": [p for p in params if id(p) not in scales], "lr": tc.lr, "weight_decay": tc.weight_decay},
            {"params": [p for p in params if id(p) in scales], "lr": tc.scale_lr or tc.lr, "weight_decay": 0.0},
        ])
        if tc.schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, tc.iters) / tc.iters)))
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        if tc.grad_clip:  # clip after backward, before the update: a pre-hook of opt.step()
            def clip(*_) -> None:
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.register_step_pre_hook(clip)
        batches = self._batches(pipe, denoiser, data, device, ctx)
        need_teacher = tc.mode == "distill" or lrm is not None
        lrm_blocks = lrm.blocks if lrm is not None else []
        log_main, log_lrm = [], []
        acts_initialized = False

        def step(it: int):
            nonlocal acts_initialized
            for g, at in switch_on.items():
                if it == at:
                    for m in layers_of_group[g]:
                        m.weight_quant.enabled = True
            kwargs, target = next(batches)
            _, kwargs, (target,), share = own_rows((), kwargs, target)  # data-parallel: this process's rows
            if acts_on_at is not None and it == acts_on_at:
                init_act_scales(denoiser, act_init_batches(data, tc.batch_size, device))
                for q in act_quantizers_of(denoiser):
                    q.enabled = True
                acts_initialized = True
            t_store: dict = {}
            if need_teacher:
                with torch.no_grad(), capture_outputs(teacher, lrm_blocks) as raw:
                    t_out = call_denoiser(teacher, kwargs)
                t_store = block_outputs(raw)
            with capture_outputs(denoiser, lrm_blocks) as raw, recomputed_quantized_weights():
                s_out = call_denoiser(denoiser, kwargs)  # binarized weights recomputed in the backward
                s_store = block_outputs(raw)
                goal = t_out if tc.mode == "distill" else target
                main = F.mse_loss(s_out.float(), goal.float())
                loss = main
                if lrm is not None:
                    l_lrm = lrm.loss(s_store, t_store)
                    loss = loss + cfg.lrm.weight * l_lrm
                    log_lrm.append(float(l_lrm.detach()))
            log_main.append(float(main.detach()))
            fields = {"loss": f"{log_main[-1]:.4g}", **({"lrm": f"{log_lrm[-1]:.4g}"} if log_lrm else {})}
            return loss * share, main * share, fields

        def after_step() -> None:
            with torch.no_grad():
                for q in act_quantizers_of(denoiser):
                    q.scale.clamp_(min=1e-8)
            if ctx.state.masks:
                enforce_masks(pipe, ctx.state.masks)

        denoiser.eval()
        try:
            with masked_gradients(pipe, ctx.state.masks):
                train_loop(opt, tc.iters, step, "binarize: training", scheduler=sched, after_step=after_step)
        finally:
            opt.zero_grad(set_to_none=True)
            denoiser.requires_grad_(False)

        def avg(xs, part):
            k = max(1, len(xs) // 10)
            sel = xs[:k] if part == "first" else xs[-k:]
            return round(sum(sel) / len(sel), 6) if sel else None

        return {"mode": tc.mode, "iters": tc.iters, "progressive_steps": prog_steps,
                "groups_switched_on_at": list(switch_on.values()), "activations_on_at": acts_on_at,
                "loss_first_10pct": avg(log_main, "first"), "loss_last_10pct": avg(log_main, "last"),
                "lrm_first_10pct": avg(log_lrm, "first"), "lrm_last_10pct": avg(log_lrm, "last"),
                "activations_initialized": acts_initialized}

    def _batches(self, pipe, denoiser, data: CalibrationData, device, ctx) -> Iterator[tuple[dict, torch.Tensor | None]]:
        tc = self.config.train
        if tc.mode == "distill" and tc.shuffle:
            for kwargs in data.shuffled_batches(tc.batch_size, device, seed=ctx.seed):
                yield kwargs, None
        elif tc.mode == "distill":
            while True:
                for b in data.batches(tc.batch_size, device):
                    yield b.kwargs, None
        else:
            yield from dataset_batches(pipe, denoiser, tc, device, ctx.seed)

    # ---- accounting --------------------------------------------------------------------------

    def _accounting(self, denoiser, teacher, first: CalibBatch, comp: str, ctx: StageContext) -> dict:
        """OPs of one batch-1 call (binarized and FP) and the packed file's size against FP32."""
        one = first_sample(first.kwargs)
        ops = ops_count(denoiser, one, call_denoiser)
        ops_fp = ops_count(teacher, one, call_denoiser)
        folder = Path(ctx.run_dir) / PACKED_DIR
        packed = write_packed(denoiser, folder / f"{comp}.safetensors", {"format": "diffsqueeze-binarydm-packed"})
        tmp = folder / f".{comp}-fp32.safetensors"
        try:
            fp32 = fp32_bytes(teacher, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return {
            "ops": {"macs": ops["macs"], "ops": round(ops["ops"]), "fp_macs": ops["fp_macs"],
                    "quantized_macs": ops["quantized_macs"], "attention_macs": ops["attention_macs"],
                    "ops_fp32": ops_fp["ops"], "saving_vs_fp32": round(ops_fp["ops"] / ops["ops"], 3),
                    "per": "one denoiser call, batch 1"},
            "storage": {"packed_bytes": packed["bytes"], "packed_file": str(Path(PACKED_DIR) / f"{comp}.safetensors"),
                        "fp32_bytes": fp32, "ratio_fp32_to_packed": round(fp32 / packed["bytes"], 3),
                        "breakdown_bytes": packed["breakdown_bytes"]},
        }
