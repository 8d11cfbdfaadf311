"""Learned rounding (AdaRound) with block-wise reconstruction, and LSQ of activation scales.

docs/methods.md §4 (AdaRound, BRECQ, Q-Diffusion) and §5 (LSQ). The denoiser is split into
reconstruction units: modules whose class is in ``rounding.block_types`` (ResNet blocks,
transformer blocks) and every quantized layer outside them. Units are processed in execution
order; for each unit only its own data is held:

* inputs: captured from the *quantized* model (earlier units already hard-rounded), by a
  forward pre-hook that ends the forward pass once the unit's inputs are in hand;
* targets: the FP teacher's unit outputs on the same calibration inputs.

Loss: mean over the batch of the summed squared output error, plus
``lambda * sum(1 - |2 h(V) - 1|^beta)`` after the warmup (beta annealed 20 -> 2). By default
each calibration timestep's error is weighted by the inverse of the unit's round-to-nearest
error there (``rounding.balance_timesteps``; see ``adaround_unit``). At the end rounding is hardened
(``h = 1[V >= 0]``) and the on-grid weight is written into the layer, unless the hard rounding
did not lower the unit's calibration loss below round-to-nearest (``rounding.keep_better``).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.ptq.input_capture import CalibrationReplay
from diffsqueeze.pipelines.stage_helpers import (
    call_denoiser,
    detached,
    first_call_order,
    leading_batch_size,
    own_rows,
    take_rows,
    train_loop,
)
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.nn.routing import timestep_routing
from diffsqueeze.quant.primitives.rounding import rounding_regularizer

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def reconstruction_units(denoiser: torch.nn.Module, block_types: tuple[str, ...]) -> list[str]:
    """Blocks of ``block_types`` holding quantized layers, and quantized layers outside them."""
    units: list[str] = []
    for name, m in denoiser.named_modules():
        if not name or any(name.startswith(u + ".") for u in units):
            continue
        if type(m).__name__ in block_types and any(isinstance(c, QuantMixin) for c in m.modules()):
            units.append(name)
        elif isinstance(m, QuantMixin):
            units.append(name)
    return units


def beta_at(it: int, iters: int, cfg) -> tuple[float, bool]:
    """Beta of the regularizer at iteration ``it`` and whether the regularizer is on (§4)."""
    warm = int(cfg.warmup * iters)
    if it < warm:
        return cfg.beta_start, False
    frac = (it - warm) / max(iters - warm, 1)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * frac, True


def _tensors(out: Any) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if hasattr(out, "sample"):
        return [out.sample]
    return []


def output_loss(out_q: Any, out_fp: Any) -> torch.Tensor:
    """Mean over the batch of the sum over features of the squared error (BRECQ)."""
    qs, fs = _tensors(out_q), _tensors(out_fp)
    n = qs[0].shape[0]
    return sum(((q - f) ** 2).sum() for q, f in zip(qs, fs)) / n


def capture(denoiser: torch.nn.Module, unit: str, batches: list, want: str) -> list:
    """Per calibration batch: the unit's ``(args, kwargs)`` (``want="inputs"``) or its output."""
    module = denoiser.get_submodule(unit)
    got: list = []

    def pre(m, args, kwargs):
        got.append((detached(args), detached(kwargs)))
        raise _Stop

    def post(m, args, kwargs, out):
        got.append(detached(out))
        raise _Stop

    handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if want == "inputs"
              else module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    call_denoiser(denoiser, b.kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(got) != len(batches):
        raise RuntimeError(f"unit '{unit}' was not called on every calibration batch ({len(got)}/{len(batches)})")
    return got


def reconstruct(denoiser, teacher_pipe, comp: str, cfg, replay: CalibrationReplay, masks, ctx) -> dict:
    """Run AdaRound (if ``cfg.rounding.method == 'adaround'``) and LSQ unit by unit."""
    rcfg = cfg.rounding
    teacher = module_components(teacher_pipe)[comp]
    batches = list(replay.batches())
    units = reconstruction_units(denoiser, rcfg.block_types)
    lsq_iters = cfg.activations.lsq_iters if cfg.activations else 0
    report: dict = {"units": len(units), "iters": rcfg.iters if rcfg.method == "adaround" else 0,
                    "lsq_iters": lsq_iters, "losses": {}}
    gen = random.Random(ctx.seed)
    trainable = {p: p.requires_grad for p in denoiser.parameters()}
    denoiser.requires_grad_(False)  # only V (AdaRound) and the unit's scales (LSQ) get gradients
    try:
        return _reconstruct_units(denoiser, teacher, cfg, batches, units, lsq_iters, report, gen)
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def _reconstruct_units(denoiser, teacher, cfg, batches, units, lsq_iters, report, gen) -> dict:
    rcfg = cfg.rounding
    with timestep_routing(denoiser) as tctx:
        units = first_call_order(denoiser, units, batches[0].kwargs) if batches else units
        for ui, unit in enumerate(units):
            inputs = capture(denoiser, unit, batches, "inputs")
            targets = capture(teacher, unit, batches, "outputs")
            module = denoiser.get_submodule(unit)
            layers = [m for m in module.modules() if isinstance(m, QuantMixin)]
            entry = {}
            if rcfg.method == "adaround" and any(lay.quant_weights and lay.weight_quantizers() for lay in layers):
                entry["adaround"] = adaround_unit(module, layers, inputs, targets, batches, tctx, rcfg, gen,
                                              f"adaround {ui + 1}/{len(units)} {unit}")
            if lsq_iters and any(lay.quant_acts and lay.act_quantizers() for lay in layers):
                entry["lsq"] = _lsq(module, layers, inputs, targets, batches, tctx, cfg, gen,
                                    f"lsq {ui + 1}/{len(units)} {unit}")
            report["losses"][unit] = entry
            del inputs, targets
    return report


def _minibatch(inputs, targets, batches, i: int, size: int, gen: random.Random):
    """Captured batch ``i``, randomly subsampled to at most ``size`` samples."""
    args, kwargs = inputs[i]
    n = leading_batch_size(args, kwargs)
    if n <= size:
        return args, kwargs, targets[i]
    device = next(v.device for v in (*args, *kwargs.values()) if torch.is_tensor(v))
    idx = torch.tensor(sorted(gen.sample(range(n), size)), device=device)
    return take_rows(args, idx, n), take_rows(kwargs, idx, n), take_rows(targets[i], idx, n)


def _run(module, args, kwargs):
    return module(*args, **kwargs)


def loss_per_timestep(module, inputs, targets, batches, tctx) -> dict[float, float]:
    """The unit's mean reconstruction loss at each calibration timestep, over all captured batches."""
    sums: dict[float, float] = {}
    counts: dict[float, int] = {}
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(inputs):
            tctx.t = batches[i].timestep
            t = float(batches[i].timestep)
            sums[t] = sums.get(t, 0.0) + float(output_loss(_run(module, args, kwargs), targets[i]))
            counts[t] = counts.get(t, 0) + 1
    return {t: sums[t] / counts[t] for t in sums}


def timestep_weights(reference: dict[float, float], cap: float) -> dict[float, float]:
    """``w_t = mean(ref) / max(ref_t, mean(ref) / cap)``: each timestep counts by its relative error.

    With these weights the weighted reference loss still averages to ``mean(ref)``, so the
    regulariser's lambda keeps its meaning; a timestep whose reference loss is (near) zero gets
    at most ``cap`` times the even weight.
    """
    mean = sum(reference.values()) / max(len(reference), 1)
    if mean <= 0:
        return {t: 1.0 for t in reference}
    return {t: mean / max(v, mean / cap) for t, v in reference.items()}


def weighted_mean(losses: dict[float, float], weights: dict[float, float]) -> float:
    return sum(weights[t] * v for t, v in losses.items()) / max(len(losses), 1)


def adaround_unit(module, layers, inputs, targets, batches, tctx, rcfg, gen, desc) -> dict:
    """AdaRound of one unit; returns its losses and which rounding was kept.

    Why the timestep balance: one unit sees all calibration timesteps, and the plain sum of
    squared errors is dominated by the timesteps where the unit's outputs (and errors) are large.
    Measured on builtin:fashion with FP4 weights (``configs/w4a16_fp.yaml`` with both switches
    off; the manifest's ``per_timestep`` losses show it), the plain sum lets AdaRound lower the
    total by raising the error at the high-noise steps, which the sampler amplifies most
    (``down_blocks.0.resnets.0``: t=999 69.1 -> 78.2 while t=199 55.0 -> 50.4); in the release
    before this fix PSNR vs FP fell to 11.5 dB against 21.4 for round-to-nearest
    (docs/quantization.md, step 6). Weighting each timestep by the inverse of its
    round-to-nearest loss makes the objective the mean relative error, which cannot be bought
    that way.
    """
    parts = [(lay, q, sl) for lay in layers if lay.quant_weights for q, sl in lay.weight_parts()]
    act_state = [(lay, lay.quant_acts) for lay in layers]
    originals = {id(lay): lay.weight.detach().clone() for lay in layers
                 if lay.quant_weights and lay.weight_quantizers()}
    report: dict = {}
    try:
        for lay in layers:
            lay.quant_acts = False  # weights first (Q-Diffusion), activations afterwards
        rtn = loss_per_timestep(module, inputs, targets, batches, tctx)
        weights = timestep_weights(rtn, rcfg.balance_cap) if rcfg.balance_timesteps else {t: 1.0 for t in rtn}
        for lay, q, sl in parts:
            q.init_rounding(lay.weight[:, sl])
        report.update(_optimize_rounding(module, parts, inputs, targets, batches, tctx, rcfg, gen, desc, weights))
        with torch.no_grad():
            for lay in layers:
                if id(lay) not in originals:
                    continue
                lay.weight.copy_(_on_grid(lay, lay.weight, lambda q, w: q.finalize_rounding(w)))
        learned = loss_per_timestep(module, inputs, targets, batches, tctx)
        rtn_loss, learned_loss = weighted_mean(rtn, weights), weighted_mean(learned, weights)
        kept = "adaround"
        if rcfg.keep_better and learned_loss >= rtn_loss:
            kept = "nearest"  # the learned rounding did not help this unit: back to round-to-nearest
            with torch.no_grad():
                for lay in layers:
                    if id(lay) in originals:
                        lay.weight.copy_(_on_grid(lay, originals[id(lay)], lambda q, w: q.quantize_rtn(w)))
        report.update({"nearest_loss": rtn_loss, "learned_loss": learned_loss, "kept": kept,
                       "per_timestep": {f"{t:g}": {"nearest": rtn[t], "learned": learned[t]} for t in rtn}})
    finally:
        for lay, flag in act_state:
            lay.quant_acts = flag
        for _, q, _ in parts:
            q.alpha = None
    return report


def _on_grid(lay, w, rounding):
    """``rounding(quantizer, part)`` over the layer's weight parts (split layers have two)."""
    if lay.split:
        return torch.cat([rounding(q, w[:, sl]) for q, sl in lay.weight_parts()], dim=1)
    return rounding(lay.weight_parts()[0][0], w)


def _optimize_rounding(module, parts, inputs, targets, batches, tctx, rcfg, gen, desc, weights) -> dict:
    opt = torch.optim.Adam([q.alpha for _, q, _ in parts], lr=rcfg.lr)

    def step(it: int):
        i = gen.randrange(len(inputs))
        args, kwargs, target = _minibatch(inputs, targets, batches, i, rcfg.batch_size, gen)
        args, kwargs, (target,), share = own_rows(args, kwargs, target)
        tctx.t = batches[i].timestep
        rec = output_loss(_run(module, args, kwargs), target) * weights[float(batches[i].timestep)]
        beta, on = beta_at(it, rcfg.iters, rcfg)
        reg = sum(rounding_regularizer(q.alpha, beta) for _, q, _ in parts) if on else rec.new_zeros(())
        fields = {"rec": f"{float(rec.detach()):.4g}", "reg": f"{float(reg.detach()):.4g}", "beta": f"{beta:.1f}"}
        return (rec + rcfg.reg_weight * reg) * share, rec * share, fields

    first, last = train_loop(opt, rcfg.iters, step, desc)
    return {"first_rec_loss": first, "last_rec_loss": last}


def _lsq(module, layers, inputs, targets, batches, tctx, cfg, gen, desc) -> dict:
    acfg = cfg.activations
    quantizers = [q for lay in layers if lay.quant_acts for q in lay.act_quantizers()]
    for q in quantizers:
        q.lsq = True
        q.scale.requires_grad_(True)
    opt = torch.optim.Adam([q.scale for q in quantizers], lr=acfg.lsq_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=acfg.lsq_iters)

    def step(it: int):
        i = gen.randrange(len(inputs))
        args, kwargs, target = _minibatch(inputs, targets, batches, i, cfg.rounding.batch_size, gen)
        args, kwargs, (target,), share = own_rows(args, kwargs, target)
        tctx.t = batches[i].timestep
        loss = output_loss(_run(module, args, kwargs), target)
        return loss * share, loss * share, {"loss": f"{float(loss.detach()):.4g}"}

    @torch.no_grad()
    def clamp_scales():
        for q in quantizers:
            q.scale.clamp_(min=1e-8)

    try:
        first, last = train_loop(opt, acfg.lsq_iters, step, desc, scheduler=sched, after_step=clamp_scales)
    finally:
        for q in quantizers:
            q.lsq = False
            q.scale.requires_grad_(False)
    return {"first_loss": first, "last_loss": last}


__all__ = ["reconstruct", "reconstruction_units", "beta_at", "output_loss", "loss_per_timestep", "timestep_weights"]
