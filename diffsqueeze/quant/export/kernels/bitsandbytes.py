"""bitsandbytes' weight-only kernels for packed Linear layers (CPU and GPU): 8-bit INT weights ->
``Linear8bitLt``, FP4 E2M1 -> ``Linear4bit`` ``fp4``, 4-bit INT -> ``Linear4bit`` ``nf4``.

bitsandbytes re-quantizes the decoded weight on its own grid (per-row absmax int8, blockwise-64
absmax 4-bit), so results differ slightly from the simulated layer. Shapes its CPU 4-bit kernel
rejects stay simulated with the reason; the others are probed with a dummy forward in ``build``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffsqueeze.quant.export.kernels.kernel import Kernel, weight_only_linear
from diffsqueeze.quant.primitives.formats import NumberFormat


def _is_int(bits: int):
    return lambda fmt: fmt.kind == "int" and fmt.bits == bits


def _is_e2m1(fmt: NumberFormat) -> bool:
    return fmt.name in ("fp4_e2m1", "fp4_e2m1_hw")


def _build(target: str):
    def build(m: nn.Module, device: torch.device) -> nn.Module:
        import bitsandbytes as bnb

        w = m.quantized_weight().detach().to(torch.float32)
        bias = m.bias is not None
        if target == "int8":
            new = bnb.nn.Linear8bitLt(m.in_features, m.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
            new.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=bias, compute_dtype=torch.float32,
                                    quant_type=target)
            new.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=target)
        if bias:
            new.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        new = new.to(device)
        new.eval()
        with torch.no_grad():  # probe: bnb's inference kernels reject some shapes (e.g. in_features=32)
            new(torch.zeros(2, m.in_features, device=device))
        return new

    return build


def _four_bit_problem(m: nn.Module, device: torch.device, mask) -> str | None:
    if device.type == "cpu" and (m.in_features % 64 or m.out_features % 32):
        return (f"bitsandbytes' CPU 4-bit inference kernel rejects in_features={m.in_features}, "
                f"out_features={m.out_features} (needs multiples of 64 / 32)")
    return None


def _kernel(target: str, module: str, takes) -> Kernel:
    return Kernel(
        name=f"bitsandbytes {module} {target}",
        considers=lambda m, mask: (fmt := weight_only_linear(m)) is not None and takes(fmt),
        problem=(lambda m, device, mask: None) if target == "int8" else _four_bit_problem,
        build=_build(target),
    )


INT8 = _kernel("int8", "Linear8bitLt", _is_int(8))
FP4 = _kernel("fp4", "Linear4bit", _is_e2m1)
NF4 = _kernel("nf4", "Linear4bit", _is_int(4))
