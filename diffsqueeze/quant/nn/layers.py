"""Quantized module swaps: ``nn.Linear -> QuantLinear``, ``nn.Conv2d -> QuantConv2d``.

Both subclass the layer they replace and keep its ``weight``/``bias`` parameters under the
same names, so pruning masks (keyed by parameter name) and ``state_dict`` keys still match;
their quantizers' state is parameters/buffers, so ``state_dict`` round-trips. Each swap is
recorded in ``CompressionState.modules`` as ``{"kind": "QuantLinear", ...}`` (the layer's ``KIND``) and rebuilt by
:data:`diffsqueeze.quant.nn.swaps.LAYER_KINDS` before weights are loaded (checkpoints, resume, reload).

Shortcut splitting (docs/methods.md §5, Q-Diffusion): a layer whose input is the channel concatenation
``[deep, skip]`` can quantize the two input-channel ranges with separate activation and weight
quantizers (``split`` = number of leading channels).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffsqueeze.quant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.nn.recompute import note_quantized_weight

__all__ = ["QuantLinear", "QuantConv2d", "QuantMixin", "QUANT_SWAPS", "quant_layer_types", "make_quant_module",
           "from_float", "rebuild_quant"]


def act_param_shape(layer: nn.Module, per_channel: bool) -> tuple[int, ...]:
    """Scale shape of the input quantizer: per tensor, per last dim (tokens), per conv channel."""
    if not per_channel:
        return (1,)
    if isinstance(layer, nn.Conv2d):
        return (1, layer.in_channels, 1, 1)
    return (layer.in_features,)


class QuantMixin:
    """Shared quantized-layer logic: input quantizer(s), weight quantizer(s), switches.

    Attributes:
        config: the JSON-able record of the swap (also the rebuild recipe).
        quant_weights / quant_acts: runtime switches (stages turn them off while calibrating).
    """

    config: dict[str, Any]

    def _setup_quant(self, config: dict[str, Any]) -> None:
        self.config = dict(config)
        split = int(config.get("split") or 0)
        self.split = split
        w = self.weight
        wfmt = config.get("weight_format")
        gs = int(config.get("group_size") or 0)
        if wfmt:
            if split:
                self.weight_quant = WeightQuantizer(wfmt, (w.shape[0], split, *w.shape[2:]), gs)
                self.weight_quant_2 = WeightQuantizer(config.get("weight_format_2") or wfmt,
                                                      (w.shape[0], w.shape[1] - split, *w.shape[2:]), gs)
            else:
                self.weight_quant = WeightQuantizer(wfmt, tuple(w.shape), gs)
        act = config.get("act")
        if act:
            shape = tuple(act["shape"])
            groups, n_t = int(act.get("groups", 1)), int(act.get("n_timesteps", 1))
            dyn = {"dynamic_group": int(act.get("group_size") or 0), "channel_dim": self._channel_dim()}
            if split:
                s1 = self._split_shape(shape, split)
                s2 = self._split_shape(shape, self._in_dim() - split)
                self.act_quant = ActQuantizer(act["format"], s1, groups, n_t, **dyn)
                self.act_quant_2 = ActQuantizer(act.get("format_2") or act["format"], s2, groups, n_t, **dyn)
            else:
                self.act_quant = ActQuantizer(act["format"], shape, groups, n_t, **dyn)
        self.quant_weights = bool(wfmt)
        self.quant_acts = bool(act)
        if config.get("smooth"):  # filled by set_smoothing (a new swap) or load_state_dict (a rebuild)
            self.register_buffer("smooth", torch.ones(self._in_dim(), device=w.device, dtype=w.dtype))
        self.lowrank_rank = int(config.get("lowrank") or 0)
        if self.lowrank_rank:  # filled by init_lowrank (a new swap) or load_state_dict (a rebuild)
            rows, r = w.shape[0], self.lowrank_rank
            self.lowrank_down = nn.Parameter(torch.zeros(r, w[0].numel(), device=w.device, dtype=w.dtype),
                                             requires_grad=False)
            self.lowrank_up = nn.Parameter(torch.zeros(rows, r, device=w.device, dtype=w.dtype), requires_grad=False)

    @torch.no_grad()
    def set_smoothing(self, scale: Tensor) -> None:
        """Move per-input-channel difficulty from the activations into the weight (SmoothQuant,
        docs/methods.md §10): the layer now computes ``(x / s) @ (W * s)``, equal in float; the weight
        (and so the low-rank branch and the residual) is the smoothed one."""
        s = scale.detach().to(self.smooth)
        self.smooth.copy_(s)
        self.weight.mul_(s.reshape(1, -1, *([1] * (self.weight.dim() - 2))))

    def smoothed_input(self, x: Tensor) -> Tensor:
        """``x / s`` along the input channels (``x`` itself without smoothing)."""
        s = getattr(self, "smooth", None)
        if s is None:
            return x
        return x / (s.reshape(-1, 1, 1) if isinstance(self, nn.Conv2d) else s).to(x.dtype)

    @torch.no_grad()
    def init_lowrank(self) -> None:
        """Split the weight into its top-``r`` singular directions (the 16-bit branch
        ``up @ down``, docs/methods.md §10) and the residual, which stays in ``weight`` and is quantized.

        The factors are rounded to float16 values (what export stores), and the residual is
        computed from the rounded factors, so branch + residual equals the original weight to
        float32 rounding.
        """
        w = self.weight
        w2 = w.reshape(w.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(w2, full_matrices=False)
        r = self.lowrank_rank
        up = (u[:, :r] * s[:r]).to(torch.float16)
        down = vh[:r].to(torch.float16)
        self.lowrank_up.copy_(up.to(w.dtype))
        self.lowrank_down.copy_(down.to(w.dtype))
        w.copy_((w2 - up.double() @ down.double()).reshape(w.shape).to(w.dtype))

    def lowrank_output(self, x: Tensor) -> Tensor | None:
        """The low-rank branch on the (unquantized) input, or ``None`` without one."""
        if not self.lowrank_rank:
            return None
        x = self.smoothed_input(x)
        if isinstance(self, nn.Conv2d):  # a conv of rank r (the layer's geometry), then a 1x1 conv
            down = self.lowrank_down.reshape(self.lowrank_rank, self.in_channels, *self.kernel_size)
            return F.conv2d(self._conv_forward(x, down, None), self.lowrank_up[:, :, None, None])
        return F.linear(F.linear(x, self.lowrank_down), self.lowrank_up)

    def _in_dim(self) -> int:
        return self.in_channels if isinstance(self, nn.Conv2d) else self.in_features

    def _split_shape(self, shape: tuple[int, ...], n: int) -> tuple[int, ...]:
        if shape == (1,):
            return shape
        return (1, n, 1, 1) if len(shape) == 4 else (n,)

    def _channel_dim(self) -> int:
        return 1 if isinstance(self, nn.Conv2d) else -1

    def quantized_weight(self) -> Tensor:
        """The weight as the forward uses it (fake-quantized if weights are quantized)."""
        w = self.weight
        if not (self.quant_weights and hasattr(self, "weight_quant")):
            return w
        if self.split:
            q = torch.cat([self.weight_quant(w[:, : self.split]), self.weight_quant_2(w[:, self.split:])], dim=1)
        else:
            q = self.weight_quant(w)
        note_quantized_weight(self, q)  # training can recompute it in the backward instead of saving it
        return q

    def quantized_input(self, x: Tensor) -> Tensor:
        """The input as the forward uses it (smoothed; fake-quantized if activations are quantized)."""
        x = self.smoothed_input(x)
        if not (self.quant_acts and hasattr(self, "act_quant")):
            return x
        if self.split:
            d = self._channel_dim()
            a, b = x.split([self.split, x.shape[d] - self.split], dim=d)
            return torch.cat([self.act_quant(a), self.act_quant_2(b)], dim=d)
        return self.act_quant(x)

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [q for q in (getattr(self, "weight_quant", None), getattr(self, "weight_quant_2", None)) if q is not None]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (getattr(self, "act_quant", None), getattr(self, "act_quant_2", None)) if q is not None]

    def weight_parts(self) -> list[tuple[WeightQuantizer, slice]]:
        """(quantizer, input-channel slice of the weight) pairs."""
        if self.split:
            return [(self.weight_quant, slice(0, self.split)), (self.weight_quant_2, slice(self.split, None))]
        return [(q, slice(None)) for q in self.weight_quantizers()]


class QuantLinear(QuantMixin, nn.Linear):
    """``nn.Linear`` with a weight quantizer and an input (activation) quantizer."""

    KIND = "QuantLinear"  # the module record's kind: part of the saved format, never renamed

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)
        branch = self.lowrank_output(x)
        return y if branch is None else y + branch


class QuantConv2d(QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with a weight quantizer and an input (activation) quantizer."""

    KIND = "QuantConv2d"  # the module record's kind: part of the saved format, never renamed

    def forward(self, x: Tensor) -> Tensor:
        y = self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)
        branch = self.lowrank_output(x)
        return y if branch is None else y + branch


QUANT_SWAPS: dict[type, type] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
"""Float layer type -> its quantized swap (checked with isinstance, in this order)."""


def quant_layer_types() -> tuple[type, ...]:
    """Float layer types that have a quantized swap."""
    return (nn.Linear, nn.Conv2d)


def from_float(table: dict[type, type], layer: nn.Module, config: dict[str, Any], what: str) -> nn.Module:
    """Build the swap of ``layer`` given by ``table``, sharing its weight and bias parameters.

    The new module takes over the float layer's parameters, buffers, hooks and hyperparameters
    (no copy), then sets up its quantizers from ``config`` on the layer's device.
    """
    if isinstance(layer, QuantMixin):
        raise ValueError("layer is already quantized")
    cls = next((c for base, c in table.items() if isinstance(layer, base)), None)
    if cls is None:
        raise TypeError(f"no {what} swap for {type(layer).__name__}")
    new = cls.__new__(cls)
    new.__dict__.update(layer.__dict__)  # same parameters, buffers, hooks dicts, hyperparameters
    new._parameters = dict(layer._parameters)
    new._buffers = dict(layer._buffers)
    new._modules = dict(layer._modules)
    new._setup_quant(config)
    ref = layer.weight
    for m in new.modules():
        if m is not new:
            m.to(device=ref.device)
    return new


def make_quant_module(layer: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Build the quantized swap of ``layer``, sharing its weight and bias parameters."""
    return from_float(QUANT_SWAPS, layer, config, "quantized")


def rebuild_quant(original: nn.Module, record: dict) -> nn.Module:
    """The quantized layer a ``QuantLinear``/``QuantConv2d`` module record describes."""
    return make_quant_module(original, {k: v for k, v in record.items() if k != "kind"})
