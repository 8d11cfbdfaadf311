"""The ``prune`` stage: post-training magnitude pruning per component (docs/methods.md §8)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.errors import RecipeError
from diffsqueeze.models.roles import module_components
from diffsqueeze.pipelines.context import StageContext
from diffsqueeze.pipelines.stage_helpers import matches_any, stage_component
from diffsqueeze.prune.magnitude import iter_smallest_k_masks, n_m_mask, n_to_prune, smallest_k_mask
from diffsqueeze.prune.masks import enforce_masks, mask_key

LAYER_TYPES = {"linear": (torch.nn.Linear,), "conv": (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)}
NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class PruneConfig:
    """Config of the ``prune`` stage.

    Attributes:
        targets: component name (or ``denoiser``) -> fraction of counted weights to zero, in [0, 1).
        scope: ``global`` ranks all counted weights of a component together; ``layer`` prunes each
            layer to the target.
        pattern: ``unstructured`` or ``"N:M"`` (keep N of every M consecutive input weights; the
            sparsity is then 1 - N/M, and ``targets`` must say so).
        include: globs on module names inside the component (``down_blocks.*``); a module counts if
            it matches one.
        exclude: globs removing modules from ``include``.
        layer_types: which weights count: ``linear``, ``conv``. Norms, biases, embeddings never do.
    """

    targets: dict[str, float]
    scope: str = "global"
    pattern: str = "unstructured"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layer_types: tuple[str, ...] = ("conv", "linear")

    def __post_init__(self) -> None:
        if not self.targets:
            raise RecipeError("targets", "name at least one component, e.g. {unet: 0.35}")
        for comp, value in self.targets.items():
            if not 0.0 <= value < 1.0:
                raise RecipeError(f"targets.{comp}", f"sparsity must be in [0, 1), got {value}")
        if self.scope not in ("global", "layer"):
            raise RecipeError("scope", f"must be 'global' or 'layer', got {self.scope!r}")
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                raise RecipeError("layer_types", f"unknown layer type {t!r}; known: {', '.join(LAYER_TYPES)}")
        if self.pattern != "unstructured":
            nm = self.n_m
            if nm is None:
                raise RecipeError("pattern", f"must be 'unstructured' or 'N:M' like '2:4', got {self.pattern!r}")
            n, m = nm
            implied = 1.0 - n / m
            for comp, value in self.targets.items():
                if abs(value - implied) > 1e-9:
                    raise RecipeError(f"targets.{comp}", f"pattern {self.pattern} prunes exactly {implied:g} of the "
                                      f"weights; set the target to {implied:g} (got {value})")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, or None for unstructured."""
        match = NM_PATTERN.match(self.pattern)
        if not match:
            return None
        n, m = int(match.group(1)), int(match.group(2))
        return (n, m) if 0 < n < m else None


def prunable_weights(module_root: torch.nn.Module, cfg: PruneConfig) -> dict[str, torch.nn.Parameter]:
    """Weights that count for pruning, by module name: layer type, include and exclude globs."""
    types = tuple(t for name in cfg.layer_types for t in LAYER_TYPES[name])
    out = {}
    for name, module in module_root.named_modules():
        if not isinstance(module, types) or getattr(module, "weight", None) is None:
            continue
        if not matches_any(name, cfg.include) or matches_any(name, cfg.exclude):
            continue
        out[name] = module.weight
    return out


class PruneStage:
    """Zero the smallest-magnitude weights; masks go into the compression state."""

    def __init__(self, config: PruneConfig):
        self.config = config

    def components(self, pipe: DiffusionPipeline) -> dict[str, str]:
        """Recipe key -> component name (``denoiser`` resolves to ``unet`` / ``transformer``)."""
        return {key: stage_component(pipe, key, f"targets.{key}") for key in self.config.targets}

    def writes(self, pipe: DiffusionPipeline) -> set[str]:
        """The components this stage changes (the teacher loads these afresh, shares the rest)."""
        return set(self.components(pipe).values())

    def check(self, pipe: DiffusionPipeline) -> None:
        modules = module_components(pipe)
        for key, comp in self.components(pipe).items():
            if not prunable_weights(modules[comp], self.config):
                raise RecipeError(f"targets.{key}", f"no {'/'.join(self.config.layer_types)} weight of '{comp}' "
                                  f"matches include={list(self.config.include)} exclude={list(self.config.exclude)}")

    @torch.no_grad()
    def apply(self, pipe: DiffusionPipeline, ctx: StageContext) -> dict:
        modules = module_components(pipe)
        summary = {"scope": self.config.scope, "pattern": self.config.pattern, "components": {}}
        for key, comp in self.components(pipe).items():
            weights = prunable_weights(modules[comp], self.config)
            masks = self._masks(weights, self.config.targets[key], ctx, comp)
            layers = {}
            for name, mask in masks:  # one at a time, packed into the state: never all of them as bool
                mask = mask.cpu()
                k = mask_key(comp, f"{name}.weight")
                old = ctx.state.masks.get(k)
                mask = mask if old is None else (old & mask)
                ctx.state.masks[k] = mask
                layers[name] = {"numel": mask.numel(), "sparsity": round(1 - int(mask.sum()) / mask.numel(), 6)}
            total = sum(v["numel"] for v in layers.values())
            pruned = sum(round(v["sparsity"] * v["numel"]) for v in layers.values())
            summary["components"][comp] = {
                "target": self.config.targets[key],
                "achieved": pruned / total,
                "counted_weights": total,
                "pruned_weights": pruned,
                "layers": layers,
            }
            ctx.mark_changed(comp)
        enforce_masks(pipe, ctx.state.masks)
        return summary

    def _masks(self, weights: dict[str, torch.nn.Parameter], target: float, ctx: StageContext,
               comp: str) -> Iterator[tuple[str, torch.Tensor]]:
        """``(layer name, keep-mask)`` pairs, one mask computed at a time."""
        cfg = self.config
        names = list(weights)
        # Already-pruned weights are zero, hence the smallest: they stay pruned.
        if cfg.n_m is not None:
            n, m = cfg.n_m
            for name in ctx.progress(names, desc=f"prune {comp} {cfg.pattern}"):
                w = weights[name]
                if w[0].numel() % m:  # row length not a multiple of M: left dense, reported as 0
                    yield name, torch.ones_like(w, dtype=torch.bool)
                else:
                    yield name, n_m_mask(w, n, m)
        elif cfg.scope == "layer":
            for name in ctx.progress(names, desc=f"prune {comp} per layer"):
                yield name, smallest_k_mask([weights[name]], n_to_prune(weights[name].numel(), target), absolute=True)[0]
        else:
            k = n_to_prune(sum(weights[n].numel() for n in names), target)
            yield from zip(names, iter_smallest_k_masks([weights[n] for n in names], k, absolute=True))
