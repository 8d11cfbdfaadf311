"""Recipes: YAML -> a frozen, validated :class:`Recipe`; ``key.sub=value`` overrides.

Everything a run does is decided here, before any model is loaded: unknown keys, wrong types,
out-of-range values, unknown stages and models fail with the key path in the message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from diffsqueeze.config_parse import (
    apply_overrides,  # re-exported: recipe.apply_overrides
    build_dataclass,
    join_path,
    read_yaml_file,
    to_plain,
)
from diffsqueeze.errors import ModelLoadError, RecipeError
from diffsqueeze.metrics.config import EvalConfig, reference_problem
from diffsqueeze.pipelines.calibration_config import CalibrationConfig, check_prompts
from diffsqueeze.pipelines.manifest import check_output_dir
from diffsqueeze.stages import STAGES

__all__ = ["CalibrationConfig", "Recipe", "StageSpec", "apply_overrides", "load_recipe", "recipe_from_dict"]

log = logging.getLogger(__name__)
RECIPE_KEYS = ("model", "output_dir", "seed", "device", "dtype", "teacher", "calibration", "stages", "export", "eval")
#: Above this many recorded denoiser inputs, validation warns about the calibration's cost.
CALIBRATION_WARN_INPUTS = 100_000
#: One recorded input of a Stable Diffusion 1.5 UNet in float32 (latents 4x64x64 + text 77x768), for the estimate.
SD15_INPUT_BYTES = 4 * (4 * 64 * 64 + 77 * 768)


@dataclass(frozen=True)
class ExportConfig:
    """How the compressed model is written to ``model/``.

    Attributes:
        allow_unpacked: keep a quantized layer whose packed codes would not decode to its
            in-memory weight as a float weight (the model is then not compressed there). Off by
            default: such a layer fails the export with its name, so a run never says
            ``complete`` for a model that was not compressed.
        kernels: how the end-of-run evaluation computes with the exported model: ``simulated``
            (the in-memory model, bit-identical to the export) or ``real`` (the export reloaded
            with real low-bit kernels where its layers' formats have one: the numbers are then
            those of the deployed model; docs/artifacts.md).
        decode: ``forward`` or ``once`` (the export reloaded with its other packed layers'
            weights decoded once at load).
        formats: also write ``model/`` in these formats plain diffusers loads, each into
            ``export-<format>/`` of the run (``gguf``, ``torchao``; docs/artifacts.md), as
            ``diffsqueeze export`` does; the run is ``complete`` only once they exist.
        allow_float: for ``formats``: write a layer the format cannot express as its decoded
            weight in float (listed in the export's report) instead of failing the run.
    """

    allow_unpacked: bool = False
    kernels: Literal["simulated", "real"] = "simulated"
    decode: Literal["forward", "once"] = "forward"
    formats: tuple[Literal["gguf", "torchao"], ...] = ()
    allow_float: bool = False

    def __post_init__(self) -> None:
        if len(set(self.formats)) != len(self.formats):
            raise RecipeError("formats", f"a format is listed twice: {list(self.formats)}")

    @property
    def reload_for_eval(self) -> bool:
        return self.kernels != "simulated" or self.decode != "forward"


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
    # where the FP teacher's changed components live (models/streamed.py); never changes outputs
    teacher: Literal["auto", "resident", "stream"] = "auto"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    stages: tuple[StageSpec, ...] = ()
    export: ExportConfig = field(default_factory=ExportConfig)
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
        plain.pop("teacher")
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
    check_output_dir(recipe.output_dir, recipe.model, probe=False)  # the runner probes writability
    if recipe.eval is not None:
        check_prompts(recipe.eval.prompts, "eval.prompts")
        if recipe.eval.reference != "fp" and (problem := reference_problem(recipe.eval.reference)):
            raise RecipeError("eval.reference", f"{problem}; eval.reference takes 'fp' (the original model's outputs), "
                              f"a folder of images, a .safetensors statistics file or a builtin dataset")
    inputs, calls = recipe.calibration.estimate()
    if inputs > CALIBRATION_WARN_INPUTS:
        c = recipe.calibration
        guided = " x 2 for guidance" if c.guidance_scale > 1 else ""
        log.warning("calibration.num_samples %d: a stage that calibrates makes %s denoiser calls and stores %s inputs "
                    "(num_samples x timesteps %d%s), ~%s on disk at Stable Diffusion 1.5 size; lower "
                    "calibration.num_samples unless this is meant", c.num_samples, f"{calls:,}", f"{inputs:,}",
                    c.timesteps, guided, _size(inputs * SD15_INPUT_BYTES))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.0f} TB"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Raises:
        RecipeError: missing file, invalid YAML, a key given twice, or any validation failure.
    """
    data = read_yaml_file(path)
    return recipe_from_dict(apply_overrides(data or {}, overrides or []))
