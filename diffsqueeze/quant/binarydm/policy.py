"""The layer policy of the ``binarize`` stage: which layers binarize, with which order, and when
progressive initialization switches them on (docs/methods.md §7).

The denoiser's *blocks* (children named ``*block*``: every entry of ``down_blocks``,
``up_blocks``, ``transformer_blocks``, ... and ``mid_block``) are taken in execution order and
grouped by their distance from the middle of that sequence: group 0 is the innermost (the UNet
mid block), the last group the outermost (first down and last up block; first and last
transformer block). Linear/Conv2d layers outside every block and those matching ``keep_fp`` stay
FP; the layers of the ``order2_groups`` outermost groups (and ``order2`` globs) get order 2, the
rest ``order``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from diffsqueeze.pipelines.stage_helpers import first_call_order, matches_any
from diffsqueeze.quant.binarydm.config import BinarizeConfig
from diffsqueeze.quant.nn.binary_layers import BinaryMixin


def block_candidates(root: nn.Module) -> list[str]:
    """Children named ``*block*``: each entry of a ModuleList (``down_blocks.0``) or the module itself."""
    out = []
    for name, child in root.named_children():
        if "block" not in name.lower():
            continue
        if isinstance(child, nn.ModuleList):
            out += [f"{name}.{i}" for i in range(len(child))]
        else:
            out.append(name)
    return out


def block_groups(denoiser: nn.Module, kwargs: dict) -> tuple[list[str], list[list[str]]]:
    """Blocks in execution order and their groups, innermost (distance 0 from the middle) first.

    Only the blocks that one forward pass on ``kwargs`` calls count (an uncalled block would
    shift the middle and with it every group).
    """
    order = first_call_order(denoiser, block_candidates(denoiser), kwargs, called_only=True)
    mid = (len(order) - 1) / 2
    dists = sorted({abs(i - mid) for i in range(len(order))})
    groups = [[n for i, n in enumerate(order) if abs(i - mid) == d] for d in dists]
    return order, groups


def progressive_schedule(iters: int, fraction: float, n_groups: int) -> tuple[int, dict[int, int]]:
    """Progressive initialization: ``P = int(fraction * iters)`` steps; group ``g`` (0 = innermost)
    is binarized from step ``g * P // G``; activation quantizers switch on at step ``P``."""
    steps = int(fraction * iters)
    return steps, {g: (g * steps) // max(n_groups, 1) for g in range(n_groups)}


@dataclass
class BinaryLayerPlan:
    """What the policy decided for one Linear/Conv2d layer.

    Attributes:
        name: the layer's name inside the component.
        order: binarization order (1 or 2); ``None`` keeps the layer FP.
        group: progressive-initialization group (innermost 0); -1 for FP layers.
        why: why an FP layer stays FP (empty for binarized layers).
    """

    name: str
    order: int | None
    group: int
    why: str = ""


def plan_layers(denoiser: nn.Module, blocks: list[str], groups: list[list[str]], cfg: BinarizeConfig) -> list[BinaryLayerPlan]:
    """Which Linear/Conv2d layers are binarized, with which order and progressive group."""
    group_of_block = {b: gi for gi, g in enumerate(groups) for b in g}
    n_groups = len(groups)
    plans = []
    for name, m in denoiser.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or isinstance(m, BinaryMixin):
            continue
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        if not matches_any(name, cfg.include) or matches_any(name, cfg.exclude):
            continue
        if matches_any(name, cfg.keep_fp):
            plans.append(BinaryLayerPlan(name, None, -1, "keep_fp"))
            continue
        if block is None and cfg.keep_stem_fp:
            plans.append(BinaryLayerPlan(name, None, -1, "outside the blocks (stem)"))
            continue
        group = group_of_block[block] if block is not None else n_groups - 1
        outer = n_groups > 0 and group >= n_groups - cfg.order2_groups
        order = 2 if outer or matches_any(name, cfg.order2) else cfg.order
        plans.append(BinaryLayerPlan(name, order, group))
    return plans
