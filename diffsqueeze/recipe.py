"""Recipes: YAML -> a frozen, validated :class:`Recipe`; ``key.sub=value`` overrides.

Everything a run does is decided here, before any model is loaded: unknown keys, wrong types,
out-of-range values, unknown stages and models fail with the key path in the message.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffsqueeze.config_parse import build_dataclass, join_path, to_plain
from diffsqueeze.errors import DiffsqueezeError, ModelLoadError, RecipeError
from diffsqueeze.metrics.config import EvalConfig
from diffsqueeze.stages import STAGES

RECIPE_KEYS = ("model", "output_dir", "seed", "device", "dtype", "calibration", "stages", "eval")


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration data comes from (METHODS 1); used by the stages that need it.

    Attributes:
        prompts: prompt set (``builtin``, ``builtin:NAME``) or a text file.
        num_samples: samples recorded per calibration timestep.
        timesteps: number of calibration timesteps ``n_t``, uniform over the trajectory.
        num_inference_steps: sampler steps of the calibration trajectories.
        guidance_scale: classifier-free guidance scale (conditional and unconditional inputs recorded).
        batch_size: pipeline batch size while recording.
        sampler: ``default`` (the pipeline's own scheduler) or a diffusers scheduler class name
            (``DDIMScheduler``) built from the pipeline's scheduler config for the recording.
    """

    prompts: str = "builtin"
    num_samples: int = 32
    timesteps: int = 10
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 8
    sampler: str = "default"

    def __post_init__(self) -> None:
        for name in ("num_samples", "timesteps", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.timesteps > self.num_inference_steps:
            raise RecipeError("timesteps", f"{self.timesteps} calibration timesteps cannot come from "
                              f"{self.num_inference_steps} sampler steps (num_inference_steps)")
        if self.sampler != "default" and not (self.sampler.isidentifier() and self.sampler.endswith("Scheduler")):
            raise RecipeError("sampler", f"'default' or a diffusers scheduler class name like DDIMScheduler; got {self.sampler!r}")
        if not self.prompts.startswith("builtin"):
            from diffsqueeze.models.prompts import load_prompts

            try:
                load_prompts(self.prompts)  # missing or empty prompt file: fail before any work
            except DiffsqueezeError as exc:
                raise RecipeError("prompts", str(exc)) from None


@dataclass(frozen=True)
class StageSpec:
    """One entry of ``stages``: the stage's registered name and its validated config."""

    name: str
    config: Any

    def to_plain(self) -> dict:
        return {self.name: to_plain(self.config)}


@dataclass(frozen=True)
class Recipe:
    """A whole compression run. YAML keys are the field names."""

    model: str
    output_dir: str
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stages: tuple[StageSpec, ...] = ()
    eval: EvalConfig | None = None

    def to_plain(self) -> dict:
        """The resolved recipe (defaults filled in) as plain JSON-able data."""
        out = {k: to_plain(getattr(self, k)) for k in RECIPE_KEYS}
        return out

    def stage_hashes(self) -> list[str]:
        """Hash chain: stage i's hash covers the model, seed, dtype, calibration and stages 0..i.

        Changing a later stage (or ``eval``, ``device``, ``output_dir``) keeps earlier stages'
        hashes, so ``--resume`` reuses their checkpoints.
        """
        base = {k: to_plain(getattr(self, k)) for k in ("model", "seed", "dtype", "calibration")}
        h = _sha(base)
        hashes = []
        for spec in self.stages:
            h = _sha({"prev": h, "stage": spec.to_plain()})
            hashes.append(h)
        return hashes

    def recipe_hash(self) -> str:
        """Hash of everything that changes the run's outputs."""
        plain = self.to_plain()
        plain.pop("output_dir")
        plain.pop("device")
        return _sha(plain)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def parse_stages(data: Any) -> tuple[StageSpec, ...]:
    """Parse the ``stages`` list: each item is ``{<registered stage name>: {config}}``."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise RecipeError("stages", f"expected a list of {{stage_name: config}} items, got {type(data).__name__}")
    registry = STAGES
    specs = []
    for i, item in enumerate(data):
        path = f"stages[{i}]"
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(path, f"each stage is a mapping with exactly one key, the stage name; got {item!r}")
        name, config = next(iter(item.items()))
        if name not in registry:
            raise RecipeError(join_path(path, str(name)), f"unknown stage; known stages: {', '.join(sorted(registry))}")
        specs.append(StageSpec(name, build_dataclass(registry[name].config_cls, config, join_path(path, name))))
    return tuple(specs)


def recipe_from_dict(data: Any) -> Recipe:
    """Validate raw recipe data (as read from YAML, overrides applied) into a :class:`Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError("", f"a recipe is a YAML mapping with keys {', '.join(RECIPE_KEYS)}; got {type(data).__name__}")
    data = dict(data)
    stages = parse_stages(data.pop("stages", None))
    recipe = build_dataclass(Recipe, data)
    recipe = Recipe(**{**{k: getattr(recipe, k) for k in RECIPE_KEYS if k != "stages"}, "stages": stages})
    _check_recipe(recipe)
    return recipe


def _check_recipe(recipe: Recipe) -> None:
    from diffsqueeze.models import (
        check_model_spec,  # heavy import, only once a recipe parses
    )

    try:
        check_model_spec(recipe.model)
    except ModelLoadError as exc:
        raise RecipeError("model", str(exc)) from None
    if not recipe.output_dir.strip():
        raise RecipeError("output_dir", "must name a directory")
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise RecipeError("output_dir", f"'{out}' exists and is not a directory")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.0.c=value`` overrides (value parsed as YAML) to a copy of raw recipe data.

    Raises:
        RecipeError: malformed override, or a list index that does not exist.
    """
    data = _fresh_copy(data)
    for text in overrides:
        if "=" not in text:
            raise RecipeError(text, "an override is KEY.PATH=VALUE (for example stages.0.prune.targets.unet=0.5)")
        key, raw = text.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(text, "empty key in override")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(where, f"no list item {part!r} (the list has {len(node)} items)")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(where, f"cannot set a key inside {type(node).__name__} {node!r}")
    return data


def _fresh_copy(obj: Any) -> Any:
    """Copy without the aliasing that deepcopy keeps (YAML anchors share one object)."""
    if isinstance(obj, dict):
        return {k: _fresh_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fresh_copy(v) for v in obj]
    return obj


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Raises:
        RecipeError: missing file, invalid YAML, or any validation failure.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError("", f"recipe file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError("", f"'{path}' is not valid YAML: {exc}") from None
    return recipe_from_dict(apply_overrides(data or {}, overrides or []))
