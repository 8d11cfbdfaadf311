"""One entry of the kernel table: a real kernel, which layers it is for, and how it is built.

A kernel :attr:`Kernel.considers` a layer when the layer is of the kind it computes (e.g. a packed
Linear layer with 8-bit INT weights and quantized activations); :attr:`Kernel.problem` then says
why it cannot run this particular layer on this device (``None``: it can), and :attr:`Kernel.build`
makes the module that replaces the layer. Predicates read the layer's record and its number
formats (:func:`part_formats`), never buffer names; only ``build`` touches the stored tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from diffsqueeze.quant.nn.packed import PackedMixin
from diffsqueeze.quant.primitives.formats import NumberFormat, parse_format


@dataclass(frozen=True)
class Kernel:
    """A real kernel of the table in :mod:`diffsqueeze.quant.export.kernels`.

    Attributes:
        name: What plans and ``inspect`` show.
        considers: ``fn(layer, mask) -> bool``: the layer is of the kind this kernel computes
            (its reason counts when the layer stays simulated).
        problem: ``fn(layer, device, mask) -> reason | None``: why it cannot run this layer here.
        build: ``fn(layer, device) -> module`` put in the layer's place; it may raise (the layer
            then stays simulated with the error as its reason).
    """

    name: str
    considers: Callable[[nn.Module, Tensor | None], bool]
    problem: Callable[[nn.Module, torch.device, Tensor | None], str | None]
    build: Callable[[nn.Module, torch.device], nn.Module]


def part_formats(m: nn.Module) -> list[NumberFormat]:
    """The number format of each weight part of a packed INT/FP/block layer ([] for any other layer)."""
    if not isinstance(m, PackedMixin):
        return []
    return [parse_format(p["format"]) for p in m.packed_spec.get("parts") or []]


def single_part(m: nn.Module) -> tuple[NumberFormat, dict] | None:
    """``(format, part spec)`` of a packed layer with one weight part, else None."""
    formats = part_formats(m)
    return (formats[0], m.packed_spec["parts"][0]) if len(formats) == 1 else None


def weight_only_linear(m: nn.Module) -> NumberFormat | None:
    """The weight format of a packed Linear layer with one part, float activations, no low-rank
    branch and no smoothing scale (the layers bitsandbytes' weight-only kernels take)."""
    one = single_part(m)
    if one is None or not isinstance(m, nn.Linear) or m.quant_acts:
        return None
    if getattr(m, "lowrank_rank", 0) or getattr(m, "smooth", None) is not None:
        return None
    return one[0]
