"""The Stage protocol and the stage registry.

A stage is registered with its config dataclass; the recipe loader finds it by name, so later
stages plug in with one ``@register_stage`` and an import in :data:`BUILTIN_STAGE_MODULES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from diffsqueeze.pipelines.context import StageContext

# Modules whose import registers the shipped stages.
BUILTIN_STAGE_MODULES = ("diffsqueeze.prune.stage", "diffsqueeze.quant.ptq", "diffsqueeze.quant.binarize_stage",
                         "diffsqueeze.quant.quest")


class Stage(Protocol):
    """One compression step. ``apply`` edits the pipeline's components in place."""

    config: Any

    def check(self, pipe: "DiffusionPipeline") -> None:
        """Raise a RecipeError if the config cannot apply to this pipeline (runs before any stage)."""

    def apply(self, pipe: "DiffusionPipeline", ctx: "StageContext") -> dict:
        """Run the stage; return a JSON-able summary for the manifest."""


@dataclass(frozen=True)
class StageEntry:
    """A registered stage: its config dataclass and the class that runs it."""

    name: str
    config_cls: type
    stage_cls: Callable[[Any], Stage]


STAGES: dict[str, StageEntry] = {}


def register_stage(name: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: register a stage class (constructed as ``cls(config)``) under ``name``."""

    def wrap(stage_cls: type) -> type:
        STAGES[name] = StageEntry(name, config_cls, stage_cls)
        return stage_cls

    return wrap


def stage_registry() -> dict[str, StageEntry]:
    """All registered stages, importing the shipped ones first."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return STAGES
