"""The Stage protocol and the entry that names a stage with its config class.

The shipped stages are listed in :mod:`diffsqueeze.stages` (a static table the recipe loader
and the runner read); a new stage is one class here-shaped and one line there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

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


@dataclass(frozen=True)
class StageEntry:
    """A registered stage: its config dataclass, the class that runs it, and whether it reads the
    calibration recording (the runner then records it before the first stage changes the model)."""

    name: str
    config_cls: type
    stage_cls: Callable[[Any], Stage]
    calibrated: bool = False
