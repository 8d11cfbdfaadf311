"""FP8 W8A8 Linear on ``torch._scaled_mm`` (GPUs with FP8 support): the packed E4M3 weight codes as
they are stored, activations quantized per tensor to E4M3 with the layer's calibrated scale."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffsqueeze.quant.export.kernels.kernel import Kernel, single_part

NAME = "torch._scaled_mm fp8 e4m3 W8A8"


class ScaledMMLinear(nn.Module):
    """FP8 W8A8 Linear on ``torch._scaled_mm``: E4M3 weight codes, per-tensor E4M3 activations (GPU)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.out_features, self.in_features = m.out_features, m.in_features
        self.register_buffer("w8", m.qweight0.reshape(self.out_features, -1).contiguous())
        self.register_buffer("w_scale", m.wscale0.reshape(-1).to(torch.float32).contiguous())
        self.act_quant = m.act_quant
        self.bias = m.bias

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


def _considers(m: nn.Module, mask) -> bool:
    one = single_part(m)
    return one is not None and isinstance(m, nn.Linear) and m.quant_acts and one[0].torch_dtype is not None


def _problem(m: nn.Module, device: torch.device, mask) -> str | None:
    fmt, part = single_part(m)
    if fmt.torch_dtype != torch.float8_e4m3fn:
        return f"weights {fmt.name}: the FP8 matmul takes E4M3 weights"
    if part["n_groups"] != 1:
        return "group-wise weight scales: the FP8 matmul takes one scale per output channel"
    if getattr(m, "smooth", None) is not None:
        return "smoothing scale: not folded into the FP8 matmul's input quantization"
    act = m.config.get("act") or {}
    if (act.get("format") is None or m.act_quant.fmt.torch_dtype != torch.float8_e4m3fn
            or list(act.get("shape", [1])) != [1] or int(act.get("groups", 1)) != 1 or act.get("group_size")):
        return "the FP8 matmul takes E4M3 activations with one static scale per tensor"
    if device.type != "cuda":
        return "the FP8 matmul (torch._scaled_mm) needs a CUDA GPU"
    return None


KERNEL = Kernel(name=NAME, considers=_considers, problem=_problem, build=lambda m, device: ScaledMMLinear(m))
