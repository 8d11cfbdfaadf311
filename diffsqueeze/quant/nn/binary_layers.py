"""BinaryDM module swaps: ``nn.Linear -> BinaryLinear``, ``nn.Conv2d -> BinaryConv2d``, and
attention q/k/probability/v quantization.

The binary layers are the PTQ engine's :class:`~diffsqueeze.quant.nn.layers.QuantLinear` /
``QuantConv2d`` (same ``weight``/``bias`` parameters, the same LSQ
:class:`~diffsqueeze.quant.nn.quantizers.ActQuantizer` on the input) with the weight quantizer
replaced by :class:`BinaryWeightQuantizer` (the LMB of :mod:`diffsqueeze.quant.primitives.binary`). All
state is parameters and buffers (the latent FP weight, ``a1``/``a2``, activation scales), so
``state_dict`` round-trips; the records ``{"kind": "BinaryConv2d", "order": 2, ...}`` in
``CompressionState.modules`` rebuild the structure on reload (checkpoints, resume, load_pipeline).

Pruned layers (record ``masked: true``): entries whose latent weight is exactly 0 are pruned
(every stage keeps them at 0), so they binarize to 0 and get no gradient: ``{-a, 0, +a}``.

Attention: :class:`AttentionActQuant` holds four LSQ quantizers (q, k, softmax probabilities,
v) as a submodule of a diffusers ``Attention`` module; :class:`QKVQuantProcessor` wraps the
module's processor and, while it runs, computes ``scaled_dot_product_attention`` explicitly with
those quantizers (the same interception as :mod:`diffsqueeze.quant.nn.attention`). The
probabilities use an unsigned quantizer (codes ``0..2^b-1``, z = 0) whose scale is learned
rather than fixed at ``1/(2^b-1)``: at 4 bits a fixed step rounds every probability below 1/30
to zero, which erases attention over more than ~30 tokens.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from diffsqueeze.quant.nn.attention import ProcessorWrapper, RouteSDPA, explicit_sdpa
from diffsqueeze.quant.nn.layers import QuantConv2d, QuantLinear, QuantMixin, from_float
from diffsqueeze.quant.nn.quantizers import ActQuantizer
from diffsqueeze.quant.primitives.binary import binarize, init_scales

__all__ = [
    "AttentionActQuant", "BinaryConv2d", "BinaryLinear", "BinaryWeightQuantizer", "QKVQuantProcessor",
    "act_quantizers_of", "install_attention_quant", "make_binary_module", "lsq_init_scale",
]

ATTN_QUANT_ATTR = "binarydm_act_quant"


class BinaryWeightQuantizer(nn.Module):
    """LMB weight binarizer of one layer (docs/methods.md §7): learnable ``a1`` (and ``a2``), ``(out, 1)``.

    Attributes:
        order: 1 or 2.
        masked: treat exact zeros of the latent weight as pruned (value and gradient 0).
        enabled: runtime switch; off passes the FP latent weight through (progressive init).
    """

    def __init__(self, out_features: int, order: int, masked: bool = False):
        super().__init__()
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        self.order = order
        self.masked = masked
        self.a1 = nn.Parameter(torch.ones(out_features, 1))
        self.a2 = nn.Parameter(torch.ones(out_features, 1)) if order == 2 else None
        self.enabled = True

    def mask_of(self, w: Tensor) -> Tensor | None:
        return (w != 0) if self.masked else None

    @torch.no_grad()
    def init_from(self, w: Tensor) -> None:
        """Explicit initialization from the weight: ``a1 = mean|W|``, ``a2 = mean|W - a1 sign W|``."""
        a1, a2 = init_scales(w.detach().float(), self.order, self.mask_of(w))
        self.a1.copy_(a1.to(self.a1))
        if self.a2 is not None:
            self.a2.copy_(a2.to(self.a2))

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        return binarize(w, self.a1.to(w.dtype), None if self.a2 is None else self.a2.to(w.dtype), self.order,
                        self.mask_of(w))

    def extra_repr(self) -> str:
        return f"order={self.order}, masked={self.masked}"


class BinaryMixin:
    """Replaces the INT/FP weight quantizer of :class:`QuantMixin` by the LMB binarizer."""

    def _setup_quant(self, config: dict[str, Any]) -> None:
        QuantMixin._setup_quant(self, {**config, "weight_format": None, "split": 0})
        self.config = dict(config)
        self.weight_quant = BinaryWeightQuantizer(self.weight.shape[0], int(config["order"]), bool(config.get("masked")))
        self.quant_weights = True
        for q in self.act_quantizers():
            q.lsq = True

    @property
    def order(self) -> int:
        return self.weight_quant.order

    def binary_weight(self) -> Tensor:
        """The binarized weight (no STE term), as the forward uses it."""
        with torch.no_grad():
            return self.weight_quant(self.weight)


class BinaryLinear(BinaryMixin, QuantLinear):
    """``nn.Linear`` with a multi-basis binary weight and an LSQ input quantizer."""

    KIND = "BinaryLinear"  # the module record's kind: part of the saved format, never renamed


class BinaryConv2d(BinaryMixin, QuantConv2d):
    """``nn.Conv2d`` with a multi-basis binary weight and an LSQ input quantizer."""

    KIND = "BinaryConv2d"  # the module record's kind: part of the saved format, never renamed


BINARY_SWAPS: dict[type, type] = {nn.Conv2d: BinaryConv2d, nn.Linear: BinaryLinear}
"""Float layer type -> its binary swap (checked with isinstance, in this order)."""


def make_binary_module(layer: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Build the binary swap of ``layer`` sharing its weight/bias parameters.

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv2d`` (not already quantized).
        config: ``{"order": 1|2, "masked": bool, "act": None | {"format", "shape", "groups", "n_timesteps"}}``.
    """
    return from_float(BINARY_SWAPS, layer, config, "binary")


def rebuild_binary(original: nn.Module, record: dict) -> nn.Module:
    """The binary layer a ``BinaryLinear``/``BinaryConv2d`` module record describes."""
    return make_binary_module(original, {k: v for k, v in record.items() if k != "kind"})


# ---- attention ------------------------------------------------------------------------------


def lsq_init_scale(mean_abs: Tensor, qp: int) -> Tensor:
    """LSQ initialization ``s = 2 mean|x| / sqrt(Qp)`` (docs/methods.md §7), at least 1e-8.

    Args:
        mean_abs: ``mean |x|`` of the quantizer's inputs, per tensor or per channel.
        qp: the largest positive code of the quantizer's format (``int_code_range(...)[1]``).
    """
    return (2.0 * mean_abs / math.sqrt(qp)).clamp(min=1e-8)


class AttentionActQuant(nn.Module):
    """LSQ quantizers of an attention's q, k, softmax probabilities and v (per tensor)."""

    def __init__(self, bits: int, prob_bits: int):
        super().__init__()
        self.bits, self.prob_bits = bits, prob_bits
        self.q = ActQuantizer(f"int{bits}_sym")
        self.k = ActQuantizer(f"int{bits}_sym")
        self.v = ActQuantizer(f"int{bits}_sym")
        self.probs = ActQuantizer(f"int{prob_bits}")  # unsigned, zero point stays 0
        for q in self.quantizers():
            q.lsq = True
        # set while scales are initialized: the quantized SDPA runs (so the quantizers see their
        # inputs) even though every quantizer is disabled and passes its input through
        self.observe = False

    def quantizers(self) -> list[ActQuantizer]:
        return [self.q, self.k, self.probs, self.v]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        """``softmax(Q(q) Q(k)^T * scale + mask)`` quantized, times ``Q(v)`` (eval: no dropout)."""
        return explicit_sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                             probs_fn=self.probs, qkv_fn=(self.q, self.k, self.v))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, prob_bits={self.prob_bits}"


class QKVQuantProcessor(ProcessorWrapper):
    """Wraps an attention processor: its SDPA runs with :class:`AttentionActQuant` quantizers.

    The quantizers live on the attention module (``binarydm_act_quant``), so they are in its
    ``state_dict``; when every quantizer is disabled and the module is not observing (scale
    initialization) the wrapped processor runs unchanged.
    """

    def __init__(self, inner, quant: AttentionActQuant):
        super().__init__(inner)
        self.quant = quant

    def route(self) -> contextlib.AbstractContextManager:
        if not self.quant.observe and not any(q.enabled for q in self.quant.quantizers()):
            return contextlib.nullcontext()
        return RouteSDPA(self.quant.attention)


def install_attention_quant(module: nn.Module, bits: int, prob_bits: int) -> AttentionActQuant:
    """Add (or replace) q/k/probs/v quantizers on a diffusers attention module and wrap its processor."""
    quant = AttentionActQuant(bits, prob_bits)
    ref = next(module.parameters(), None)
    if ref is not None:
        quant.to(device=ref.device)
    inner = module.processor
    if isinstance(inner, QKVQuantProcessor):
        inner = inner.inner
    module.add_module(ATTN_QUANT_ATTR, quant)
    module.set_processor(QKVQuantProcessor(inner, quant))
    return quant


ATTENTION_KIND = "BinaryDMAttention"
"""The module record kind of BinaryDM's attention quantizers (part of the saved format, never renamed)."""


def rebuild_attention_quant(original: nn.Module, record: dict) -> nn.Module:
    install_attention_quant(original, int(record["bits"]), int(record["prob_bits"]))
    return original


def act_quantizers_of(root: nn.Module) -> list[ActQuantizer]:
    """Every LSQ activation quantizer of the binary layers and attention modules under ``root``."""
    out: list[ActQuantizer] = []
    for m in root.modules():
        if isinstance(m, BinaryMixin):
            out += m.act_quantizers()
        elif isinstance(m, AttentionActQuant):
            out += m.quantizers()
    return out
