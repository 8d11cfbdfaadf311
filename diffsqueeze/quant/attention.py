"""Post-softmax attention-probability quantization through a diffusers attention processor.

:class:`QuantSoftmaxProcessor` wraps whatever processor an ``Attention`` module has (plain,
joint/MMDiT, ...). While the wrapped processor runs, ``F.scaled_dot_product_attention`` is
computed explicitly (``softmax(q k^T * scale + mask)``) and the probabilities go through their
own unsigned quantizer (z = 0, ``s = 1 / (2^b - 1)``, METHODS §5) before ``@ v``. No edit of
diffusers' files; the setting is stateless, so its record rebuilds it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

import diffsqueeze.models  # noqa: F401  (models imports module_swaps; importing it first avoids a cycle)
from diffsqueeze.pipelines.module_swaps import register_module_kind


def quantize_probs(p: Tensor, bits: int) -> Tensor:
    """Unsigned fake quantization of probabilities in [0, 1]: ``round(p (2^b - 1)) / (2^b - 1)``.

    Straight-through gradient (the value is exactly the quantized one), so finetuning stages
    (QuEST) train through quantized attention.
    """
    levels = 2**bits - 1
    q = torch.clamp(torch.round(p.detach() * levels), 0, levels) / levels
    return q + (p - p.detach()) if p.requires_grad else q


def explicit_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  bits: int = 8) -> Tensor:
    """``scaled_dot_product_attention`` with quantized probabilities (eval: no dropout)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = quantize_probs(scores.softmax(dim=-1), bits)
    return probs.to(v.dtype) @ v


class _SDPAMode(TorchFunctionMode):
    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return explicit_sdpa(*args, **kwargs, bits=self.bits)
        return func(*args, **kwargs)


class QuantSoftmaxProcessor:
    """Wraps an attention processor; its attention probabilities are quantized to ``bits``."""

    def __init__(self, inner, bits: int):
        self.inner = inner
        self.bits = bits

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        with _SDPAMode(self.bits):
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)


def is_attention(module: torch.nn.Module) -> bool:
    """A diffusers attention module: it has a settable processor."""
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def quantize_softmax(module: torch.nn.Module, bits: int) -> None:
    """Install (or update) the softmax quantizer on a diffusers attention module."""
    inner = module.processor
    if isinstance(inner, QuantSoftmaxProcessor):
        inner = inner.inner
    module.set_processor(QuantSoftmaxProcessor(inner, bits))


@register_module_kind("QuantSoftmax")
def _rebuild(original: torch.nn.Module, record: dict) -> torch.nn.Module:
    quantize_softmax(original, int(record["bits"]))
    return original
