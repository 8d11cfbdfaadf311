"""How a pipeline is conditioned and called: text prompts, class labels, or nothing.

Every place that generates (calibration, the end-of-stage check, grids, eval) goes through
:func:`generate`, so a pipeline family is supported in one place: text-to-image pipelines get
``prompt``, class-conditional ones (DiT) get ``class_labels`` resolved from the prompt strings,
unconditional ones (DDPM) get ``batch_size`` and only their seeds matter. What a pipeline takes
is read from its ``__call__`` signature, never from its class name.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.prompts import load_prompts

DEFAULT_PROMPT_SET = "builtin"
UNCONDITIONAL_LABEL = "(unconditional)"


class ConditioningError(DiffsqueezeError):
    """A prompt, class label or size the pipeline cannot take."""


@dataclass(frozen=True)
class Conditioning:
    """What a pipeline's ``__call__`` takes.

    Attributes:
        kind: ``text`` (``prompt``), ``class`` (``class_labels``) or ``none`` (unconditional).
        guidance: whether it takes ``guidance_scale`` (classifier-free or distilled guidance).
        sized: whether it takes ``height`` / ``width``.
    """

    kind: str
    guidance: bool
    sized: bool

    @property
    def has_text(self) -> bool:
        return self.kind == "text"


def conditioning_of(pipe) -> Conditioning:
    params = inspect.signature(pipe.__call__).parameters
    kind = "text" if "prompt" in params else "class" if "class_labels" in params else "none"
    return Conditioning(kind, "guidance_scale" in params, "height" in params and "width" in params)


def _class_ids(pipe) -> tuple[dict[str, int], int]:
    """The pipeline's label -> class id table (DiT's ``labels`` from ``id2label``) and the
    number of classes of its denoiser (``num_embeds_ada_norm`` / ``num_class_embeds``)."""
    labels = dict(getattr(pipe, "labels", None) or {})
    n = 0
    for name in ("transformer", "unet"):
        config = getattr(getattr(pipe, name, None), "config", None)
        if config is not None:
            n = int(config.get("num_embeds_ada_norm") or config.get("num_class_embeds") or 0)
            break
    return labels, n or (max(labels.values()) + 1 if labels else 0)


def class_id(pipe, prompt: str) -> int:
    """The class id a prompt names: one of the pipeline's labels, or an integer id.

    Raises:
        ConditioningError: neither, naming a few of the labels.
    """
    labels, n = _class_ids(pipe)
    text = prompt.strip()
    if text in labels:
        return labels[text]
    if text.isdigit() and (n == 0 or int(text) < n):
        return int(text)
    some = ", ".join(sorted(labels)[:5])
    raise ConditioningError(
        f"{type(pipe).__name__} is class-conditional: prompt '{prompt}' is not one of its labels "
        f"({some}{', ...' if len(labels) > 5 else ''}) nor a class id below {n}")


def pipeline_prompts(pipe, spec: str | None) -> list[str]:
    """The conditions a run or an eval cycles through, as strings (row labels, provenance).

    Text pipelines: the prompt set ``spec``. Class-conditional ones: the set's lines checked as
    labels or class ids, and for the default set the pipeline's own labels in class order.
    Unconditional ones: one entry, :data:`UNCONDITIONAL_LABEL` (images differ by seed only).

    Raises:
        ConditioningError: a line that names no class of a class-conditional pipeline.
    """
    kind = conditioning_of(pipe).kind
    spec = spec or DEFAULT_PROMPT_SET
    if kind == "none":
        return [UNCONDITIONAL_LABEL]
    if kind == "class" and spec == DEFAULT_PROMPT_SET:
        labels, n = _class_ids(pipe)
        by_id: dict[int, str] = {}
        for label, i in sorted(labels.items()):
            by_id.setdefault(i, label)
        return [by_id[i] for i in sorted(by_id)] or [str(i) for i in range(min(n, 8))]
    prompts = load_prompts(spec)
    if kind == "class":
        for p in prompts:
            class_id(pipe, p)
    return prompts


def clip_not_applicable(pipe) -> str:
    """Why a CLIP score is not computed for a pipeline without text conditioning."""
    kind = conditioning_of(pipe).kind
    what = "class-conditional (class labels, no text)" if kind == "class" else "unconditional (no text)"
    return f"CLIP score does not apply: {type(pipe).__name__} is {what}"


def check_size(pipe, height: int | None, width: int | None, where: str) -> None:
    """Raise :class:`ConditioningError` when a size is set for a pipeline of fixed size, or is
    not a multiple of its latent factor (the VAE's, times 2 for a transformer's patches)."""
    if height is None and width is None:
        return
    if not conditioning_of(pipe).sized:
        raise ConditioningError(f"{where}: {type(pipe).__name__} takes no height/width; its image size is "
                                f"fixed by its model (leave height and width unset)")
    # transformers (SD3, PixArt, Flux) cut their latents into 2x2 patches or packed tokens
    factor = int(getattr(pipe, "vae_scale_factor", 1) or 1) * (2 if hasattr(pipe, "transformer") else 1)
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise ConditioningError(f"{where}: {name} {value} is not a positive multiple of {factor} "
                                    f"(the latent factor of {type(pipe).__name__})")


def call_arguments(pipe, prompts: Sequence[str], generator: Any, num_inference_steps: int,
                   guidance_scale: float | None, output_type: str, height: int | None = None,
                   width: int | None = None) -> dict[str, Any]:
    """Keyword arguments of one ``pipe(...)`` call generating ``len(prompts)`` images."""
    cond = conditioning_of(pipe)
    call: dict[str, Any] = {"generator": generator, "num_inference_steps": num_inference_steps,
                            "output_type": output_type}
    if cond.kind == "text":
        call["prompt"] = list(prompts)
    elif cond.kind == "class":
        call["class_labels"] = [class_id(pipe, p) for p in prompts]
    else:
        call["batch_size"] = len(prompts)
    if cond.guidance and guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    if height is not None:
        call["height"] = height
    if width is not None:
        call["width"] = width
    return call


def raw_images(result):
    """The images of a pipeline's output as the pipeline returns them (an output object's
    ``images`` or the first element of a tuple)."""
    return result.images if hasattr(result, "images") else result[0]


def images_of(result) -> torch.Tensor:
    """The float ``(N, C, H, W)`` images in [0, 1] of a pipeline's output, whatever form the
    pipeline returns them in (a tensor, a channels-last numpy array, a list of PIL images)."""
    images = raw_images(result)
    if isinstance(images, list) and images and not torch.is_tensor(images[0]):
        images = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    if isinstance(images, np.ndarray):
        array = images if images.ndim == 4 else images[..., None]
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()
    return images.float()


def generate(pipe, prompts: Sequence[str], generator: Any, num_inference_steps: int,
             guidance_scale: float | None, output_type: str = "pt", height: int | None = None,
             width: int | None = None):
    """Call the pipeline once for ``len(prompts)`` images (its raw output: ``images_of`` reads it)."""
    return pipe(**call_arguments(pipe, prompts, generator, num_inference_steps, guidance_scale, output_type,
                                 height, width))
