"""The ``ptq`` stage: post-training quantization of the denoiser (docs/methods.md §1-5).

Steps (each explicit, none triggered by a first forward):

1. record calibration data from the FP teacher (:mod:`diffsqueeze.pipelines.calibration`);
2. find the layers (include/exclude/keep_fp globs), their execution order (first and last
   layer keep 8-bit activations), and concatenated skip inputs (shortcut splitting);
3. swap them for :class:`~diffsqueeze.quant.nn.layers.QuantLinear` / ``QuantConv2d``;
4. weight scales / FP biases by search (weight MSE or layer-output L2), FP format per layer;
5. activation scales per timestep group from the streamed calibration data;
6. optional learned rounding (AdaRound, block-wise reconstruction) and LSQ of activation scales;
7. softmax quantizers, records for reload, masks re-enforced.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.calibration import (
    CalibrationError,
    collect_calibration,
)
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.stage import ComponentStage
from diffsqueeze.pipelines.stage_helpers import stage_component
from diffsqueeze.prune.masks import enforce_masks
from diffsqueeze.quant.nn.attention import SOFTMAX_KIND, is_attention, quantize_softmax
from diffsqueeze.quant.nn.layers import QuantMixin, act_param_shape, make_quant_module
from diffsqueeze.quant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.nn.routing import (
    attach_timestep_routing,
    group_assignment,
    timestep_routing,
)
from diffsqueeze.quant.nn.swaps import swap_module
from diffsqueeze.quant.primitives.formats import bias_to_scale, formats_for_bits, parse_format
from diffsqueeze.quant.primitives.search import (
    fp_bias_search,
    fp_format_search,
    output_l2_loss,
    search_act_params,
    search_weight_params,
)
from diffsqueeze.quant.ptq.config import PTQConfig
from diffsqueeze.quant.ptq.input_capture import CalibrationReplay, capture_input_rows, capture_input_samples
from diffsqueeze.quant.ptq.reconstruct import reconstruct
from diffsqueeze.quant.ptq.smoothing import channel_absmax, choose_scale
from diffsqueeze.quant.ptq.tracing import (
    PTQLayerPlan,
    execution_order,
    select_layers,
    spans_inputs,
)

log = logging.getLogger(__name__)


WEIGHT_COARSE_STEP = 8
"""``weights.scale_search: coarse_to_fine`` scores every 8th INT candidate, then refines (search.py)."""


class PTQStage(ComponentStage):
    """Post-training quantization with timestep-aware calibration and learned rounding."""

    config: PTQConfig

    def check(self, pipe: DiffusionPipeline) -> None:
        cfg = self.config
        name = stage_component(pipe, cfg.component)
        if not select_layers(module_components(pipe)[name], cfg.include, (*cfg.exclude, *cfg.keep_fp)):
            raise RecipeError("include", f"no Linear/Conv2d layer of '{name}' matches include={list(cfg.include)} "
                              f"exclude={list(cfg.exclude)} keep_fp={list(cfg.keep_fp)}")

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        calib_cfg = ctx.calibration
        if cfg.activations is not None and cfg.activations.timestep_groups > calib_cfg.timesteps:
            raise RecipeError("activations.timestep_groups", f"{cfg.activations.timestep_groups} groups need at "
                              f"least as many calibration timesteps (calibration.timesteps = {calib_cfg.timesteps})")
        comp = stage_component(pipe, cfg.component)
        denoiser = module_components(pipe)[comp]
        data = collect_calibration(ctx)
        limit = cfg.samples_per_timestep or None
        device = next(denoiser.parameters()).device
        replay = CalibrationReplay(data, cfg.batch_size, device, limit)
        first = next(replay.batches())
        names = select_layers(denoiser, cfg.include, (*cfg.exclude, *cfg.keep_fp))
        order, splits, first_layer = execution_order(denoiser, names, first.kwargs)
        plans = self._plan(order, splits, first_layer)
        summary: dict = {"component": comp, "calibration": {"timesteps": data.timesteps, "steps": data.steps,
                                                             "samples": data.num_samples}}
        need_inputs = cfg.weights.search == "output" or bool(cfg.smoothing.search)
        inputs = capture_input_samples(denoiser, names, replay) if need_inputs else {}
        modules = dict(denoiser.named_modules())
        smooth = self._smoothing(denoiser, plans, replay, inputs, ctx) if cfg.smoothing.enabled else {}
        if smooth:
            alphas = [a for _, a in smooth.values()]
            summary["smoothing"] = {"layers": len(smooth), "alphas": {f"{a:g}": alphas.count(a) for a in sorted(set(alphas))}}
        groups = cfg.activations.timestep_groups if cfg.activations else 1
        group_of = group_assignment(len(data.timesteps), groups)
        for plan in ctx.progress(plans, desc="ptq: weights", total=len(plans)):
            layer = modules[plan.name]
            record = self._record(layer, plan, groups, len(data.timesteps))
            rank = self._lowrank_rank(layer, plan, f"{comp}/{plan.name}.weight" in ctx.state.masks)
            if rank:
                record["lowrank"] = rank
            if plan.name in smooth:
                record["smooth"] = True
            qlayer = make_quant_module(layer, record)
            if plan.name in smooth:  # before the branch and the scale search: both see the smoothed weight
                qlayer.set_smoothing(smooth[plan.name][0])
            if rank:
                qlayer.init_lowrank()  # before the scale search: the residual is what is quantized
            for q in qlayer.act_quantizers():
                q.set_routing(data.timesteps, group_of)
            try:
                self._init_weights(qlayer, plan, inputs.get(plan.name) if cfg.weights.search == "output" else None)
            except ValueError as exc:  # NaN/Inf weights: name the layer
                raise CalibrationError(f"cannot quantize the weight of layer '{plan.name}': {exc}") from None
            if hasattr(qlayer, "weight_quant"):
                record["weight_format"] = qlayer.weight_quant.fmt.name
            if hasattr(qlayer, "weight_quant_2"):
                record["weight_format_2"] = qlayer.weight_quant_2.fmt.name
            qlayer.config = record
            swap_module(denoiser, plan.name, qlayer)
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": qlayer.KIND, **record}
        del inputs
        if cfg.activations is not None and not cfg.activations.dynamic_group:  # dynamic: nothing to calibrate
            self._init_acts(denoiser, plans, replay, group_of, ctx)
        if cfg.rounding.method == "adaround" or (cfg.activations and cfg.activations.lsq_iters):
            summary["reconstruction"] = reconstruct(denoiser, ctx.teacher(), comp, cfg, replay, ctx.state.masks, ctx)
        # the records now hold the final formats (chosen by search); write them again
        for plan in plans:
            qlayer = denoiser.get_submodule(plan.name)
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": qlayer.KIND, **qlayer.config}
        if cfg.softmax_bits:
            n_attn = 0
            for name, m in denoiser.named_modules():
                if is_attention(m):
                    quantize_softmax(m, cfg.softmax_bits)
                    ctx.state.modules[f"{comp}/{name}"] = {"kind": SOFTMAX_KIND, "bits": cfg.softmax_bits}
                    n_attn += 1
            summary["softmax_quantized_attention_modules"] = n_attn
        enforce_masks(pipe, ctx.state.masks)
        attach_timestep_routing(denoiser)
        ctx.mark_changed(comp)
        summary.update(self._layer_summary(denoiser, plans))
        summary["wall_time_s"] = round(time.perf_counter() - t0, 3)
        return summary

    # ------------------------------------------------------------------------------------

    def _plan(self, order: list[str], splits: dict[str, int], first_layer: str | None) -> list[PTQLayerPlan]:
        cfg = self.config
        wkind, wbits, wname = cfg.weights.spec
        plans = []
        ends = {first_layer or order[0], order[-1]} if order else set()
        for name in order:
            plan = PTQLayerPlan(name, wname, wbits if wname is None else None, None, None,
                             splits.get(name, 0) if cfg.shortcut_split else 0)
            if name in ends and cfg.first_last_weights_fp:
                plan.weight_format, plan.weight_search_bits = None, None
                plan.notes.append("weights kept FP (first/last layer)")
            if cfg.activations is not None:
                _, abits, aname = cfg.activations.spec
                if name in ends and cfg.activations.first_last_bits and abits < cfg.activations.first_last_bits:
                    abits, aname = 8, (parse_format(aname).eight_bit if aname else None)
                    plan.notes.append("8-bit activations (first/last layer)")
                plan.act_format, plan.act_search_bits = aname, (abits if aname is None else None)
            plans.append(plan)
        return plans

    def _smoothing(self, denoiser, plans, replay: CalibrationReplay, inputs, ctx) -> dict[str, tuple[torch.Tensor, float]]:
        """Smoothing scale and alpha of each layer that gets one (docs/methods.md §10; quant/ptq/smoothing.py)."""
        cfg = self.config
        eligible = []
        for p in plans:
            if not (p.weight_format or p.weight_search_bits):
                continue
            if getattr(denoiser.get_submodule(p.name), "groups", 1) != 1:
                p.notes.append("not smoothed: grouped conv")
                continue
            eligible.append(p)
        batches = ctx.progress(replay.batches(), "ptq: smoothing statistics", None)
        with torch.no_grad(), timestep_routing(denoiser):
            act_max = channel_absmax(denoiser, [p.name for p in eligible], batches)
        acts = cfg.activations
        out = {}
        for p in eligible:
            wname = p.weight_format or formats_for_bits(p.weight_search_bits)[0].name
            wfmt = parse_format(wname).element  # the proxy quantizes on the element grid
            act_format = parse_format(p.act_format or formats_for_bits(p.act_search_bits)[0].name)
            afmt, gs = act_format.element, act_format.block or acts.group_size
            s, alpha = choose_scale(denoiser.get_submodule(p.name), act_max[p.name], inputs.get(p.name),
                                    cfg.smoothing.alpha, tuple(cfg.smoothing.search), wfmt, afmt, acts.granularity, gs)
            if s is None:
                p.notes.append("not smoothed: no alpha beat the unsmoothed layer")
                continue
            p.notes.append(f"smoothed (alpha {alpha:g})")
            out[p.name] = (s, alpha)
        return out

    def _lowrank_rank(self, layer: torch.nn.Module, plan: PTQLayerPlan, pruned: bool) -> int:
        """The low-rank branch's rank for ``layer`` (0: none; pruned and grouped layers get none:
        the residual would fill the pruned zeros, the branch conv does not take groups)."""
        cfg = self.config.lowrank
        if not (cfg.rank or cfg.fraction) or not plan.weight_format and not plan.weight_search_bits:
            return 0
        if pruned or getattr(layer, "groups", 1) != 1:
            plan.notes.append("no low-rank branch: " + ("pruned layer" if pruned else "grouped conv"))
            return 0
        return cfg.rank_for(layer.weight.shape[0], layer.weight[0].numel())

    def _record(self, layer: torch.nn.Module, plan: PTQLayerPlan, groups: int, n_t: int) -> dict:
        cfg = self.config
        wfmt = plan.weight_format or (formats_for_bits(plan.weight_search_bits)[0].name if plan.weight_search_bits else None)
        gs = cfg.weights.group_size if cfg.weights.granularity == "group" else 0
        if gs and wfmt:
            row = layer.weight[0].numel() if not plan.split else None
            if row is not None and row % gs:
                gs = 0
                plan.notes.append(f"group_size {cfg.weights.group_size} does not divide {row}: per channel")
        act = None
        if plan.act_format or plan.act_search_bits:
            afmt = plan.act_format or formats_for_bits(plan.act_search_bits)[0].name
            per_channel = cfg.activations.granularity == "channel"
            act = {"format": afmt, "shape": list(act_param_shape(layer, per_channel)), "groups": groups,
                   "n_timesteps": n_t}
            if cfg.activations.dynamic_group:
                act["group_size"] = cfg.activations.dynamic_group
        if plan.split and gs:
            gs = 0
        return {"weight_format": wfmt, "group_size": gs, "act": act, "split": plan.split}

    # ---- weights ----------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, qlayer: QuantMixin, plan: PTQLayerPlan, x: torch.Tensor | None) -> None:
        w = qlayer.weight.detach()
        steps = self.config.weights.search_steps
        for q, sl in qlayer.weight_parts():
            if not q.searchable:  # block scales come from the blocks: nothing to search
                continue
            part = w[:, sl]
            g = q.grouped(part)
            loss_fn = None
            if x is not None and not qlayer.split and q.group_size == part[0].numel() \
                    and spans_inputs(qlayer, x, plan):
                loss_fn = self._output_loss(qlayer, x, q)
            if plan.weight_search_bits:  # FP format search per layer (docs/methods.md §3)
                fmt, bias = fp_format_search(g, plan.weight_search_bits, axis=(0, 1), loss_fn=loss_fn, n_steps=steps)
                new = WeightQuantizer(fmt, q.weight_shape, q.group_size).to(w.device)
                new.set_params(bias=bias)
                setattr(qlayer, "weight_quant" if sl.start in (None, 0) else "weight_quant_2", new)
            else:
                coarse = WEIGHT_COARSE_STEP if self.config.weights.scale_search == "coarse_to_fine" else 0
                q.set_params(**search_weight_params(q.fmt, g, loss_fn=loss_fn, n_steps=steps, coarse_step=coarse))

    def _output_loss(self, qlayer: QuantMixin, x: torch.Tensor, q: WeightQuantizer):
        shape = qlayer.weight.shape
        x = qlayer.smoothed_input(x)  # the smoothed weight multiplies the smoothed input
        if isinstance(qlayer, torch.nn.Conv2d):
            ref = qlayer._conv_forward(x, qlayer.weight, qlayer.bias)
            return output_l2_loss(lambda wg: qlayer._conv_forward(x, wg.reshape(shape), qlayer.bias), ref, 1)
        ref = F.linear(x, qlayer.weight, qlayer.bias)
        return output_l2_loss(lambda wg: F.linear(x, wg.reshape(shape), qlayer.bias), ref, -1)

    # ---- activations -------------------------------------------------------------------

    def _init_acts(self, denoiser, plans, replay: CalibrationReplay, group_of, ctx) -> None:
        layers = {p.name: denoiser.get_submodule(p.name) for p in plans}
        quantizers = [q for lay in layers.values() for q in lay.act_quantizers()]
        for lay in layers.values():
            lay.quant_acts = False
        try:
            max_values = self.config.activations.search_values if self.config.activations else 0
            store = capture_input_rows(denoiser, list(layers), replay, group_of, max_values, ctx.progress)
        finally:
            for lay in layers.values():
                lay.quant_acts = True
        del quantizers
        for plan in ctx.progress(plans, desc="ptq: activation scales", total=len(plans)):
            lay = layers[plan.name]
            for g in sorted({k[1] for k in store if k[0] == plan.name}):
                rows = store[(plan.name, g)]
                parts = [(lay.act_quant, rows)]
                if lay.split:
                    parts = [(lay.act_quant, rows[:, : lay.split]), (lay.act_quant_2, rows[:, lay.split:])]
                for q, r in parts:
                    self._init_act_quantizer(lay, q, r, g, plan)
            lay.config["act"]["format"] = lay.act_quant.fmt.name
            if lay.split:
                lay.config["act"]["format_2"] = lay.act_quant_2.fmt.name

    @torch.no_grad()
    def _init_act_quantizer(self, lay, q: ActQuantizer, rows: torch.Tensor, group: int, plan: PTQLayerPlan) -> None:
        cfg = self.config.activations
        steps = self.config.weights.search_steps
        per_channel = q.param_shape != (1,)
        axis = 1 if per_channel else None
        if plan.act_search_bits:
            fmt, bias = fp_format_search(rows, plan.act_search_bits, axis=axis, n_steps=steps)
            if fmt != q.fmt:
                if group > 0:
                    fmt, bias = q.fmt, fp_bias_search(rows, q.fmt, axis=axis, n_steps=steps)  # format fixed by group 0
                else:
                    new = ActQuantizer(fmt, q.param_shape, q.groups, q.group_t.numel() if q.groups > 1 else 1)
                    new = new.to(rows.device)
                    if q.groups > 1:
                        new.set_routing(q.group_t.tolist(), q.group_of.tolist())
                    name = "act_quant" if q is lay.act_quant else "act_quant_2"
                    setattr(lay, name, new)
                    q = new
            q.set_params(group, bias_to_scale(fmt, bias))
            return
        scale, zp = search_act_params(q.fmt, rows, axis=axis, n_steps=steps, percentile=cfg.init == "percentile")
        q.set_params(group, scale, zp)

    def _layer_summary(self, denoiser, plans) -> dict:
        layers = {}
        for p in plans:
            lay = denoiser.get_submodule(p.name)
            layers[p.name] = {
                "weights": [q.fmt.name for q in lay.weight_quantizers()] or "fp",
                "activations": [q.format_name for q in lay.act_quantizers()] or "fp",
                **({"split": lay.split} if lay.split else {}),
                **({"lowrank": lay.lowrank_rank} if getattr(lay, "lowrank_rank", 0) else {}),
                **({"notes": p.notes} if p.notes else {}),
            }
        branch = sum(lay.lowrank_up.numel() + lay.lowrank_down.numel() for p in plans
                     if getattr(lay := denoiser.get_submodule(p.name), "lowrank_rank", 0))
        out = {"quantized_layers": len(plans), "layers": layers}
        if branch:
            out["lowrank"] = {"layers": sum("lowrank" in v for v in layers.values()), "params": branch,
                              "float16_bytes": 2 * branch}
        return out


__all__ = ["PTQStage", "PTQConfig"]
