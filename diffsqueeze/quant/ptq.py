"""The ``ptq`` stage: post-training quantization of the denoiser (METHODS.md §1-5).

Steps (each explicit, none triggered by a first forward):

1. record calibration data from the FP teacher (:mod:`diffsqueeze.pipelines.calibration`);
2. find the layers (include/exclude/keep_fp globs), their execution order (first and last
   layer keep 8-bit activations), and concatenated skip inputs (shortcut splitting);
3. swap them for :class:`~diffsqueeze.quant.modules.QuantLinear` / ``QuantConv2d``;
4. weight scales / FP biases by search (weight MSE or layer-output L2), FP format per layer;
5. activation scales per timestep group from the streamed calibration data;
6. optional learned rounding (AdaRound, block-wise reconstruction) and LSQ of activation scales;
7. softmax quantizers, records for reload, masks re-enforced.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import find_roles, module_components
from diffsqueeze.pipelines.calibration import CalibrationData, CalibrationError, collect_calibration
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.module_swaps import register_finalizer
from diffsqueeze.pipelines.stage import register_stage
from diffsqueeze.prune.masks import enforce_masks
from diffsqueeze.quant.attention import is_attention, quantize_softmax
from diffsqueeze.quant.config import PTQConfig, eight_bit_like
from diffsqueeze.quant.formats import FPFormat, formats_for_bits
from diffsqueeze.quant.modules import QuantMixin, act_param_shape, make_quant_module, quant_layer_types
from diffsqueeze.quant.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.search import (
    fp_bias_search,
    fp_format_search,
    int_scale_search,
    output_l2_loss,
    percentile_int_init,
)
from diffsqueeze.quant.timestep import attach_timestep_routing, group_assignment, timestep_routing

log = logging.getLogger(__name__)


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the wanted tensors are captured."""


def denoiser_name(pipe: DiffusionPipeline, component: str) -> str:
    roles = find_roles(pipe)
    return roles.denoiser if component == "denoiser" else component


def select_layers(root: torch.nn.Module, cfg: PTQConfig) -> list[str]:
    """Names of Linear/Conv2d layers matched by include, not by exclude or keep_fp."""
    out = []
    for name, module in root.named_modules():
        if not isinstance(module, quant_layer_types()) or isinstance(module, QuantMixin):
            continue
        if not any(fnmatch.fnmatchcase(name, g) for g in cfg.include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in (*cfg.exclude, *cfg.keep_fp)):
            continue
        out.append(name)
    return out


def call_denoiser(denoiser: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """Run the denoiser on recorded inputs; returns its prediction tensor."""
    out = denoiser(**{**kwargs, "return_dict": False})
    return out[0] if isinstance(out, (tuple, list)) else out


def execution_order(denoiser: torch.nn.Module, names: list[str], kwargs: dict) -> tuple[list[str], dict[str, int], str | None]:
    """Layers in the order of their first call, concatenated-input splits (METHODS §5), and the
    first layer: the one that takes the latent input itself (``conv_in``, the patch embedding).

    A split is found where a module's input is the output of a channel ``torch.cat`` (dim 1) of
    two 4-D tensors and a listed conv inside that module takes all those channels: the conv
    then gets ``split = channels of the first part`` (Q-Diffusion's shortcut splitting).
    """
    from torch.overrides import TorchFunctionMode

    modules = dict(denoiser.named_modules())
    order: list[str] = []
    cats: dict[int, int] = {}
    splits: dict[str, int] = {}
    latent = kwargs.get("sample", kwargs.get("hidden_states"))
    latent_key = (latent.data_ptr(), tuple(latent.shape)) if torch.is_tensor(latent) else None
    first_input: list[str | None] = [None]

    class CatMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kw=None):
            out = func(*args, **(kw or {}))
            if func is torch.cat:
                kw = kw or {}
                tensors = args[0] if args else kw.get("tensors", ())
                dim = kw.get("dim", args[1] if len(args) > 1 else 0)
                if dim == 1 and len(tensors) == 2 and all(t.dim() == 4 for t in tensors):
                    cats[(out.data_ptr(), tuple(out.shape))] = tensors[0].shape[1]
            return out

    def pre(name):
        def hook(module, args):
            key = (args[0].data_ptr(), tuple(args[0].shape)) if args and torch.is_tensor(args[0]) else None
            if name in names and name not in order:
                order.append(name)
                if first_input[0] is None and key is not None and key == latent_key:
                    first_input[0] = name
            if key in cats:
                first = cats[key]
                channels = args[0].shape[1]
                for sub, m in module.named_modules():
                    full = f"{name}.{sub}" if sub else name
                    if full in names and isinstance(m, torch.nn.Conv2d) and m.in_channels == channels:
                        splits[full] = first
        return hook

    handles = [m.register_forward_pre_hook(pre(n)) for n, m in modules.items() if n]
    try:
        with torch.no_grad(), CatMode():
            call_denoiser(denoiser, kwargs)
    finally:
        for h in handles:
            h.remove()
    order += [n for n in names if n not in order]  # layers not called: last
    return order, splits, first_input[0]


@dataclass
class LayerPlan:
    """What one layer gets: weight format (or FP search), activation format (or search)."""

    name: str
    weight_format: str | None
    weight_search_bits: int | None
    act_format: str | None
    act_search_bits: int | None
    split: int = 0
    notes: list[str] = field(default_factory=list)


OUTPUT_SEARCH_STEPS = 4
"""Calibration timesteps (spread over the trajectory) whose inputs the output search uses."""
OUTPUT_SEARCH_ROWS_PER_STEP = 2


def _spans_inputs(layer: torch.nn.Module, x: torch.Tensor, plan: LayerPlan) -> bool:
    """Whether the calibration inputs ``x`` determine the layer's output error for any weight.

    The output L2 search (METHODS 3) only sees the weight on the span of the calibration
    inputs. A Linear or 1x1-conv layer fed by a handful of distinct vectors (the time
    embedding: one per calibration timestep; text projections: a few prompts) leaves most of
    its weight unconstrained, and the search then picks biases that wreck channels on inputs
    it has not seen (measured on builtin:fashion: FP8 E4M3 channels at 0.5 dB SQNR in the
    time-embedding projections). Such layers are searched on the weight's own error instead,
    and the plan's notes say so. k x k convolutions see many patches and are kept.
    """
    if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1):
        return True
    rows = _act_rows(x, isinstance(layer, torch.nn.Conv2d)).double()
    rows = rows[:: -(-rows.shape[0] // 4096)]  # at most 4096 rows, evenly strided
    features = rows.shape[1]
    rank = int(torch.linalg.matrix_rank(rows, rtol=1e-6))
    if rank >= features:
        return True
    plan.notes.append(f"output search off: calibration inputs span {rank} of {features} input dims; "
                      f"searched on the weight error")
    return False


def _act_rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Activation as ``(rows, channels)``: channel dim 1 for conv inputs, last dim for tokens."""
    if conv:
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])


@register_stage("ptq", PTQConfig)
class PTQStage:
    """Post-training quantization with timestep-aware calibration and learned rounding."""

    def __init__(self, config: PTQConfig):
        self.config = config

    def check(self, pipe: DiffusionPipeline) -> None:
        cfg = self.config
        comps = module_components(pipe)
        name = denoiser_name(pipe, cfg.component)
        if name not in comps:
            raise RecipeError("component", f"no component '{cfg.component}' in {type(pipe).__name__}; "
                              f"its components: {', '.join(comps)} (or 'denoiser')")
        if not select_layers(comps[name], cfg):
            raise RecipeError("include", f"no Linear/Conv2d layer of '{name}' matches include={list(cfg.include)} "
                              f"exclude={list(cfg.exclude)} keep_fp={list(cfg.keep_fp)}")

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        calib_cfg = ctx.recipe.calibration
        if cfg.activations is not None and cfg.activations.timestep_groups > calib_cfg.timesteps:
            raise RecipeError("activations.timestep_groups", f"{cfg.activations.timestep_groups} groups need at "
                              f"least as many calibration timesteps (calibration.timesteps = {calib_cfg.timesteps})")
        comp = denoiser_name(pipe, cfg.component)
        denoiser = module_components(pipe)[comp]
        data = collect_calibration(ctx)
        limit = cfg.samples_per_timestep or None
        device = next(denoiser.parameters()).device
        first = next(data.batches(cfg.batch_size, device, limit=limit))
        names = select_layers(denoiser, cfg)
        order, splits, first_layer = execution_order(denoiser, names, first.kwargs)
        plans = self._plan(order, splits, first_layer)
        summary: dict = {"component": comp, "calibration": {"timesteps": data.timesteps, "steps": data.steps,
                                                             "samples": data.num_samples}}
        need_inputs = cfg.weights.search == "output"
        inputs = self._collect(denoiser, names, data, device, limit, sample_only=True) if need_inputs else {}
        modules = dict(denoiser.named_modules())
        groups = cfg.activations.timestep_groups if cfg.activations else 1
        group_of = group_assignment(len(data.timesteps), groups)
        for plan in ctx.progress(plans, desc="ptq: weights", total=len(plans)):
            layer = modules[plan.name]
            record = self._record(layer, plan, groups, len(data.timesteps))
            qlayer = make_quant_module(layer, record)
            for q in qlayer.act_quantizers():
                q.set_routing(data.timesteps, group_of)
            try:
                self._init_weights(qlayer, plan, inputs.get(plan.name))
            except ValueError as exc:  # NaN/Inf weights: name the layer
                raise CalibrationError(f"cannot quantize the weight of layer '{plan.name}': {exc}") from None
            if hasattr(qlayer, "weight_quant"):
                record["weight_format"] = qlayer.weight_quant.fmt.name
            if hasattr(qlayer, "weight_quant_2"):
                record["weight_format_2"] = qlayer.weight_quant_2.fmt.name
            qlayer.config = record
            _swap(denoiser, plan.name, qlayer)
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": type(qlayer).__name__, **record}
        del inputs
        if cfg.activations is not None:
            self._init_acts(denoiser, plans, data, device, limit, group_of, ctx)
        if cfg.rounding.method == "adaround" or (cfg.activations and cfg.activations.lsq_iters):
            from diffsqueeze.quant.reconstruct import reconstruct

            summary["reconstruction"] = reconstruct(denoiser, ctx.teacher(), comp, cfg, data, device, limit,
                                                    ctx.state.masks, ctx)
        # the records now hold the final formats (chosen by search); write them again
        for plan in plans:
            qlayer = denoiser.get_submodule(plan.name)
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": type(qlayer).__name__, **qlayer.config}
        if cfg.softmax_bits:
            n_attn = 0
            for name, m in denoiser.named_modules():
                if is_attention(m):
                    quantize_softmax(m, cfg.softmax_bits)
                    ctx.state.modules[f"{comp}/{name}"] = {"kind": "QuantSoftmax", "bits": cfg.softmax_bits}
                    n_attn += 1
            summary["softmax_quantized_attention_modules"] = n_attn
        enforce_masks(pipe, ctx.state.masks)
        attach_timestep_routing(denoiser)
        ctx.mark_changed(comp)
        summary.update(self._layer_summary(denoiser, plans))
        summary["wall_time_s"] = round(time.perf_counter() - t0, 3)
        return summary

    # ------------------------------------------------------------------------------------

    def _plan(self, order: list[str], splits: dict[str, int], first_layer: str | None) -> list[LayerPlan]:
        cfg = self.config
        wkind, wbits, wname = cfg.weights.spec
        plans = []
        ends = {first_layer or order[0], order[-1]} if order else set()
        for name in order:
            plan = LayerPlan(name, wname, wbits if wname is None else None, None, None,
                             splits.get(name, 0) if cfg.shortcut_split else 0)
            if name in ends and cfg.first_last_weights_fp:
                plan.weight_format, plan.weight_search_bits = None, None
                plan.notes.append("weights kept FP (first/last layer)")
            if cfg.activations is not None:
                akind, abits, aname = cfg.activations.spec
                if name in ends and cfg.activations.first_last_bits and abits < cfg.activations.first_last_bits:
                    abits, aname = 8, eight_bit_like(aname, akind)
                    plan.notes.append("8-bit activations (first/last layer)")
                plan.act_format, plan.act_search_bits = aname, (abits if aname is None else None)
            plans.append(plan)
        return plans

    def _record(self, layer: torch.nn.Module, plan: LayerPlan, groups: int, n_t: int) -> dict:
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
        if plan.split and gs:
            gs = 0
        return {"weight_format": wfmt, "group_size": gs, "act": act, "split": plan.split}

    # ---- weights ----------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, qlayer: QuantMixin, plan: LayerPlan, x: torch.Tensor | None) -> None:
        w = qlayer.weight.detach()
        steps = self.config.weights.search_steps
        for q, sl in qlayer.weight_parts():
            part = w[:, sl]
            g = q.grouped(part)
            loss_fn = None
            if x is not None and not qlayer.split and q.group_size == part[0].numel() \
                    and _spans_inputs(qlayer, x, plan):
                loss_fn = self._output_loss(qlayer, x, q)
            if plan.weight_search_bits:  # FP format search per layer (METHODS §3)
                fmt, bias = fp_format_search(g, plan.weight_search_bits, axis=(0, 1), loss_fn=loss_fn, n_steps=steps)
                new = WeightQuantizer(fmt, q.weight_shape, q.group_size).to(w.device)
                new.set_params(bias=bias)
                setattr(qlayer, "weight_quant" if sl.start in (None, 0) else "weight_quant_2", new)
            elif q.is_int:
                scale, zp = int_scale_search(g, q.fmt.bits, q.fmt.symmetric, axis=(0, 1), loss_fn=loss_fn)
                q.set_params(scale=scale, zero_point=zp)
            else:
                q.set_params(bias=fp_bias_search(g, q.fmt, axis=(0, 1), loss_fn=loss_fn, n_steps=steps))

    def _output_loss(self, qlayer: QuantMixin, x: torch.Tensor, q: WeightQuantizer):
        shape = qlayer.weight.shape
        if isinstance(qlayer, torch.nn.Conv2d):
            ref = qlayer._conv_forward(x, qlayer.weight, qlayer.bias)
            return output_l2_loss(lambda wg: qlayer._conv_forward(x, wg.reshape(shape), qlayer.bias), ref, 1)
        ref = F.linear(x, qlayer.weight, qlayer.bias)
        return output_l2_loss(lambda wg: F.linear(x, wg.reshape(shape), qlayer.bias), ref, -1)

    # ---- activations -------------------------------------------------------------------

    def _collect(self, denoiser, names, data: CalibrationData, device, limit, sample_only: bool,
                 group_of: list[int] | None = None, progress=None) -> dict:
        """Inputs of the named layers over the calibration data.

        ``sample_only``: the first batch's inputs (up to 4 samples) per layer, for the output
        loss. Otherwise ``(rows, channels)`` samples per (layer, group), capped in size, with a
        NaN/Inf check naming the layer and timestep.
        """
        modules = dict(denoiser.named_modules())
        store: dict = {}
        current = {"batch": None}
        max_values = self.config.activations.search_values if self.config.activations else 0

        def hook_for(name):
            conv = isinstance(modules[name], torch.nn.Conv2d)

            def hook(module, args):
                x = args[0].detach()
                if sample_only:  # two rows spread over the batch, per chosen timestep
                    idx = torch.linspace(0, x.shape[0] - 1, min(OUTPUT_SEARCH_ROWS_PER_STEP, x.shape[0]))
                    rows = x[idx.round().long().unique()].clone()
                    store[name] = rows if name not in store else torch.cat([store[name], rows])
                    return
                b = current["batch"]
                if not bool(torch.isfinite(x).all()):
                    raise CalibrationError(f"NaN/Inf in the input of layer '{name}' at timestep {b.timestep:g} "
                                           f"(calibration step {b.step}); the model diverges under these settings")
                rows = _act_rows(x, conv).float()
                key = (name, group_of[b.step])
                cap = max(64, max_values // rows.shape[1])
                have = store.get(key)
                rows = rows if have is None else torch.cat([have, rows])
                if rows.shape[0] > cap:
                    idx = torch.randperm(rows.shape[0], device=rows.device)[:cap]
                    rows = rows[idx]
                store[key] = rows
            return hook

        handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            batches = data.batches(self.config.batch_size, device, limit=limit)
            if sample_only:  # the first batch of calibration steps spread over the trajectory
                n = len(data.steps)
                chosen = sorted({round(i * (n - 1) / max(OUTPUT_SEARCH_STEPS - 1, 1))
                                 for i in range(min(n, OUTPUT_SEARCH_STEPS))})
                batches = [next(data.batches(self.config.batch_size, device, steps=[k], limit=limit)) for k in chosen]
            elif progress is not None:
                batches = progress(batches, "ptq: activation statistics", None)
            with torch.no_grad(), timestep_routing(denoiser):
                for b in batches:
                    current["batch"] = b
                    call_denoiser(denoiser, b.kwargs)
        finally:
            for h in handles:
                h.remove()
        return store

    def _init_acts(self, denoiser, plans, data, device, limit, group_of, ctx) -> None:
        cfg = self.config.activations
        layers = {p.name: denoiser.get_submodule(p.name) for p in plans}
        quantizers = [q for lay in layers.values() for q in lay.act_quantizers()]
        for lay in layers.values():
            lay.quant_acts = False
        try:
            store = self._collect(denoiser, list(layers), data, device, limit, sample_only=False,
                                  group_of=group_of, progress=ctx.progress)
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
    def _init_act_quantizer(self, lay, q: ActQuantizer, rows: torch.Tensor, group: int, plan: LayerPlan) -> None:
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
            q.set_params(group, _fp_act_scale(fmt, bias))
            return
        if q.is_int:
            if cfg.init == "percentile":
                scale, zp = percentile_int_init(rows, q.fmt.bits, q.fmt.symmetric, axis=axis)
            else:
                scale, zp = int_scale_search(rows, q.fmt.bits, q.fmt.symmetric, axis=axis)
            q.set_params(group, scale, zp)
        else:
            q.set_params(group, _fp_act_scale(q.fmt, fp_bias_search(rows, q.fmt, axis=axis, n_steps=steps)))

    def _layer_summary(self, denoiser, plans) -> dict:
        layers = {}
        for p in plans:
            lay = denoiser.get_submodule(p.name)
            layers[p.name] = {
                "weights": [q.fmt.name for q in lay.weight_quantizers()] or "fp",
                "activations": [q.fmt.name for q in lay.act_quantizers()] or "fp",
                **({"split": lay.split} if lay.split else {}),
                **({"notes": p.notes} if p.notes else {}),
            }
        return {"quantized_layers": len(plans), "layers": layers}


def _fp_act_scale(fmt: FPFormat, bias: torch.Tensor) -> torch.Tensor:
    from diffsqueeze.quant.formats import bias_to_scale

    return bias_to_scale(fmt, bias)


def _swap(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    from diffsqueeze.pipelines.module_swaps import swap_module

    swap_module(root, name, new)


@register_finalizer
def prepare_pipeline(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """Attach timestep routing to a pipeline with timestep-aware quantizers (after a reload)."""
    for name, module in module_components(pipe).items():
        if any(isinstance(m, ActQuantizer) for m in module.modules()):
            attach_timestep_routing(module)
    return pipe


__all__ = ["PTQStage", "PTQConfig", "prepare_pipeline"]
