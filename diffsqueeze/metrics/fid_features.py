"""Inception features of an image set for FID/KID, through one backend's image pipeline.

The two backends (see :mod:`diffsqueeze.metrics.fid` for what each one is, and for the resize
conventions) read and resize images differently, so the same images give slightly different
features on each; :func:`extract_features` is the one place that knows both pipelines.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsqueeze.metrics.images import ImagesLike, iter_uint8_batches, list_image_files
from diffsqueeze.metrics.inception import FeatureExtractor, load_inception

__all__ = [
    "BACKENDS",
    "check_backend",
    "resolve_extractor",
    "extract_features",
]

BACKENDS = ("torchmetrics", "clean-fid")


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def resolve_extractor(
    extractor: FeatureExtractor | None, resize: str | None, backend: str, device: str | torch.device | None
) -> tuple[FeatureExtractor, str]:
    """Return (extractor, effective resize mode) for a backend.

    Args:
        extractor: feature network, or None for :func:`load_inception` on ``device``.
        resize: requested resize mode, or None for the extractor's (``clean`` for a new one).
        backend: ``torchmetrics`` or ``clean-fid`` (which only does ``clean``).
        device: where a new network goes (default CPU).

    Raises:
        ValueError: unknown backend, or a resize the backend or the given extractor does not do.
    """
    check_backend(backend)
    if backend == "clean-fid":
        if resize not in (None, "clean"):
            raise ValueError(f"the clean-fid backend only does the 'clean' resize; got resize={resize!r}")
        return extractor if extractor is not None else load_inception(resize="clean", device=device or "cpu"), "clean"
    if extractor is None:
        extractor = load_inception(resize=resize or "clean", device=device or "cpu")
    elif resize is not None and resize != extractor.resize:
        raise ValueError(f"resize={resize!r} but the extractor was built with resize={extractor.resize!r}")
    return extractor, extractor.resize


def extract_features(
    images: ImagesLike,
    extractor: FeatureExtractor,
    *,
    backend: str = "torchmetrics",
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Features ``(N, d)`` float32 of a folder / in-memory images, through one backend's pipeline.

    ``torchmetrics``: ``uint8`` batches into ``extractor`` (which resizes with its own mode).
    ``clean-fid``: folders go through ``cleanfid.fid.get_files_features`` (its dataset, clean
    resize, batching); in-memory images through clean-fid's clean resizer, then ``extractor``.
    """
    check_backend(backend)
    if backend == "torchmetrics":
        out = [
            extractor(batch).cpu().numpy()
            for batch in tqdm(iter_uint8_batches(images, batch_size), desc="features", disable=not progress, leave=False)
        ]
        return np.concatenate(out).astype(np.float32)
    from cleanfid.fid import get_files_features
    from cleanfid.resize import build_resizer

    if isinstance(images, (str, os.PathLike)):
        files = [str(p) for p in list_image_files(images)]
        feats = get_files_features(
            files,
            model=extractor,
            num_workers=num_workers,
            batch_size=batch_size,
            device=extractor.device,
            mode="clean",
            verbose=progress,
        )
        return np.asarray(feats, dtype=np.float32)
    fn_resize = build_resizer("clean")
    out = []
    for batch in tqdm(iter_uint8_batches(images, batch_size), desc="features", disable=not progress, leave=False):
        resized = [torch.from_numpy(fn_resize(t.permute(1, 2, 0).numpy())).permute(2, 0, 1) for t in batch.cpu()]
        out.append(extractor(torch.stack(resized)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)

