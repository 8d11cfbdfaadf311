"""Tracing the denoiser for the ``ptq`` stage: which layers to quantize, in which order they
run, where an input is a channel concatenation (shortcut splitting, docs/methods.md §5), and whether a
layer's calibration inputs constrain its weight (output search, docs/methods.md §3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from diffsqueeze.pipelines.stage_helpers import call_denoiser, matches_any
from diffsqueeze.quant.nn.layers import QuantMixin, quant_layer_types


@dataclass
class PTQLayerPlan:
    """What one layer gets: weight format (or FP search), activation format (or search)."""

    name: str
    weight_format: str | None
    weight_search_bits: int | None
    act_format: str | None
    act_search_bits: int | None
    split: int = 0
    notes: list[str] = field(default_factory=list)


def select_layers(root: torch.nn.Module, include: Sequence[str], skip: Sequence[str]) -> list[str]:
    """Names of the not yet quantized Linear/Conv2d layers that a pattern of ``include`` matches and
    no pattern of ``skip`` (a stage's exclude and keep-FP lists) does."""
    out = []
    for name, module in root.named_modules():
        if not isinstance(module, quant_layer_types()) or isinstance(module, QuantMixin):
            continue
        if not matches_any(name, include) or matches_any(name, skip):
            continue
        out.append(name)
    return out


def execution_order(denoiser: torch.nn.Module, names: list[str], kwargs: dict) -> tuple[list[str], dict[str, int], str | None]:
    """Layers in the order of their first call, concatenated-input splits (docs/methods.md §5), and the
    first layer: the one that takes the latent input itself (``conv_in``, the patch embedding).

    A split is found where a module's input is the output of a channel ``torch.cat`` (dim 1) of
    two 4-D tensors and a listed conv inside that module takes all those channels: the conv
    then gets ``split = channels of the first part`` (Q-Diffusion's shortcut splitting).
    """
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


def spans_inputs(layer: torch.nn.Module, x: torch.Tensor, plan: PTQLayerPlan) -> bool:
    """Whether the calibration inputs ``x`` determine the layer's output error for any weight.

    The output L2 search (docs/methods.md §3) only sees the weight on the span of the calibration
    inputs. A Linear or 1x1-conv layer fed by a handful of distinct vectors (the time
    embedding: one per calibration timestep; text projections: a few prompts) leaves most of
    its weight unconstrained, and the search then picks biases that wreck channels on inputs
    it has not seen (measured on builtin:fashion: FP8 E4M3 channels at 0.5 dB SQNR in the
    time-embedding projections). Such layers are searched on the weight's own error instead,
    and the plan's notes say so. k x k convolutions see many patches and are kept.
    """
    if isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1):
        return True
    rows = act_rows(x, isinstance(layer, torch.nn.Conv2d)).double()
    rows = rows[:: -(-rows.shape[0] // 4096)]  # at most 4096 rows, evenly strided
    features = rows.shape[1]
    rank = int(torch.linalg.matrix_rank(rows, rtol=1e-6))
    if rank >= features:
        return True
    plan.notes.append(f"output search off: calibration inputs span {rank} of {features} input dims; "
                      f"searched on the weight error")
    return False


def act_rows(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Activation as ``(rows, channels)``: channel dim 1 for conv inputs, last dim for tokens."""
    if conv:
        return x.transpose(0, 1).reshape(x.shape[1], -1).T
    return x.reshape(-1, x.shape[-1])
