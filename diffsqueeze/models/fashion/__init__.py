"""The builtin Fashion-MNIST models: ``builtin:fashion`` (text-to-image) and ``builtin:fashion-clip``.

Both are trained here (``scripts/train_fashion_clip.py``, ``scripts/train_fashion_diffusion.py``)
and ship as safetensors under ``weights/``; see docs/builtin-model.md.
"""

from __future__ import annotations

from pathlib import Path

from diffsqueeze.errors import DiffsqueezeError

from .clip import CLIP_DIR, WEIGHTS_DIR, image_processor, load_fashion_clip
from .data import (
    CLASS_NAMES,
    FashionMNISTMissingError,
    caption,
    class_prompt,
    load_fashion_mnist,
    load_reference_subset,
    pad_to_32,
)
from .pipeline import FashionDiffusionPipeline, FashionPipelineOutput
from .tokenizer import load_tokenizer

PIPELINE_DIR = WEIGHTS_DIR / "pipeline"

__all__ = [
    "CLASS_NAMES",
    "CLIP_DIR",
    "PIPELINE_DIR",
    "WEIGHTS_DIR",
    "BuiltinWeightsMissingError",
    "FashionDiffusionPipeline",
    "FashionMNISTMissingError",
    "FashionPipelineOutput",
    "build_fashion_clip",
    "build_fashion_clip_processor",
    "build_fashion_pipeline",
    "caption",
    "class_prompt",
    "load_fashion_mnist",
    "load_reference_subset",
    "load_tokenizer",
    "pad_to_32",
]


class BuiltinWeightsMissingError(DiffsqueezeError, FileNotFoundError):
    """The trained weights of a builtin model are not in the package."""


def build_fashion_pipeline(path: str | Path | None = None, torch_dtype=None) -> FashionDiffusionPipeline:
    """The trained builtin text-to-image pipeline (``builtin:fashion``), loaded offline.

    Args:
        path: a saved ``FashionDiffusionPipeline`` folder; default the shipped weights.
        torch_dtype: optional dtype for the modules.

    Raises:
        BuiltinWeightsMissingError: the weights were not trained/shipped.
    """
    path = Path(path) if path is not None else PIPELINE_DIR
    if not (path / "model_index.json").is_file() or not (path / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise BuiltinWeightsMissingError(
            f"builtin:fashion weights missing in {path}: train them with "
            "`python scripts/train_fashion_clip.py && python scripts/train_fashion_diffusion.py` "
            "(docs/builtin-model.md)")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    pipe = FashionDiffusionPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_fashion_clip(path: str | Path | None = None):
    """The trained builtin CLIP (``builtin:fashion-clip``): ``(CLIPModel, CLIPTokenizer)``, offline.

    Images go in as 3x32x32 in [-1, 1]; :func:`build_fashion_clip_processor` turns any PIL image
    into that.

    Raises:
        BuiltinWeightsMissingError: the weights were not trained/shipped.
    """
    path = Path(path) if path is not None else CLIP_DIR
    try:
        return load_fashion_clip(path)
    except FileNotFoundError as e:
        raise BuiltinWeightsMissingError(str(e)) from None


def build_fashion_clip_processor():
    """``CLIPImageProcessor`` for the fashion CLIP (RGB, resize/crop 32, mean 0.5, std 0.5)."""
    return image_processor()
