"""Per-input-channel smoothing of the ptq stage (SmoothQuant, as used by SVDQuant; docs/methods.md §10).

A layer ``y = x W^T`` becomes ``y = (x / s)(W * s)^T`` with
``s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha)``: channels whose activations have outliers are
divided down, their weight columns scaled up, so that both quantize with less error (the
low-rank branch then absorbs the weight's new outlier columns). ``s`` stays an explicit
per-channel scale on the layer's input (``QuantMixin.smooth``): diffusers' layers are mostly
fed by GroupNorm/SiLU/attention outputs, where folding it into the previous op would need a
per-architecture graph rewrite.

``alpha`` is fixed, or searched per layer among candidates by a proxy of the quantized output
error on calibration inputs: weights round-to-nearest per output channel in the layer's format
on its min-max (INT) or absmax (FP) range, without the stage's scale search; activations as the
recipe quantizes them (dynamic groups, or a min-max range per tensor / per channel). A layer for which no
candidate beats the unsmoothed layer on the proxy is left unsmoothed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffsqueeze.pipelines.stage_helpers import call_denoiser
from diffsqueeze.quant.primitives.formats import NumberFormat
from diffsqueeze.quant.ptq.tracing import act_rows

SCALE_RANGE = (1e-4, 1e4)
"""Smoothing scales are clamped here, so no channel is divided by ~0 or scaled to overflow."""


@torch.no_grad()
def channel_absmax(denoiser: nn.Module, names: list[str], batches) -> dict[str, Tensor]:
    """``max |x_j|`` of each named layer's input channels over the calibration batches."""
    modules = dict(denoiser.named_modules())
    out: dict[str, Tensor] = {}

    def hook_for(name: str):
        conv = isinstance(modules[name], nn.Conv2d)

        def hook(module, args):
            m = act_rows(args[0].detach(), conv).abs().amax(dim=0).float()
            out[name] = m if name not in out else torch.maximum(out[name], m)
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for b in batches:
            call_denoiser(denoiser, b.kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


def weight_column_absmax(weight: Tensor) -> Tensor:
    """``max |W_:,j|`` per input channel ``j`` (over outputs and kernel positions)."""
    return weight.detach().abs().transpose(0, 1).reshape(weight.shape[1], -1).amax(dim=1).float()


def smoothing_scale(act_max: Tensor, w_max: Tensor, alpha: float) -> Tensor:
    """``s_j = act_max_j^alpha / w_max_j^(1-alpha)``; 1 where either is 0, clamped to :data:`SCALE_RANGE`."""
    ok = (act_max > 0) & (w_max > 0)
    s = act_max.clamp(min=1e-12).pow(alpha) / w_max.clamp(min=1e-12).pow(1.0 - alpha)
    return torch.where(ok, s, torch.ones_like(s)).clamp(*SCALE_RANGE)


def _minmax_fake(x: Tensor, fmt: NumberFormat, dims: tuple[int, ...] | None) -> Tensor:
    """Fake-quantize ``x`` on a min-max (INT) / absmax (FP) range reduced over ``dims`` (all if None)."""
    lo = x.amin() if dims is None else x.amin(dim=dims, keepdim=True)
    hi = x.amax() if dims is None else x.amax(dim=dims, keepdim=True)
    return fmt.minmax_fake_quantize(x, lo, hi)


def proxy_output_error(layer: nn.Module, x: Tensor, s: Tensor, weight_fmt: NumberFormat,
                       act_fmt: NumberFormat, granularity: str, group_size: int) -> float:
    """Squared output error of the smoothed layer under the proxy quantization (module docstring)."""
    conv = isinstance(layer, nn.Conv2d)
    w = layer.weight.detach().float()
    cdim = 1 if conv else -1
    shape = (1, -1, 1, 1) if conv else (-1,)
    ws = w * s.reshape(1, -1, *([1] * (w.dim() - 2)))
    wq = _minmax_fake(ws.reshape(ws.shape[0], -1), weight_fmt, (1,)).reshape(w.shape)
    xs = x.float() / s.reshape(shape)
    if granularity == "group":
        xq = act_fmt.dynamic_fake_quantize(xs, group_size, cdim)
    else:
        other = tuple(d for d in range(xs.dim()) if d != cdim % xs.dim())
        xq = _minmax_fake(xs, act_fmt, other if granularity == "channel" else None)
    bias = None if layer.bias is None else layer.bias.detach().float()
    if conv:
        ref = layer._conv_forward(x.float(), w, bias)
        got = layer._conv_forward(xq, wq, bias)
    else:
        ref, got = F.linear(x.float(), w, bias), F.linear(xq, wq, bias)
    return float((got - ref).pow(2).sum())


def choose_scale(layer: nn.Module, act_max: Tensor, x: Tensor | None, alpha: float | None,
                 candidates: tuple[float, ...], weight_fmt: NumberFormat, act_fmt: NumberFormat,
                 granularity: str, group_size: int) -> tuple[Tensor | None, float | None]:
    """The smoothing scale of ``layer`` and its alpha; ``(None, None)``: leave it unsmoothed."""
    w_max = weight_column_absmax(layer.weight).to(act_max.device)
    if not candidates:
        return smoothing_scale(act_max, w_max, alpha), alpha
    if x is None:
        return None, None

    def err(s: Tensor) -> float:
        return proxy_output_error(layer, x, s, weight_fmt, act_fmt, granularity, group_size)

    best_alpha, best = None, err(torch.ones_like(act_max))
    for a in candidates:
        e = err(smoothing_scale(act_max, w_max, a))
        if e < best:
            best_alpha, best = a, e
    if best_alpha is None:
        return None, None
    return smoothing_scale(act_max, w_max, best_alpha), best_alpha


__all__ = ["channel_absmax", "choose_scale", "proxy_output_error", "smoothing_scale", "weight_column_absmax"]
