"""The check after every stage that the model still generates an image.

A stage can finish its own work and leave a model that no longer runs end to end (an attention
wrapper that drops an argument the sampler passes, NaN from a collapsed scale). The runner does
not mark such a stage done: it generates one image with the stage's result, on the calibration
settings (first prompt, the recipe's seed, two sampler steps), and fails the stage in one line
if the pipeline raises or the image holds NaN/Inf.
"""

from __future__ import annotations

import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.conditioning import generate, images_of, pipeline_prompts

CHECK_STEPS = 2


class GenerationCheckError(DiffsqueezeError):
    """The model a stage produced cannot generate an image."""


@torch.no_grad()
def check_generates(pipe, calib, seed: int, where: str) -> None:
    """Generate one image with ``pipe`` on the calibration settings ``calib``.

    Raises:
        GenerationCheckError: naming ``where`` (the stage) and what went wrong.
    """
    prompts = pipeline_prompts(pipe, calib.prompts)[:1]
    generator = torch.Generator("cpu").manual_seed(seed)
    try:
        result = generate(pipe, prompts, generator, CHECK_STEPS, calib.guidance_scale, "pt", calib.height, calib.width)
        images = images_of(result)
    except Exception as exc:  # noqa: BLE001 - whatever the pipeline raises, the stage's model is unusable
        raise GenerationCheckError(f"{where} left a model that cannot generate an image: "
                                   f"{type(exc).__name__}: {exc}") from exc
    if not bool(torch.isfinite(images).all()):
        raise GenerationCheckError(f"{where} left a model whose image holds NaN/Inf "
                                   f"(prompt '{prompts[0]}', seed {seed}, {CHECK_STEPS} steps)")
