"""Post-softmax attention-probability quantization through a diffusers attention processor.

:class:`QuantSoftmaxProcessor` wraps whatever processor an ``Attention`` module has (plain,
joint/MMDiT, ...). While the wrapped processor runs, ``F.scaled_dot_product_attention`` is
computed explicitly (``softmax(q k^T * scale + mask)``) and the probabilities go through their
own unsigned quantizer (z = 0, ``s = 1 / (2^b - 1)``, docs/methods.md §5) before ``@ v``. No edit of
diffusers' files; the setting is stateless, so its record rebuilds it exactly.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


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
                  bits: int = 8, probs_fn: Callable[[Tensor], Tensor] | None = None,
                  qkv_fn: tuple[Callable[[Tensor], Tensor], ...] | None = None) -> Tensor:
    """``scaled_dot_product_attention`` computed explicitly so its parts can be quantized (eval: no dropout).

    Args:
        bits: probability bits of :func:`quantize_probs`, used when ``probs_fn`` is not given.
        probs_fn: quantizer of the softmax probabilities.
        qkv_fn: quantizers of q, k and v (applied after grouped-query repetition).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    if qkv_fn is not None:
        q, k, v = (fn(t) for fn, t in zip(qkv_fn, (q, k, v)))
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = scores.softmax(dim=-1)
    probs = probs_fn(probs) if probs_fn is not None else quantize_probs(probs, bits)
    return probs.to(v.dtype) @ v


SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name, however passed."""
    return {**dict(zip(SDPA_ARGUMENTS, args)), **kwargs}


class RouteSDPA(TorchFunctionMode):
    """While active, every ``F.scaled_dot_product_attention`` call goes to ``fn(q, k, v, **rest)``
    (callers pass q, k, v by position or as ``query=``/``key=``/``value=``: diffusers'
    attention dispatcher does the latter)."""

    def __init__(self, fn: Callable[..., Tensor]):
        super().__init__()
        self.fn = fn

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = sdpa_arguments(args, kwargs)
            return self.fn(bound.pop("query"), bound.pop("key"), bound.pop("value"), **bound)
        return func(*args, **kwargs)


class ProcessorWrapper:
    """An attention processor that runs another one (``inner``) with every argument it is given
    (positional or keyword: rotary embeddings, masks, joint-attention inputs) while
    :meth:`route` is active.

    diffusers' attention modules drop keyword arguments that their processor's ``__call__`` does
    not name (they read ``inspect.signature(processor.__call__)``), so the instance's
    ``__call__`` attribute shows the wrapped processor's signature; calls still go through the
    class's ``__call__``.
    """

    def __init__(self, inner):
        self.inner = inner
        self.__call__ = functools.wraps(inner.__call__)(functools.partial(type(self).__call__, self))

    def route(self) -> contextlib.AbstractContextManager:
        raise NotImplementedError

    def __call__(self, attn, *args, **kwargs):
        with self.route():
            return self.inner(attn, *args, **kwargs)


class QuantSoftmaxProcessor(ProcessorWrapper):
    """Wraps an attention processor; its attention probabilities are quantized to ``bits``."""

    def __init__(self, inner, bits: int):
        super().__init__(inner)
        self.bits = bits

    def route(self) -> contextlib.AbstractContextManager:
        return RouteSDPA(functools.partial(explicit_sdpa, bits=self.bits))


def is_attention(module: torch.nn.Module) -> bool:
    """A diffusers attention module: it has a settable processor."""
    return hasattr(module, "set_processor") and hasattr(module, "processor")


def quantize_softmax(module: torch.nn.Module, bits: int) -> None:
    """Install (or update) the softmax quantizer on a diffusers attention module."""
    inner = module.processor
    if isinstance(inner, QuantSoftmaxProcessor):
        inner = inner.inner
    module.set_processor(QuantSoftmaxProcessor(inner, bits))


SOFTMAX_KIND = "QuantSoftmax"
"""The module record kind of a softmax quantizer (part of the saved format, never renamed)."""


def rebuild_softmax_quant(original: torch.nn.Module, record: dict) -> torch.nn.Module:
    """The attention module with the softmax quantizer a ``QuantSoftmax`` module record describes."""
    quantize_softmax(original, int(record["bits"]))
    return original
