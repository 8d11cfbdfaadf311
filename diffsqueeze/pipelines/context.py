"""What a stage gets besides the pipeline: the teacher, the run directory, seed, device, progress."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import torch
from tqdm.auto import tqdm

from diffsqueeze.models.state import CompressionState
from diffsqueeze.pipelines.calibration_config import CalibrationConfig
from diffsqueeze.pipelines.faults import maybe_kill

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """Shared services of a run, handed to each stage's ``apply``.

    It carries what stages read of the recipe, not the recipe itself: the model spec and seed
    that key the calibration recording, and the ``calibration:`` section.

    Attributes:
        index: position of the running stage in the recipe's ``stages``.
        run_dir: the run directory (stages may keep caches here, e.g. calibration data).
        device: where compute happens.
        seed: the stage's own seed, derived from the recipe seed and the stage index.
        state: masks and module records; stages add to it.
        teacher_factory: loads the frozen original pipeline (called once, by :meth:`teacher`).
        model_spec: the recipe's ``model`` (what the teacher and the calibration are read from).
        recipe_seed: the recipe's ``seed`` (the calibration trajectories' seed).
        calibration: the recipe's ``calibration:`` section (None where no stage calibrates).
        changed: names of components whose weights any stage so far has changed (checkpointed).
    """

    index: int
    run_dir: Path
    device: torch.device
    seed: int
    state: CompressionState
    teacher_factory: Callable[[], "DiffusionPipeline"]
    model_spec: str | None = None
    recipe_seed: int = 0
    calibration: CalibrationConfig | None = None
    changed: set[str] = field(default_factory=set)
    _teacher: "DiffusionPipeline | None" = None

    def teacher(self) -> "DiffusionPipeline":
        """The frozen original pipeline, loaded on first use and kept for later stages."""
        if self._teacher is None:
            pipe = self.teacher_factory()
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module):
                    component.eval().requires_grad_(False)
            self._teacher = pipe
        return self._teacher

    def mark_changed(self, component: str) -> None:
        """Record that ``component``'s weights changed, so checkpoints include it."""
        self.changed.add(component)

    def progress(self, iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar; each step is a crash-injection point (``tick``)."""
        for item in tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True):
            yield item
            maybe_kill("tick")
