"""What the exports that plain diffusers loads (GGUF, torchao) share about one compressed component:
its tensors outside the quantized layers, their smallest exact float dtype, and the check that the
written keys are exactly those of the diffusers model class (so its loader needs no conversion)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from diffsqueeze.errors import DiffsqueezeError

__all__ = ["check_diffusers_keys", "exact_float", "plain_tensors"]


def exact_float(t: Tensor) -> Tensor:
    """``t`` on the CPU, contiguous: float16 when every value survives it exactly, else float32
    (ints and bools as they are); diffusers casts float tensors to the loading dtype."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t.contiguous()
    t32 = t.float()
    half = t32.half()
    return (half if torch.equal(half.float(), t32) else t32).contiguous()


def plain_tensors(component: nn.Module, quantized: set[str]) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) of every parameter and persistent buffer outside the modules ``quantized``
    (their names) and their children, with diffusers' key names."""
    inside = tuple(f"{n}." for n in quantized)
    for name, module in component.named_modules():
        if name in quantized or name.startswith(inside):
            continue
        tensors = [*module.named_parameters(recurse=False),
                   *((n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set)]
        for pname, t in tensors:
            if t is not None:
                yield (f"{name}.{pname}" if name else pname), t


def check_diffusers_keys(component: nn.Module, keys: set[str], error: type[DiffsqueezeError], what: str) -> None:
    """Raise ``error`` unless ``keys`` are exactly the diffusers model's (built from its config on
    the meta device); ``what`` names the file kind in the message."""
    cls = type(component)
    with torch.device("meta"):
        want = set(cls.from_config(component.config).state_dict())
    missing, extra = sorted(want - keys), sorted(keys - want)
    if missing or extra:
        raise error(f"{cls.__name__}: the {what} keys differ from diffusers' (missing {missing[:5]}, extra "
                    f"{extra[:5]}); this component holds modules a plain {cls.__name__} does not have "
                    "(quantized attention?)")
