"""How a pipeline is conditioned and called: text prompts, class labels, or nothing.

Every place that generates (calibration, the end-of-stage check, grids, eval) goes through
:func:`generate`, so a pipeline family is supported in one place: text-to-image pipelines get
``prompt``, class-conditional ones (DiT) get ``class_labels`` resolved from the prompt strings,
unconditional ones (DDPM) get ``batch_size`` and only their seeds matter. What a pipeline takes
is read from its ``__call__`` signature, never from its class name.

A text pipeline's tokenizers cut every prompt to what its text encoders read (77 tokens for CLIP)
without a word; :func:`pipeline_prompts` says once per process how many prompts of the set are cut
and to how many tokens (:func:`truncation_warnings`).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.prompts import load_prompts

log = logging.getLogger(__name__)

DEFAULT_PROMPT_SET = "builtin"
UNCONDITIONAL_LABEL = "(unconditional)"
#: transformers gives a tokenizer without a length of its own a huge ``model_max_length``
#: (``VERY_LARGE_INTEGER``); anything above this is read as "no limit".
_NO_TOKEN_LIMIT = 1_000_000
#: Tokenizer and prompt-set pairs already checked in this process (pipeline_prompts runs several
#: times a run: calibration, the check after each stage, the evaluation): each is reported once.
_TRUNCATION_CHECKED: set[tuple] = set()


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
    else:
        for message in truncation_warnings(pipe, prompts, spec):
            warn_once(message)
    return prompts


def token_count_over(tokenizer, prompts: Sequence[str], limit: int) -> int:
    """How many of ``prompts`` are longer than ``limit`` tokens (special tokens counted, as the
    pipeline's own call counts them)."""
    ids = tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]
    return sum(len(x) > limit for x in ids)


def _token_limits(pipe) -> list[tuple[str, Any, int]]:
    """``(component name, tokenizer, tokens passed on)`` of each tokenizer a text pipeline has.

    A CLIP text encoder's tokenizer passes on its ``model_max_length`` (77); the others (T5,
    Gemma) are cut where the pipeline's call says, ``max_sequence_length`` (SD3 256, Flux 512,
    PixArt 120), else at their own ``model_max_length``."""
    param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    cap = param.default if param is not None and isinstance(param.default, int) else None
    out = []
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None or not callable(tok):
            continue
        encoder = getattr(pipe, name.replace("tokenizer", "text_encoder"), None)
        own = getattr(tok, "model_max_length", None)
        own = own if isinstance(own, int) and own < _NO_TOKEN_LIMIT else None
        limit = own if type(encoder).__name__.startswith("CLIP") or cap is None else cap
        if limit:
            out.append((name, tok, limit))
    return out


def truncation_warnings(pipe, prompts: Sequence[str], source: str) -> list[str]:
    """One message per tokenizer of ``pipe`` that cuts some of ``prompts`` (the set ``source``):
    how many it cuts and to how many tokens. Each tokenizer and set is checked once per process;
    a repeated call returns nothing."""
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()
    messages = []
    for name, tok, limit in _token_limits(pipe):
        key = (type(tok).__name__, getattr(tok, "name_or_path", ""), len(tok), limit, digest)
        if key in _TRUNCATION_CHECKED:
            continue
        _TRUNCATION_CHECKED.add(key)
        n = token_count_over(tok, prompts, limit)
        if n:
            messages.append(f"{n} of {len(prompts)} prompts of '{source}' are longer than {type(pipe).__name__}'s "
                            f"{name} takes: each is truncated to its first {limit} tokens")
    return messages


def warn_once(message: str) -> None:
    """Log ``message`` as a warning on the main process only: under a multi-process launch
    (``RANK`` set by torchrun / accelerate) every process reads the same prompts."""
    if os.environ.get("RANK", "0") == "0":
        log.warning("%s", message)


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
