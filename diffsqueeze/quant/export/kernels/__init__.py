"""Real low-bit kernels where one fits a layer exactly, and the per-layer real/simulated plan.

A reloaded packed pipeline (:mod:`diffsqueeze.quant.export.save`) computes every layer by decoding
its codes to float and running a float matmul/conv: bit-identical to the run's fake-quantized
model, low-bit *storage* but simulated low-bit *math*. :data:`KERNELS` is the table of real
kernels, one file each in this folder, tried in order; the first whose
:attr:`~.kernel.Kernel.problem` is ``None`` for a layer replaces it (:func:`use_real_kernels`).
A layer no kernel takes stays simulated, and its plan entry gives the reason of every kernel that
considered it. :func:`kernel_plan` reports the decision for every layer without changing anything
(``inspect --device cpu|cuda``, for either device on any machine).

* CPU: W8A8 INT conv and Linear layers -> oneDNN's int8 kernels on the run's own scales and codes
  (:mod:`.onednn_w8a8`).
* CPU and GPU: weight-only Linear layers -> bitsandbytes (:mod:`.bitsandbytes`; re-quantized on
  bitsandbytes' grid, so close to the simulated layer, not equal).
* GPU: FP8 W8A8 Linear layers -> ``torch._scaled_mm`` (:mod:`.scaled_mm_fp8`); float Linear layers
  with a 2:4 pruning mask -> torch semi-structured sparsity (:mod:`.sparse_2_4`).

FP8 (hardware E4M3/E5M2) layers keep ``torch.float8_*`` storage in every mode.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.export.kernels import bitsandbytes, onednn_w8a8, scaled_mm_fp8, sparse_2_4
from diffsqueeze.quant.export.kernels.kernel import Kernel
from diffsqueeze.quant.export.kernels.onednn_w8a8 import OneDNNW8A8
from diffsqueeze.quant.export.kernels.scaled_mm_fp8 import ScaledMMLinear
from diffsqueeze.quant.export.kernels.sparse_2_4 import is_two_four
from diffsqueeze.quant.nn.packed import PackedWeightMixin
from diffsqueeze.quant.nn.swaps import swap_module

log = logging.getLogger(__name__)

__all__ = ["KERNELS", "Kernel", "kernel_plan", "layer_plan", "use_real_kernels", "decode_weights_once",
           "ScaledMMLinear", "is_two_four"]

KERNELS: tuple[Kernel, ...] = (
    onednn_w8a8.KERNEL,
    bitsandbytes.INT8,
    bitsandbytes.FP4,
    bitsandbytes.NF4,
    scaled_mm_fp8.KERNEL,
    sparse_2_4.KERNEL,
)
"""The real kernels, in the order they are tried: adding one is a file in this folder and a line here."""

SWAPPED = {OneDNNW8A8: onednn_w8a8.KERNEL_NAME}
"""Modules that already are a kernel (a pipeline whose kernels were swapped in), by kernel name."""


def _simulated(m: nn.Module) -> str:
    """How a layer without a real kernel computes."""
    op = "conv" if isinstance(m, nn.Conv2d) else "matmul"
    if isinstance(m, PackedWeightMixin):
        decode = "decoded once (dense fp32 cache)" if m.decoded_once else "decode per forward"
        return f"packed {m.packed_spec.get('summary', '')}, {decode} + fp32 {op}"
    return f"dense fp32 {op} with zeros"


def _choose(m: nn.Module, device: torch.device, mask: Tensor | None) -> tuple[Kernel | None, dict[str, str]]:
    """The kernel that takes ``m`` (or None) and the plan entry ({} for a layer no kernel considers
    and that is not packed: nothing to report)."""
    for cls, name in SWAPPED.items():
        if isinstance(m, cls):
            return None, {"compute": "real", "kernel": name}
    reasons = []
    for kernel in KERNELS:
        if not kernel.considers(m, mask):
            continue
        problem = kernel.problem(m, device, mask)
        if problem is None:
            return kernel, {"compute": "real", "kernel": kernel.name}
        reasons.append(f"{kernel.name}: {problem}")
    if not reasons and not isinstance(m, PackedWeightMixin):
        return None, {}
    if not reasons:
        reasons.append(f"no kernel takes {m.packed_spec.get('summary', 'these')} weights")
    if getattr(m, "quant_acts", False):
        reasons.insert(0, "activations fake-quantized")
    return None, {"compute": "simulated", "kernel": _simulated(m), "reason": "; ".join(reasons)}


def layer_plan(m: nn.Module, device: torch.device, mask: Tensor | None) -> dict[str, str]:
    """``{"compute": "real"|"simulated", "kernel": ..., "reason": ...}`` for one layer ({}: not a
    compressed layer)."""
    return _choose(m, torch.device(device), mask)[1]


def kernel_plan(pipe, state=None, device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """``"<component>/<layer>" -> {"compute": "real"|"simulated", "kernel": ..., "reason": ...}``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    masks = state.masks if state is not None else {}
    out = {}
    for comp, module in module_components(pipe).items():
        for name, m in module.named_modules():
            plan = layer_plan(m, device, masks.get(f"{comp}/{name}.weight"))
            if plan:
                out[f"{comp}/{name}"] = plan
    return out


def decode_weights_once(pipe) -> int:
    """``decode: once``: every packed layer still computing in float decodes its weight now and
    keeps it dense (no per-forward decode; memory of the float weight). Returns the layer count."""
    n = 0
    for module in module_components(pipe).values():
        for m in module.modules():
            if isinstance(m, PackedWeightMixin) and not m.decoded_once:
                m.decode_once()
                n += 1
    return n


def use_real_kernels(pipe, state=None, device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """Swap every layer that has a real kernel (see the module docstring); return the final plan.

    Layers whose kernel fails while being built stay simulated; the plan entry says why.
    """
    comps = module_components(pipe)
    if device is None:
        device = next((p.device for c in comps.values() for p in c.parameters()), torch.device("cpu"))
    device = torch.device(device)
    masks = state.masks if state is not None else {}
    plan = {}
    for comp, module in comps.items():
        for name, m in list(module.named_modules()):
            kernel, entry = _choose(m, device, masks.get(f"{comp}/{name}.weight"))
            if not entry:
                continue
            plan[f"{comp}/{name}"] = entry
            if kernel is None:
                continue
            try:
                new = kernel.build(m, device)
            except Exception as exc:  # a kernel that rejects this shape/device: stay simulated, say why
                entry.update(compute="simulated", kernel=_simulated(m),
                             reason=f"{kernel.name} failed: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            swap_module(module, name, new)
    return plan
