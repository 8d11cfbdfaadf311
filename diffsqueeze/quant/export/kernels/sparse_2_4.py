"""Float Linear layers whose pruning mask is 2:4 semi-structured -> torch's semi-structured sparse
matmul (GPU)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffsqueeze.quant.export.kernels.kernel import Kernel


def is_two_four(mask: Tensor) -> bool:
    """True if every group of 4 consecutive inputs keeps at most 2 (2:4 semi-structured)."""
    if mask.dim() != 2 or mask.shape[1] % 4:
        return False
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) <= 2).all())


def _build(m: nn.Module, device: torch.device) -> nn.Module:
    from torch.sparse import to_sparse_semi_structured

    new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=device, dtype=m.weight.dtype)
    new.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    if m.bias is not None:
        new.bias = m.bias
    return new


KERNEL = Kernel(
    name="torch semi-structured 2:4 sparse",
    # float layers only: a quantized layer (QuantMixin) would lose its quantizers
    considers=lambda m, mask: (mask is not None and isinstance(m, nn.Linear) and not hasattr(m, "act_quantizers")
                               and is_two_four(mask)),
    problem=lambda m, device, mask: None if device.type == "cuda" else "2:4 sparse kernels need a GPU",
    build=_build,
)
