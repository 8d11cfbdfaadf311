"""The recipe's ``calibration:`` section: where calibration data comes from.

It lives below the stages (:mod:`diffsqueeze.pipelines.context` hands it to them, and
:mod:`diffsqueeze.pipelines.calibration` records from it); :mod:`diffsqueeze.recipe` re-exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from diffsqueeze.errors import DiffsqueezeError, RecipeError

__all__ = ["CalibrationConfig", "check_prompts"]


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration data comes from (docs/methods.md §1); used by the stages that need it.

    Attributes:
        prompts: prompt set (``builtin``, ``builtin:NAME``) or a text file.
        num_samples: samples recorded per calibration timestep.
        timesteps: number of calibration timesteps ``n_t``, uniform over the trajectory.
        num_inference_steps: sampler steps of the calibration trajectories.
        guidance_scale: classifier-free guidance scale (conditional and unconditional inputs recorded).
        batch_size: pipeline batch size while recording.
        sampler: ``default`` (the pipeline's own scheduler) or a diffusers scheduler class name
            (``DDIMScheduler``) built from the pipeline's scheduler config for the recording.
        height, width: image size of the recorded trajectories (default: the pipeline's own);
            checked against the model's latent factor when the run starts.
    """

    prompts: str = "builtin"
    num_samples: int = 32
    timesteps: int = 10
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 8
    sampler: str = "default"
    height: Optional[int] = None
    width: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_samples", "timesteps", "num_inference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.timesteps > self.num_inference_steps:
            raise RecipeError("timesteps", f"{self.timesteps} calibration timesteps cannot come from "
                              f"{self.num_inference_steps} sampler steps (num_inference_steps)")
        if self.sampler != "default" and not (self.sampler.isidentifier() and self.sampler.endswith("Scheduler")):
            raise RecipeError("sampler", f"'default' or a diffusers scheduler class name like DDIMScheduler; got {self.sampler!r}")
        check_prompts(self.prompts, "prompts")
        for name in ("height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RecipeError(name, f"must be >= 1 (pixels), got {getattr(self, name)}")

    def estimate(self) -> tuple[int, int]:
        """(recorded denoiser inputs, denoiser evaluations) of the recording; guidance doubles both."""
        cfg = 2 if self.guidance_scale > 1 else 1
        return self.num_samples * self.timesteps * cfg, self.num_samples * self.num_inference_steps * cfg


def check_prompts(spec: str, key: str) -> None:
    """An unknown prompt set (``builtin:NAME``) or a missing/empty prompt file fails before any work."""
    from diffsqueeze.models.prompts import load_prompts

    try:
        load_prompts(spec)
    except DiffsqueezeError as exc:
        raise RecipeError(key, str(exc)) from None
