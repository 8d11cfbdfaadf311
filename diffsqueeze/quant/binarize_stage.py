"""The ``binarize`` stage: BinaryDM multi-basis binarization, W1A4 by default (METHODS.md §7).

Steps (each explicit):

1. calibration data from the FP teacher (:mod:`diffsqueeze.pipelines.calibration`): training
   inputs in the data-free mode, and one recorded call to find the structure and count OPs;
2. the denoiser's *blocks* (children named ``*block*``: every entry of ``down_blocks``,
   ``up_blocks``, ``transformer_blocks``, ... and ``mid_block``) in execution order, grouped by
   their distance from the middle of that sequence: group 0 is the innermost (the UNet mid block),
   the last group the outermost (first down and last up block; first and last transformer block);
3. the layer policy: Linear/Conv2d layers outside every block (first conv, last conv,
   time-embedding MLP, patch embedding, context/pooled-text projections, output projection) and
   those matching ``keep_fp`` (``*norm*``: norms and the AdaLN modulations computed inside
   them) stay FP; the layers of the ``order2_groups`` outermost groups (and ``order2`` globs)
   get order 2, the rest ``order``;
4. swaps to :class:`~diffsqueeze.quant.binary_modules.BinaryConv2d` / ``BinaryLinear``, LMB scales
   initialized from the weights, LSQ input quantizers and attention q/k/probs/v quantizers;
5. LRM projections fitted once on the teacher's block outputs;
6. training (AdamW, cosine): progressive initialization switches binarization on group by group,
   innermost first, over the first ``progressive_fraction`` of the iterations; activation
   quantizers get their LSQ initialization ``s = 2 mean|x| / sqrt(Qp)`` (from one batch of every
   calibration timestep) and switch on after that. Distillation batches mix the timesteps.
   Loss: distillation (MSE to the teacher's output on calibration inputs, data-free) or the
   diffusion loss on a dataset, plus ``lrm.weight * L_LRM``;
7. records for reload, pruning masks re-enforced, accounting (packed size, OPs) in the summary.
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import find_roles, module_components
from diffsqueeze.pipelines.calibration import CalibrationData, collect_calibration
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.module_swaps import swap_module
from diffsqueeze.pipelines.stage import register_stage
from diffsqueeze.prune.masks import enforce_masks, masked_gradients
from diffsqueeze.quant.accounting import activation_bits_summary, fp32_bytes, ops_count, write_packed
from diffsqueeze.quant.binary_modules import (
    AttentionActQuant,
    BinaryMixin,
    act_quantizers_of,
    install_attention_quant,
    make_binary_module,
)
from diffsqueeze.quant.formats import int_code_range
from diffsqueeze.quant.lrm import LowRankMimicking, capture_outputs
from diffsqueeze.quant.modules import act_param_shape
from diffsqueeze.quant.quantizers import ActQuantizer

log = logging.getLogger(__name__)
DATASETS = ("fashion-mnist",)
PACKED_DIR = "packed"


@dataclass(frozen=True)
class BinaryActConfig:
    """Activation quantization of the binarized layers (LSQ, signed, METHODS §7).

    Attributes:
        bits: input bits of every binarized layer (4 for W1A4).
        granularity: ``tensor`` (BinaryDM's LSQ) or ``channel``.
        attention: also quantize attention q, k, softmax probabilities and v (inside blocks).
        prob_bits: bits of the (unsigned) probability quantizer; 0 = ``bits``.
    """

    bits: int = 4
    granularity: Literal["tensor", "channel"] = "tensor"
    attention: bool = True
    prob_bits: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise RecipeError("bits", f"activation bits must be in 2..8, got {self.bits} (null activations = FP)")
        if self.prob_bits and not 2 <= self.prob_bits <= 8:
            raise RecipeError("prob_bits", f"0 (= bits) or 2..8, got {self.prob_bits}")


@dataclass(frozen=True)
class LRMConfig:
    """Low-rank representation mimicking.

    Attributes:
        weight: loss weight (BinaryDM: 1e-4); 0 switches LRM off.
        rank_divisor: projection rank ``r = d // rank_divisor`` (4).
        fit_batches: calibration batches of teacher features the PCA is computed from.
    """

    weight: float = 1e-4
    rank_divisor: int = 4
    fit_batches: int = 1

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise RecipeError("weight", f"must be >= 0, got {self.weight}")
        if self.rank_divisor < 1 or self.fit_batches < 1:
            raise RecipeError("rank_divisor", "rank_divisor and fit_batches must be >= 1")


@dataclass(frozen=True)
class BinaryTrainConfig:
    """Training of the binarized denoiser.

    Attributes:
        mode: ``distill`` (data-free: MSE to the FP teacher's output on the calibration inputs) or
            ``dataset`` (the diffusion loss on ``dataset``; UNet text-to-image pipelines).
        dataset: dataset of the ``dataset`` mode; known: ``fashion-mnist``.
        iters: optimizer steps (BinaryDM trains 150k-300k; 0 = binarize without training).
        batch_size: samples per step.
        lr: AdamW learning rate of the weights (BinaryDM: 2e-5).
        scale_lr: learning rate of ``a1``/``a2`` and activation scales; 0 = ``lr``.
        weight_decay: AdamW weight decay of the weights.
        schedule: ``cosine`` or ``constant``.
        grad_clip: gradient-norm clipping (0 = off).
        cfg_dropout: ``dataset`` mode: fraction of empty prompts (classifier-free guidance).
        shuffle: ``distill`` mode: every batch mixes calibration timesteps, reshuffled each
            epoch (False: stream the recording in sampling order, one timestep at a time).
    """

    mode: Literal["distill", "dataset"] = "distill"
    dataset: str = "fashion-mnist"
    iters: int = 1000
    batch_size: int = 8
    lr: float = 2e-5
    scale_lr: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise RecipeError("iters", f"must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise RecipeError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.scale_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise RecipeError("lr", "lr must be > 0; scale_lr, weight_decay and grad_clip >= 0")
        if self.mode == "dataset" and self.dataset not in DATASETS:
            raise RecipeError("dataset", f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise RecipeError("cfg_dropout", f"must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True)
class BinarizeConfig:
    """Config of the ``binarize`` stage (METHODS §7).

    Attributes:
        component: the component to binarize (``denoiser`` or a component name).
        order: order of the binarized layers outside the order-2 groups (1).
        order2_groups: how many outermost block groups get order 2 (1: the first down and last
            up block, the high-resolution ones; 0: none, the order-1 baseline).
        order2: globs of further layers that get order 2.
        include / exclude: globs on layer names inside the component.
        keep_fp: globs of layers that stay FP (default: norms and AdaLN modulations).
        keep_stem_fp: keep every layer outside the blocks FP (first/last conv, time embedding, ...).
        learn_scales: learn ``a1``/``a2`` (False: fixed at their initialization).
        progressive: progressive initialization (False: everything binarized from step 0).
        progressive_fraction: fraction of the iterations over which groups switch on.
        activations: activation quantization, or null for FP activations (W1A32).
        lrm: low-rank representation mimicking.
        train: training.
    """

    component: str = "denoiser"
    order: int = 1
    order2_groups: int = 1
    order2: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = ("*norm*",)
    keep_stem_fp: bool = True
    learn_scales: bool = True
    progressive: bool = True
    progressive_fraction: float = 0.3
    activations: Optional[BinaryActConfig] = field(default_factory=BinaryActConfig)
    lrm: LRMConfig = field(default_factory=LRMConfig)
    train: BinaryTrainConfig = field(default_factory=BinaryTrainConfig)

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise RecipeError("order", f"1 or 2, got {self.order}")
        if self.order2_groups < 0:
            raise RecipeError("order2_groups", f"must be >= 0, got {self.order2_groups}")
        if not 0.0 <= self.progressive_fraction < 1.0:
            raise RecipeError("progressive_fraction", f"must be in [0, 1), got {self.progressive_fraction}")


# ---- structure --------------------------------------------------------------------------------


def block_candidates(root: nn.Module) -> list[str]:
    """Children named ``*block*``: each entry of a ModuleList (``down_blocks.0``) or the module itself."""
    out = []
    for name, child in root.named_children():
        if "block" not in name.lower():
            continue
        if isinstance(child, nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(child))]
        else:
            out.append(name)
    return out


def call_denoiser(denoiser: nn.Module, kwargs: dict) -> torch.Tensor:
    out = denoiser(**{**kwargs, "return_dict": False})
    return out[0] if isinstance(out, (tuple, list)) else out


def block_groups(denoiser: nn.Module, kwargs: dict) -> tuple[list[str], list[list[str]]]:
    """Blocks in execution order and their groups, innermost (distance 0 from the middle) first."""
    names = block_candidates(denoiser)
    order: list[str] = []
    handles = [denoiser.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad():
            call_denoiser(denoiser, kwargs)
    finally:
        for h in handles:
            h.remove()
    mid = (len(order) - 1) / 2
    dists = sorted({abs(i - mid) for i in range(len(order))})
    groups = [[n for i, n in enumerate(order) if abs(i - mid) == d] for d in dists]
    return order, groups


def progressive_schedule(iters: int, fraction: float, n_groups: int) -> tuple[int, dict[int, int]]:
    """Progressive initialization: ``P = int(fraction * iters)`` steps; group ``g`` (0 = innermost)
    is binarized from step ``g * P // G``; activation quantizers switch on at step ``P``."""
    steps = int(fraction * iters)
    return steps, {g: (g * steps) // max(n_groups, 1) for g in range(n_groups)}


@dataclass
class LayerPlan:
    name: str
    order: int | None  # None: kept FP
    group: int  # progressive-init group (innermost 0); -1 for FP
    why: str = ""


def _match(name: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def plan_layers(denoiser: nn.Module, blocks: list[str], groups: list[list[str]], cfg: BinarizeConfig) -> list[LayerPlan]:
    """Which Linear/Conv2d layers are binarized, with which order and progressive group."""
    group_of_block = {b: gi for gi, g in enumerate(groups) for b in g}
    n_groups = len(groups)
    plans = []
    for name, m in denoiser.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, BinaryMixin):
            continue
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if not _match(name, cfg.include) or _match(name, cfg.exclude):
            continue
        if _match(name, cfg.keep_fp):
            plans.append(LayerPlan(name, None, -1, "keep_fp"))
            continue
        if block is None and cfg.keep_stem_fp:
            plans.append(LayerPlan(name, None, -1, "outside the blocks (stem)"))
            continue
        group = group_of_block[block] if block is not None else n_groups - 1
        outer = n_groups > 0 and group >= n_groups - cfg.order2_groups
        order = 2 if outer or _match(name, cfg.order2) else cfg.order
        plans.append(LayerPlan(name, order, group))
    return plans


# ---- the stage ------------------------------------------------------------------------------


@register_stage("binarize", BinarizeConfig)
class BinarizeStage:
    """BinaryDM: learnable multi-basis binarization, LRM and progressive initialization."""

    def __init__(self, config: BinarizeConfig):
        self.config = config

    def _component(self, pipe: DiffusionPipeline) -> str:
        comps = module_components(pipe)
        name = find_roles(pipe).denoiser if self.config.component == "denoiser" else self.config.component
        if name not in comps:
            raise RecipeError("component", f"no component '{self.config.component}' in {type(pipe).__name__}; "
                              f"its components: {', '.join(comps)} (or 'denoiser')")
        return name

    def check(self, pipe: DiffusionPipeline) -> None:
        cfg = self.config
        comp = self._component(pipe)
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
            self._check_dataset(pipe, root)

    def _check_dataset(self, pipe: DiffusionPipeline, root: nn.Module) -> None:
        sched = pipe.scheduler
        if not (hasattr(sched, "add_noise") and hasattr(sched, "alphas_cumprod")):
            raise RecipeError("train.mode", f"the dataset mode needs a DDPM-type scheduler (add_noise, "
                              f"alphas_cumprod); {type(sched).__name__} has none: use mode: distill")
        if "sample" not in inspect.signature(root.forward).parameters or not hasattr(pipe, "encode_prompt"):
            raise RecipeError("train.mode", f"the dataset mode supports UNet text-to-image pipelines "
                              f"(encode_prompt, denoiser(sample, timestep, encoder_hidden_states)); "
                              f"{type(pipe).__name__} is not one: use mode: distill")
        from diffsqueeze.models.fashion.data import FashionMNISTMissingError, load_fashion_mnist

        try:
            load_fashion_mnist("train")
        except FashionMNISTMissingError as exc:
            raise RecipeError("train.dataset", str(exc)) from None

    # ------------------------------------------------------------------------------------

    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        comp = self._component(pipe)
        denoiser = module_components(pipe)[comp]
        teacher = module_components(ctx.teacher())[comp]
        device = next(denoiser.parameters()).device
        data = collect_calibration(ctx)
        first = next(data.batches(cfg.train.batch_size, device))
        blocks, groups = block_groups(denoiser, first.kwargs)
        plans = plan_layers(denoiser, blocks, groups, cfg)
        binary = self._swap(denoiser, comp, plans, ctx)
        attention = self._attention(denoiser, comp, blocks, ctx) if cfg.activations and cfg.activations.attention else {}
        for q in act_quantizers_of(denoiser):
            q.enabled = False
        lrm = None
        if cfg.lrm.weight > 0 and cfg.train.iters:
            lrm = LowRankMimicking(blocks, cfg.lrm.rank_divisor)
            self._fit_lrm(lrm, teacher, data, device, blocks)
        training = self._train(pipe, denoiser, teacher, binary, groups, lrm, data, device, ctx)
        # whatever training did, the result is fully binarized with activations on
        for m in binary.values():
            m.weight_quant.enabled = True
        if cfg.activations is not None and not training.get("activations_initialized"):
            self._init_act_scales(denoiser, act_init_batches(data, cfg.train.batch_size, device))
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

    def _swap(self, denoiser: nn.Module, comp: str, plans: list[LayerPlan], ctx: StageContext) -> dict[str, BinaryMixin]:
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
            ctx.state.modules[f"{comp}/{plan.name}"] = {"kind": type(new).__name__, **record}
            out[plan.name] = new
        return out

    def _attention(self, denoiser: nn.Module, comp: str, blocks: list[str], ctx: StageContext) -> dict:
        acts = self.config.activations
        out = {}
        for name, m in denoiser.named_modules():
            if not (hasattr(m, "set_processor") and hasattr(m, "processor")):
                continue
            if not any(name.startswith(b + ".") for b in blocks):
                continue
            prob_bits = acts.prob_bits or acts.bits
            out[name] = install_attention_quant(m, acts.bits, prob_bits)
            ctx.state.modules[f"{comp}/{name}"] = {"kind": "BinaryDMAttention", "bits": acts.bits, "prob_bits": prob_bits}
        return out

    # ---- LRM and activation init ---------------------------------------------------------------

    @torch.no_grad()
    def _fit_lrm(self, lrm: LowRankMimicking, teacher: nn.Module, data: CalibrationData, device, blocks) -> None:
        feats: dict[str, list[torch.Tensor]] = {}
        batches = data.batches(self.config.train.batch_size, device)
        for _, b in zip(range(self.config.lrm.fit_batches), batches):
            with capture_outputs(teacher, blocks) as store:
                call_denoiser(teacher, b.kwargs)
            for k, v in store.items():
                feats.setdefault(k, []).append(v.detach())
        lrm.fit({k: torch.cat(v) for k, v in feats.items()})

    @torch.no_grad()
    def _init_act_scales(self, denoiser: nn.Module, batches: list) -> None:
        """LSQ init ``s = 2 mean|x| / sqrt(Qp)`` from the inputs each quantizer sees (quantizers off).

        Attention quantizers are set to observe, so the quantized SDPA runs and their hooks fire
        although they are disabled (the processor otherwise bypasses them).
        """
        quantizers = act_quantizers_of(denoiser)
        attn = [m for m in denoiser.modules() if isinstance(m, AttentionActQuant)]
        sums: dict[int, list] = {}
        handles = []

        def hook_for(q: ActQuantizer):
            def hook(module, args):
                x = args[0].detach().abs().float()
                if q.param_shape == (1,):
                    v = x.mean().reshape(1)
                elif len(q.param_shape) == 4:
                    v = x.mean(dim=tuple(i for i in range(x.dim()) if i != 1))
                else:
                    v = x.reshape(-1, x.shape[-1]).mean(0)
                acc = sums.setdefault(id(q), [0, 0.0])
                acc[0] += 1
                acc[1] = acc[1] + v
            return hook

        states = [(q, q.enabled) for q in quantizers]
        try:
            for m in attn:
                m.observe = True
            for q in quantizers:
                q.enabled = False
                handles.append(q.register_forward_pre_hook(hook_for(q)))
            for b in batches:
                call_denoiser(denoiser, b.kwargs)
        finally:
            for h in handles:
                h.remove()
            for m in attn:
                m.observe = False
            for q, e in states:
                q.enabled = e
        missing = sum(1 for q in quantizers if id(q) not in sums)
        if missing:  # layers the denoiser never calls on these inputs: their scale stays 1
            log.warning("%d of %d activation quantizers saw no input during LSQ initialization", missing, len(quantizers))
        for q in quantizers:
            if id(q) not in sums:
                continue
            n, total = sums[id(q)]
            _, qp = int_code_range(q.fmt.bits, q.fmt.symmetric)
            scale = (2.0 * (total / n) / math.sqrt(qp)).clamp(min=1e-8)
            q.set_params(0, scale.reshape(q.param_shape))

    # ---- training ----------------------------------------------------------------------------

    def _train(self, pipe, denoiser, teacher, binary, groups, lrm, data, device, ctx) -> dict:
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
        batches = self._batches(pipe, denoiser, data, device, ctx)
        need_teacher = tc.mode == "distill" or lrm is not None
        log_main, log_lrm = [], []
        acts_initialized = False
        denoiser.eval()
        try:
            with masked_gradients(pipe, ctx.state.masks):
                for it in ctx.progress(range(tc.iters), desc="binarize: training", total=tc.iters):
                    for g, at in switch_on.items():
                        if it == at:
                            for m in layers_of_group[g]:
                                m.weight_quant.enabled = True
                    kwargs, target = next(batches)
                    if acts_on_at is not None and it == acts_on_at:
                        self._init_act_scales(denoiser, act_init_batches(data, tc.batch_size, device))
                        for q in act_quantizers_of(denoiser):
                            q.enabled = True
                        acts_initialized = True
                    t_store: dict = {}
                    if need_teacher:
                        with torch.no_grad(), capture_outputs(teacher, lrm.blocks if lrm else []) as t_store:
                            t_out = call_denoiser(teacher, kwargs)
                        t_store = dict(t_store)
                    with capture_outputs(denoiser, lrm.blocks if lrm else []) as s_store:
                        s_out = call_denoiser(denoiser, kwargs)
                        goal = t_out if tc.mode == "distill" else target
                        main = F.mse_loss(s_out.float(), goal.float())
                        loss = main
                        if lrm is not None:
                            l_lrm = lrm.loss(s_store, t_store)
                            loss = loss + cfg.lrm.weight * l_lrm
                            log_lrm.append(float(l_lrm.detach()))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if tc.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        for q in act_quantizers_of(denoiser):
                            q.scale.clamp_(min=1e-8)
                    if ctx.state.masks:
                        enforce_masks(pipe, ctx.state.masks)
                    log_main.append(float(main.detach()))
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

    def _accounting(self, denoiser, teacher, first, comp: str, ctx: StageContext) -> dict:
        one = _first_sample(first.kwargs)
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


def _first_sample(obj):
    """Batch-1 slice of recorded kwargs (tensors with a batch dim, nested dicts such as added_cond_kwargs)."""
    if torch.is_tensor(obj):
        return obj[:1] if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _first_sample(v) for k, v in obj.items()}
    return obj


def act_init_batches(data: CalibrationData, batch_size: int, device) -> list:
    """One batch from every calibration timestep, so that a per-tensor LSQ scale is initialized
    on the whole trajectory's activation range, not on whichever timestep is current."""
    return [next(data.batches(batch_size, device, steps=[k])) for k in range(len(data.steps))]


def dataset_batches(pipe, denoiser, tc: BinaryTrainConfig, device, seed: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """Diffusion-loss batches from Fashion-MNIST: noisy inputs ``x_t`` and the scheduler's target.

    Images are padded to 32x32 in [-1, 1]; with a VAE they are repeated to 3 channels, resized
    to the VAE's sample size and encoded (latents scaled by ``scaling_factor``, shifted by
    ``shift_factor``). Captions come from the class names; ``cfg_dropout`` of them are empty.
    """
    from diffsqueeze.models.fashion.data import caption, load_fashion_mnist, pad_to_32

    import random

    images, labels = load_fashion_mnist("train")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    sched = pipe.scheduler
    n_train = sched.config.num_train_timesteps
    vae = getattr(pipe, "vae", None)
    in_ch = denoiser.config.in_channels if hasattr(denoiser, "config") else 1
    while True:
        idx = torch.randint(0, len(images), (tc.batch_size,), generator=gen)
        x = torch.from_numpy(pad_to_32(images[idx.numpy()])).float().div(127.5).sub(1.0).unsqueeze(1)
        x = x.to(device)
        with torch.no_grad():
            if vae is not None:
                size = vae.config.sample_size
                x = x.repeat(1, 3, 1, 1)
                if x.shape[-1] != size:
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
                lat = vae.encode(x).latent_dist.sample(gen if device.type == "cpu" else None)
                shift = getattr(vae.config, "shift_factor", None) or 0.0
                x0 = (lat - shift) * vae.config.scaling_factor
            else:
                x0 = x.repeat(1, in_ch, 1, 1) if in_ch != 1 else x
            prompts = [("" if rng.random() < tc.cfg_dropout else caption(int(labels[i]), rng)) for i in idx]
            emb = pipe.encode_prompt(prompts, device, 1, False)[0]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, n_train, (tc.batch_size,), generator=gen).to(device)
        xt = sched.add_noise(x0, noise, t)
        kind = sched.config.get("prediction_type", "epsilon")
        target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
        yield {"sample": xt, "timestep": t, "encoder_hidden_states": emb.to(xt.dtype)}, target
