"""Reference image sets for FID/KID by name: a folder, a builtin dataset or a statistics file.

``--ref`` / ``eval.reference`` name a reference as a string; :func:`reference_statistics` turns it
into :class:`~diffsqueeze.metrics.fid_stats.ReferenceStats` (cached, see
:func:`~diffsqueeze.metrics.fid_stats.reference_stats`). The reference ``fp`` (the baseline
model's own outputs) is not a set of images on disk; the evaluation job builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.config import BUILTIN_REFERENCES
from diffsqueeze.metrics.fid_stats import ReferenceStats, reference_stats
from diffsqueeze.metrics.images import UnreadableImageError, image_file_problem, list_image_files

__all__ = ["builtin_dataset", "reference_image_problem", "reference_statistics"]


def builtin_dataset(name: str) -> torch.Tensor:
    """Images of a builtin reference set as uint8 ``(N, 3, H, W)``.

    ``builtin:fashion-mnist``: the Fashion-MNIST test set (the shipped 2,000-image balanced subset
    where the full set is not installed), padded to 32x32 like the builtin model's images, gray -> RGB.
    """
    if name != "builtin:fashion-mnist":
        raise DiffsqueezeError(f"unknown builtin dataset '{name}'; known: {', '.join(BUILTIN_REFERENCES)}")
    from diffsqueeze.models.fashion.data import (
        FashionMNISTMissingError,
        load_fashion_mnist,
        load_reference_subset,
        pad_to_32,
    )

    try:
        images, _ = load_fashion_mnist("test")
    except FashionMNISTMissingError:
        images, _ = load_reference_subset()
    x = torch.from_numpy(pad_to_32(images).copy())
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def reference_image_problem(reference: str) -> str | None:
    """The first image of a reference folder that does not decode, named with its cause, or None
    (and None for a reference that is no folder).

    Every file is opened and its pixels decoded, so a truncated or corrupt image stops a job
    before it generates anything, not when the reference features are extracted at its end. It
    costs one decode per image (a few ms for a 512x512 PNG) on top of the feature extraction.
    """
    if not Path(reference).is_dir():
        return None
    try:
        files = list_image_files(reference)
    except FileNotFoundError as exc:
        return str(exc)
    for path in files:
        problem = image_file_problem(path)
        if problem:
            return f"reference image '{path}' cannot be decoded ({problem}); replace or remove it"
    return None


def reference_statistics(reference: str, extractor, backend: str, batch_size: int = 32, cache_dir: str | None = None,
                         progress: bool = False):
    """:class:`~diffsqueeze.metrics.fid_stats.ReferenceStats` for a folder, a builtin dataset or a
    ``.safetensors`` statistics file (cached, see ``fid_stats.reference_stats``)."""
    if reference.endswith(".safetensors") and Path(reference).is_file():
        stats = ReferenceStats.load(reference)
        if stats.weights_sha256 != extractor.weights_sha256 or stats.resize != extractor.resize:
            raise DiffsqueezeError(f"reference statistics {reference} were computed with another network or resize "
                                   f"({stats.weights_sha256[:12]}, {stats.resize})")
        stats.source = stats.source or reference
        return stats
    if reference.startswith("builtin:"):
        images: Any = builtin_dataset(reference)
    elif Path(reference).is_dir():
        images = reference
    else:
        raise DiffsqueezeError(f"reference '{reference}': not 'fp', a folder of images, a .safetensors statistics "
                               f"file or a builtin dataset ({', '.join(BUILTIN_REFERENCES)})")
    try:
        stats = reference_stats(images, backend=backend, extractor=extractor, batch_size=batch_size, cache_dir=cache_dir,
                                progress=progress)
    except (FileNotFoundError, UnreadableImageError) as exc:
        raise DiffsqueezeError(str(exc)) from exc
    if reference.startswith("builtin:"):
        stats.source = f"{reference} ({stats.num_images} images)"
    return stats
