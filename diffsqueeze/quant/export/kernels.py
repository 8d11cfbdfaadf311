"""Real low-bit kernels where one fits a layer's format, and the per-layer real/simulated plan.

A reloaded packed pipeline (:mod:`diffsqueeze.quant.export.save`) computes every layer by decoding
its codes to float and running a float matmul/conv: bit-identical to the run's fake-quantized
model, low-bit *storage* but simulated low-bit *math*. :func:`use_real_kernels` swaps the layers
for which a real kernel exists:

* CPU: W8A8 INT conv and Linear layers (8-bit INT weights per channel, 8-bit INT activations per
  tensor, per timestep group) -> oneDNN's int8 kernels with float32 output, on the run's own
  scales and codes (:mod:`diffsqueeze.quant.export.cpu_int8`).
* CPU and GPU: weight-only ``int8`` Linear layers -> bitsandbytes ``Linear8bitLt``; weight-only
  4-bit Linear layers -> bitsandbytes ``Linear4bit`` (``fp4`` for FP4 E2M1, ``nf4`` for INT4).
  bitsandbytes re-quantizes the decoded weight on its own grid (per-row absmax int8,
  blockwise-64 absmax 4-bit), so results differ slightly from the simulated layer.
  Shapes bitsandbytes' CPU inference kernels reject (``in_features`` = 32, ``out_features``
  not a multiple of 32, ...) are probed with a dummy forward and stay simulated, with the reason.
* FP8 (hardware E4M3/E5M2) layers keep ``torch.float8_*`` storage in every mode; on a GPU with
  FP8 support, W8A8 FP8 Linear layers (per-tensor E4M3 activations) run ``torch._scaled_mm``.
* GPU: Linear layers with a 2:4 pruning mask and float weights -> torch semi-structured sparsity.

``kernel_plan`` reports the decision for every layer without changing anything (``inspect``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from diffsqueeze.models.roles import module_components
from diffsqueeze.quant.export.cpu_int8 import KERNEL_NAME as CPU_W8A8
from diffsqueeze.quant.export.cpu_int8 import OneDNNW8A8, onednn_w8a8, w8a8_int_problem
from diffsqueeze.quant.nn.packed import PackedBinaryMixin, PackedMixin
from diffsqueeze.quant.nn.swaps import swap_module
from diffsqueeze.quant.primitives.formats import FPFormat, parse_format

log = logging.getLogger(__name__)

__all__ = ["kernel_plan", "use_real_kernels", "decode_weights_once", "ScaledMMLinear", "is_two_four"]


def _weight_only_part(m: PackedMixin) -> dict | None:
    parts = m.packed_spec.get("parts") or []
    if len(parts) != 1 or m.quant_acts:
        return None
    return parts[0]


def _bnb_target(m: nn.Module) -> str | None:
    """``int8`` / ``fp4`` / ``nf4`` for a weight-only packed Linear layer with a bnb kernel."""
    if not isinstance(m, PackedMixin) or isinstance(m, PackedBinaryMixin) or not isinstance(m, nn.Linear):
        return None
    part = _weight_only_part(m)
    if part is None or part["storage"] == "block" or getattr(m, "lowrank_rank", 0) or getattr(m, "smooth", None) is not None:
        return None
    fmt = parse_format(part["format"])
    if fmt.kind == "int" and fmt.bits == 8:
        return "int8"
    if isinstance(fmt, FPFormat) and (fmt.exp_bits, fmt.man_bits) == (2, 1):
        return "fp4"
    if fmt.kind == "int" and fmt.bits == 4:
        return "nf4"
    return None


def _fp8_w8a8(m: nn.Module) -> bool:
    if not isinstance(m, PackedMixin) or not isinstance(m, nn.Linear) or isinstance(m, PackedBinaryMixin):
        return False
    parts = m.packed_spec.get("parts") or []
    if len(parts) != 1 or parts[0]["storage"] != "float8" or not m.quant_acts or getattr(m, "smooth", None) is not None:
        return False
    act = m.config.get("act") or {}
    afmt = parse_format(act.get("format", "int8"))
    return (isinstance(afmt, FPFormat) and afmt.torch_dtype == torch.float8_e4m3fn and list(act.get("shape", [1])) == [1]
            and int(act.get("groups", 1)) == 1 and not act.get("group_size"))


def is_two_four(mask: Tensor) -> bool:
    """True if every group of 4 consecutive inputs keeps at most 2 (2:4 semi-structured)."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all())


def layer_plan(m: nn.Module, device: torch.device, mask: Tensor | None) -> dict[str, str]:
    once = getattr(m, "decoded_once", False)
    if isinstance(m, OneDNNW8A8):
        return {"compute": "real", "kernel": CPU_W8A8}
    if isinstance(m, PackedBinaryMixin):
        return {"compute": "simulated", "kernel": "packed sign bits -> fp32 weight " + ("decoded once" if once else "per forward"),
                "reason": "no 1-bit kernel in torch/bitsandbytes"}
    if isinstance(m, PackedMixin):
        w8a8_problem = w8a8_int_problem(m) if device.type == "cpu" else "CPU only"
        if w8a8_problem is None:
            return {"compute": "real", "kernel": CPU_W8A8}
        target = _bnb_target(m)
        if target in ("fp4", "nf4") and device.type == "cpu" and (m.in_features % 64 or m.out_features % 32):
            return {"compute": "simulated", "kernel": "decode per forward + fp32 matmul",
                    "reason": f"bitsandbytes' CPU 4-bit inference kernel rejects in_features={m.in_features}, "
                              f"out_features={m.out_features} (needs multiples of 64 / 32)"}
        if target is not None:
            return {"compute": "real", "kernel": f"bitsandbytes {'Linear8bitLt' if target == 'int8' else 'Linear4bit'} {target}"}
        if device.type == "cuda" and _fp8_w8a8(m):
            return {"compute": "real", "kernel": "torch._scaled_mm fp8 e4m3 W8A8"}
        part = (m.packed_spec.get("parts") or [{}])[0]
        storage = "float8 storage, " if part.get("storage") == "float8" else ""
        why = (f"activations fake-quantized: {w8a8_problem}" if m.quant_acts
               else "no kernel for this format/layer type")
        decode = "decoded once (dense fp32 cache)" if once else "decode per forward"
        return {"compute": "simulated", "kernel": f"{storage}{decode} + fp32 {'conv' if isinstance(m, nn.Conv2d) else 'matmul'}",
                "reason": why}
    if mask is not None and isinstance(m, nn.Linear) and is_two_four(mask):
        if device.type == "cuda":
            return {"compute": "real", "kernel": "torch semi-structured 2:4 sparse"}
        return {"compute": "simulated", "kernel": "dense fp32 with zeros", "reason": "2:4 sparse kernels need a GPU"}
    return {}


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


# ---- swaps --------------------------------------------------------------------------------------


def _bnb_linear(m: PackedMixin, target: str, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    w = m.quantized_weight().detach().to(torch.float32)
    bias = m.bias is not None
    if target == "int8":
        new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
        new.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias, compute_dtype=torch.float32, quant_type=target)
        new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=target)
    if bias:
        new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    new = new.to(device)
    new.eval()
    with torch.no_grad():  # probe: bnb's inference kernels reject some shapes (e.g. in_features=32)
        new(torch.zeros(2, m.in_features, device=device))
    return new


class ScaledMMLinear(nn.Module):
    """FP8 W8A8 Linear on ``torch._scaled_mm``: E4M3 weight codes, per-tensor E4M3 activations (GPU)."""

    def __init__(self, m: PackedMixin):
        super().__init__()
        part = m.packed_spec["parts"][0]
        self.out_features, self.in_features = m.out_features, m.in_features
        self.register_buffer("w8", m.qweight0.reshape(self.out_features, -1).contiguous())
        self.register_buffer("w_scale", m.wscale0.reshape(-1).to(torch.float32).contiguous())
        self.act_quant = m.act_quant
        self.bias = m.bias
        self.grouped = part["n_groups"] != 1

    def forward(self, x: Tensor) -> Tensor:
        s = self.act_quant.scale[self.act_quant.current_group()].reshape(()).to(torch.float32)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x8 = (x2.to(torch.float32) / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        ones = torch.ones((), device=x.device, dtype=torch.float32)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=s.reshape(()), scale_b=ones, out_dtype=torch.float32)
        y = y * self.w_scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def decode_weights_once(pipe) -> int:
    """``decode: once``: every packed layer still computing in float decodes its weight now and
    keeps it dense (no per-forward decode; memory of the float weight). Returns the layer count."""
    n = 0
    for module in module_components(pipe).values():
        for m in module.modules():
            if isinstance(m, PackedMixin) and not m.decoded_once:
                m.decode_once()
                n += 1
    return n


def use_real_kernels(pipe, state=None, device: str | torch.device | None = None) -> dict[str, dict[str, str]]:
    """Swap every layer that has a real kernel (see the module docstring); return the final plan.

    Layers whose kernel fails its probe stay simulated; the plan entry says why.
    """
    comps = module_components(pipe)
    if device is None:
        device = next((p.device for c in comps.values() for p in c.parameters()), torch.device("cpu"))
    device = torch.device(device)
    plan = kernel_plan(pipe, state, device)
    for key, entry in plan.items():
        if entry["compute"] != "real":
            continue
        comp, _, name = key.partition("/")
        m = comps[comp].get_submodule(name)
        try:
            if entry["kernel"] == CPU_W8A8:
                new = onednn_w8a8(m)
            elif entry["kernel"].startswith("bitsandbytes"):
                new = _bnb_linear(m, _bnb_target(m), device)
            elif entry["kernel"].startswith("torch._scaled_mm"):
                new = ScaledMMLinear(m)
                if new.grouped:
                    raise ValueError("grouped FP8 weight scales")
            else:
                from torch.sparse import to_sparse_semi_structured

                new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=device, dtype=m.weight.dtype)
                new.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
                if m.bias is not None:
                    new.bias = m.bias
        except Exception as exc:  # a kernel that rejects this shape/device: stay simulated, say why
            entry.update(compute="simulated", reason=f"{entry['kernel']} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        swap_module(comps[comp], name, new)
    return plan
