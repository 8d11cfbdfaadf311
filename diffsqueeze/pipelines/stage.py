"""The Stage protocol and the entry that names a stage with its config class.

The shipped stages are listed in :mod:`diffsqueeze.stages` (a static table the recipe loader
and the runner read); a new stage is one class here-shaped and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

from diffsqueeze.pipelines.stage_helpers import stage_component

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from diffsqueeze.pipelines.context import StageContext


class Stage(Protocol):
    """One compression step. ``apply`` edits the pipeline's components in place."""

    config: Any

    def check(self, pipe: "DiffusionPipeline") -> None:
        """Raise a RecipeError if the config cannot apply to this pipeline (runs before any stage)."""

    def writes(self, pipe: "DiffusionPipeline") -> set[str]:
        """Names of the components ``apply`` changes; the teacher shares every other component
        with the student instead of holding a second copy."""

    def apply(self, pipe: "DiffusionPipeline", ctx: "StageContext") -> dict:
        """Run the stage; return a JSON-able summary for the manifest."""


class ComponentStage:
    """Base of a stage that changes one component, the one its config's ``component`` key names
    (the denoiser by default): it keeps the config, and :meth:`writes` is that component."""

    def __init__(self, config: Any):
        self.config = config

    def writes(self, pipe: "DiffusionPipeline") -> set[str]:
        """The component this stage changes (the teacher loads it afresh and shares the rest)."""
        return {stage_component(pipe, self.config.component)}


@dataclass(frozen=True)
class StageEntry:
    """A registered stage: its config dataclass, the class that runs it, and whether it reads the
    calibration recording (the runner then records it before the first stage changes the model)."""

    name: str
    config_cls: type
    stage_cls: Callable[[Any], Stage]
    calibrated: bool = False
