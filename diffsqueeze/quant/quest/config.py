"""Config of the ``quest`` stage (YAML keys = field names, docs/methods.md §6); validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from diffsqueeze.errors import RecipeError


def _positive(obj, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    """Raise :class:`RecipeError` at the first of ``names`` that is not > 0 (>= 0 for ``allow_zero``)."""
    for name in names:
        v = getattr(obj, name)
        if v < 0 or (v == 0 and name not in allow_zero):
            raise RecipeError(name, f"must be {'>= 0' if name in allow_zero else '> 0'}, got {v}")


@dataclass(frozen=True)
class QuestStage1Config:
    """Stage 1 (time-embedding layers), per calibration timestep.

    Attributes:
        epochs: epochs per timestep over its samples (QuEST code: 200-400; 0 skips stage 1).
        samples: calibration samples per timestep (paper: 2-8).
        batch_size: samples per optimizer step.
        lr: Adam lr of weights, biases and rounding variables (paper: 1e-5).
        act_lr: Adam lr of the layers' activation scales (paper: same optimizer, 1e-5).
        learn_rounding: also train AdaRound rounding variables V (hard rounding in the forward,
            soft-rounding gradient); the weights are hard-rounded at the end.
    """

    epochs: int = 300
    samples: int = 8
    batch_size: int = 8
    lr: float = 1e-5
    act_lr: float = 1e-5
    learn_rounding: bool = True

    def __post_init__(self) -> None:
        _positive(self, ("epochs", "samples", "batch_size", "lr", "act_lr"), allow_zero=("epochs", "lr", "act_lr"))


@dataclass(frozen=True)
class QuestStage2Config:
    """Stage 2 (bit-sensitive layers), epochs over all calibration timesteps.

    Attributes:
        epochs: passes over all timesteps (paper: 20; 0 skips stage 2).
        samples: calibration samples per timestep (paper: 64).
        batch_size: samples per optimizer step.
        lr: Adam lr of the selected layers' weights (paper: 1e-5).
        act_lr: Adam lr of all activation scales of the current timestep group (paper: 1e-4).
    """

    epochs: int = 20
    samples: int = 64
    batch_size: int = 8
    lr: float = 1e-5
    act_lr: float = 1e-4

    def __post_init__(self) -> None:
        _positive(self, ("epochs", "samples", "batch_size", "lr", "act_lr"), allow_zero=("epochs", "lr", "act_lr"))


@dataclass(frozen=True)
class SensitiveLayersConfig:
    """Which layers stage 2 finetunes.

    Attributes:
        select: ``pattern`` (layers matching ``patterns``) or ``sensitivity`` (the ``top_k``
            quantized layers among ``candidates`` by measured sensitivity).
        patterns: globs on layer names (default: transformer feed-forward layers, QuEST's SD
            choice; ``["*to_q", "*to_k", "*to_v"]`` is its choice for other models).
        candidates: globs of the layers the sensitivity ranking may pick.
        top_k: layers picked from the ranking.
        samples: calibration samples per timestep for the ranking.
    """

    select: Literal["pattern", "sensitivity"] = "pattern"
    patterns: tuple[str, ...] = ("*ff.net.*",)
    candidates: tuple[str, ...] = ("*",)
    top_k: int = 8
    samples: int = 2

    def __post_init__(self) -> None:
        _positive(self, ("top_k", "samples"))
        if self.select == "pattern" and not self.patterns:
            raise RecipeError("patterns", "select: pattern needs at least one glob")


@dataclass(frozen=True)
class QuestConfig:
    """Config of the ``quest`` stage (docs/methods.md §6); runs after a ``ptq`` stage.

    Attributes:
        component: the quantized component (``denoiser`` or a component name).
        time_layers: ``[auto]`` (measured, see
            :func:`~diffsqueeze.quant.quest.time_layers.detect_time_layers`) or globs of layer names.
        sensitive_layers: stage 2's layer selection.
        exclude: globs of layers never finetuned.
        stage1 / stage2: schedules of the two stages.
        layer_loss_weight: weight of the per-layer output MSE terms (paper: 1).
        gradient_checkpointing: recompute the student's blocks in the backward pass (diffusers'
            own checkpointing; trades ~30% time for activation memory on large models).
        measure_error: report the denoiser-output MSE against the teacher before and after.
    """

    component: str = "denoiser"
    time_layers: tuple[str, ...] = ("auto",)
    sensitive_layers: SensitiveLayersConfig = field(default_factory=SensitiveLayersConfig)
    exclude: tuple[str, ...] = ()
    stage1: QuestStage1Config = field(default_factory=QuestStage1Config)
    stage2: QuestStage2Config = field(default_factory=QuestStage2Config)
    layer_loss_weight: float = 1.0
    gradient_checkpointing: bool = False
    measure_error: bool = True

    def __post_init__(self) -> None:
        if not self.time_layers:
            raise RecipeError("time_layers", "[auto] or at least one glob (set stage1.epochs: 0 to skip stage 1)")
        if "auto" in self.time_layers and len(self.time_layers) > 1:
            raise RecipeError("time_layers", "'auto' cannot be combined with globs")
        if self.layer_loss_weight < 0:
            raise RecipeError("layer_loss_weight", f"must be >= 0, got {self.layer_loss_weight}")
