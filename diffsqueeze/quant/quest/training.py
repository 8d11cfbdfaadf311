"""What finetuning a set of quantized layers against the FP teacher needs (QuEST, docs/methods.md §6).

Straight-through training on the weight grid and re-quantization at the end, activation scales
trained for the current timestep group only, the loss on hooked layer outputs and the denoiser
output, pruned weights kept at zero, and the student's error against the teacher.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffsqueeze.pipelines.calibration import CalibrationData
from diffsqueeze.pipelines.distributed import sum_gradients
from diffsqueeze.pipelines.stage_helpers import call_denoiser
from diffsqueeze.process_memory import peak_rss_mb
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.nn.routing import timestep_routing
from diffsqueeze.quant.nn.swaps import swap_module
from diffsqueeze.quant.quest.sensitivity import calibration_subset


class GridWeight(nn.Module):
    """Stand-in for a layer's weight quantizer while finetuning.

    Forward value: exactly the quantizer's on-grid weight (hard rounding when V exists);
    gradients: straight-through to W, and the soft-rounding gradient to V.
    """

    def __init__(self, inner: WeightQuantizer):
        super().__init__()
        self.inner = inner

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = self.inner
        if q.alpha is not None:
            q.soft = False
            hard = q.quantize_learned(w).detach()
            q.soft = True
            soft = q.quantize_learned(w)
            out = hard + (soft - soft.detach())
        else:
            out = q.quantize_rtn(w.detach()).detach()
        return out + (w - w.detach())


@contextmanager
def grid_weights(layers: dict[str, QuantMixin], rounding: bool) -> Iterator[list[nn.Parameter]]:
    """Wrap the layers' weight quantizers (STE), optionally with rounding variables; yields V.

    On exit the weights are re-quantized onto their grid (hard rounding or RTN with the PTQ
    scales), low-rank branches (trained as :func:`branch_params`) are rounded to the float16
    values export stores, and the quantizers restored.
    """
    swapped = []
    for lay in layers.values():
        for attr in ("weight_quant", "weight_quant_2"):
            q = getattr(lay, attr, None)
            if isinstance(q, WeightQuantizer):
                swapped.append((lay, attr, q))
    if rounding:
        for lay, attr, q in swapped:
            part = lay.weight[:, : lay.split] if attr == "weight_quant" and lay.split else (
                lay.weight[:, lay.split:] if attr == "weight_quant_2" else lay.weight)
            q.init_rounding(part)
    try:
        for lay, attr, q in swapped:
            swap_module(lay, attr, GridWeight(q))
        yield [q.alpha for _, _, q in swapped if q.alpha is not None]
    finally:
        for lay, attr, q in swapped:
            swap_module(lay, attr, q)
        with torch.no_grad():
            for lay in layers.values():
                if not lay.weight_quantizers():
                    continue
                w = lay.weight
                parts = [(q.finalize_rounding(w[:, sl]) if q.alpha is not None else q.quantize_rtn(w[:, sl]))
                         for q, sl in lay.weight_parts()]
                w.copy_(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
            for p in branch_params(layers):
                p.copy_(p.to(torch.float16).to(p.dtype))


@contextmanager
def steps_in_backward(params: list[nn.Parameter], lr: float) -> Iterator[None]:
    """Adam steps for ``params`` taken inside the backward pass, each as soon as its gradient is
    complete, and that gradient dropped: the gradients of all trained weights never exist at once
    (QuEST stage 2 at SD-1.5 size trains the 149M ``ff.net`` weights: 0.6 GB of gradients at the
    peak). A parameter's Adam update reads only its own gradient and state, so one Adam per
    parameter computes what one Adam over all of them does (test). Under data parallelism each
    gradient is summed over the processes first (the autograd order is the same in every process).
    """
    opts = {p: torch.optim.Adam([p], lr=lr) for p in params}

    def step(p: nn.Parameter) -> None:
        sum_gradients([p])
        opts[p].step()
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(step) for p in params]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def branch_params(layers: dict[str, QuantMixin]) -> list[nn.Parameter]:
    """The 16-bit low-rank branches of ``layers`` (docs/methods.md §10): trained beside the weights."""
    return [p for lay in layers.values() if getattr(lay, "lowrank_rank", 0) for p in (lay.lowrank_up, lay.lowrank_down)]


class GroupScales:
    """Activation scales trained for the current timestep group only.

    Adam moves a parameter even where its gradient is zero (momentum), so after each step the
    rows of the other groups are put back: :meth:`hold` before the optimizer step,
    :meth:`release` after it.
    """

    def __init__(self, quantizers: list[ActQuantizer]):
        self.quantizers = quantizers
        self.params = [q.scale for q in quantizers]
        self._held: list[torch.Tensor] = []

    def restore_others(self, snapshot: list[torch.Tensor]) -> None:
        """Put back the rows of every group but the current one from ``snapshot``."""
        with torch.no_grad():
            for q, snap in zip(self.quantizers, snapshot):
                g = q.current_group()
                row = q.scale[g].clone()
                q.scale.copy_(snap)
                q.scale[g] = row.clamp(min=1e-8)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of the scales as they are now."""
        return [p.detach().clone() for p in self.params]

    def hold(self) -> None:
        """Remember the scales before an optimizer step."""
        self._held = self.snapshot()

    def release(self) -> None:
        """After the step: the other groups' rows back to what :meth:`hold` saw."""
        self.restore_others(self._held)
        self._held = []


def quest_loss(student_out, teacher_out, s_layers: dict, t_layers: dict, weight: float) -> torch.Tensor:
    """``MSE(eps^q, eps^fp) + weight * sum_k MSE(out_k^q, out_k^fp)`` over the layers of ``t_layers``."""
    out_loss = F.mse_loss(student_out.float(), teacher_out.float())
    layer_loss = sum((F.mse_loss(s_layers[n].float(), t_layers[n].float()) for n in t_layers),
                     out_loss.new_zeros(()))
    return out_loss + weight * layer_loss


def enforce_masks_of(module: nn.Module, comp: str, masks: dict, names: list[str]) -> None:
    """Re-zero pruned weights of the trained layers after an optimizer step."""
    with torch.no_grad():
        for key in masks:  # keys first: a mask is unpacked only for a trained layer
            c, pname = key.split("/", 1)
            layer, _, attr = pname.rpartition(".")
            if c == comp and layer in names:
                p = getattr(module.get_submodule(layer), attr)
                p.mul_(masks[key].to(device=p.device, dtype=p.dtype))


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak RSS on the CPU (MiB)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(peak_rss_mb(), 1)


@torch.no_grad()
def denoiser_error(student: nn.Module, teacher: nn.Module, data: CalibrationData, device, limit: int,
                   batch_size: int) -> float:
    """Mean denoiser-output MSE of the student against the teacher over calibration samples."""
    total, n = 0.0, 0
    with timestep_routing(student):
        for b in calibration_subset(data, limit, batch_size, device):
            ref = call_denoiser(teacher, b.kwargs).float()
            out = call_denoiser(student, b.kwargs).float()
            total += float((out - ref).pow(2).mean()) * ref.shape[0]
            n += ref.shape[0]
    return total / max(n, 1)


__all__ = ["GridWeight", "grid_weights", "GroupScales", "quest_loss", "enforce_masks_of",
           "peak_memory_mb", "denoiser_error", "branch_params"]
