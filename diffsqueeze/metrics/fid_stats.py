"""Statistics of a reference image set for FID/KID, and their on-disk cache.

A reference is a folder, in-memory images or precomputed :class:`ReferenceStats` (``mu``,
``sigma`` and the features for KID). Statistics of images are cached as safetensors under a key
that hashes the image content, the image count, the resize mode and the weights' sha256
(:func:`stats_cache_key`), so a reference set is run through the network once per network and
resize mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from diffsqueeze.metrics.atomic_files import atomic_replace
from diffsqueeze.metrics.fid_features import extract_features, resolve_extractor
from diffsqueeze.metrics.images import ImagesLike, content_hash, count_images
from diffsqueeze.metrics.inception import FeatureExtractor

__all__ = [
    "CACHE_ENV",
    "STATS_FORMAT",
    "ReferenceLike",
    "ReferenceStats",
    "stats_cache_key",
    "default_cache_dir",
    "reference_stats",
    "as_reference_stats",
]

logger = logging.getLogger(__name__)

#: Environment variable overriding the reference-statistics cache folder.
CACHE_ENV = "DIFFSQUEEZE_FID_CACHE"
#: Version of the statistics file layout; part of the cache key.
STATS_FORMAT = 1

ReferenceLike = Union[ImagesLike, "ReferenceStats"]


@dataclass(eq=False)
class ReferenceStats:
    """Statistics of a reference image set for one network and resize mode.

    Attributes:
        mu: float64 ``(d,)`` feature mean.
        sigma: float64 ``(d, d)`` feature covariance (unbiased, ``N - 1``).
        num_images: N.
        resize: resize mode the features were computed with.
        weights_sha256: sha256 of the feature network's weights.
        features: float32 ``(N, d)`` features (needed for KID), or None.
        key: cache key (:func:`stats_cache_key`) if known.
        source: human-readable description of the images (a folder path, "in-memory").
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    resize: str
    weights_sha256: str
    features: np.ndarray | None = None
    key: str | None = None
    source: str = ""

    @classmethod
    def from_features(cls, features: np.ndarray, *, resize: str, weights_sha256: str, **kw: Any) -> ReferenceStats:
        """Build statistics from an ``(N, d)`` feature matrix (N >= 2); keeps the features."""
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"need an (N >= 2, d) feature matrix; got shape {f.shape}")
        f64 = f.astype(np.float64)
        return cls(
            mu=f64.mean(axis=0),
            sigma=np.cov(f64, rowvar=False),
            num_images=int(f.shape[0]),
            resize=resize,
            weights_sha256=weights_sha256,
            features=f.astype(np.float32),
            **kw,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically: temp file, then rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"mu": np.ascontiguousarray(self.mu, np.float64), "sigma": np.ascontiguousarray(self.sigma, np.float64)}
        if self.features is not None:
            tensors["features"] = np.ascontiguousarray(self.features, np.float32)
        meta = {
            "format": str(STATS_FORMAT),
            "num_images": str(self.num_images),
            "resize": self.resize,
            "weights_sha256": self.weights_sha256,
            "key": self.key or "",
            "source": self.source,
        }
        with atomic_replace(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != str(STATS_FORMAT):
                raise ValueError(f"{path}: not a diffsqueeze FID statistics file (format {meta.get('format')!r})")
            names = set(f.keys())
            return cls(
                mu=f.get_tensor("mu"),
                sigma=f.get_tensor("sigma"),
                num_images=int(meta["num_images"]),
                resize=meta["resize"],
                weights_sha256=meta["weights_sha256"],
                features=f.get_tensor("features") if "features" in names else None,
                key=meta.get("key") or None,
                source=meta.get("source", ""),
            )


def stats_cache_key(content: str, num_images: int, resize: str, weights_sha256: str) -> str:
    """Cache key (sha256 hex) of reference statistics: changes with anything that changes them.

    Args:
        content: :func:`diffsqueeze.metrics.images.content_hash` of the images.
        num_images: their number.
        resize: resize mode.
        weights_sha256: the network's weights hash.
    """
    payload = {
        "format": STATS_FORMAT,
        "content": content,
        "num_images": int(num_images),
        "resize": resize,
        "weights_sha256": weights_sha256,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """``$DIFFSQUEEZE_FID_CACHE``, else ``$XDG_CACHE_HOME/diffsqueeze/fid-stats`` (``~/.cache/...``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "diffsqueeze" / "fid-stats"


def reference_stats(
    images: ImagesLike,
    *,
    backend: str = "torchmetrics",
    resize: str | None = None,
    extractor: FeatureExtractor | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ReferenceStats:
    """Statistics (mu, sigma, features) of a reference set, from the cache when possible.

    The cache file is ``<cache_dir>/<key>.safetensors`` with ``key = stats_cache_key(content_hash,
    N, resize, weights_sha256)``; ``cache_dir`` defaults to :func:`default_cache_dir`. The backend is
    not part of the key: with the same resize both backends give the same features up to float
    round-off (the ``clean`` resize is clean-fid's code in both).

    Args:
        images: a folder or in-memory images (see ``diffsqueeze.metrics.images``).
        backend: pipeline used on a cache miss (``torchmetrics`` or ``clean-fid``).
        resize: resize mode (default ``clean``; must match ``extractor.resize`` if both given).
        extractor: feature network; default :func:`~diffsqueeze.metrics.inception.load_inception`.
        cache: read and write the cache.
    """
    extractor, resize = resolve_extractor(extractor, resize, backend, device)
    n = count_images(images)
    content = content_hash(images)
    key = stats_cache_key(content, n, resize, extractor.weights_sha256)
    source = os.fspath(images) if isinstance(images, (str, os.PathLike)) else f"in-memory ({n} images)"
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{key}.safetensors"
    if cache and path.is_file():
        try:
            stats = ReferenceStats.load(path)
        except Exception as exc:  # corrupt or foreign file: recompute
            logger.warning("ignoring unreadable FID statistics cache %s: %s", path, exc)
        else:
            if stats.key == key:
                logger.info("FID reference statistics from cache %s", path)
                return stats
    feats = extract_features(images, extractor, backend=backend, batch_size=batch_size, num_workers=num_workers, progress=progress)
    stats = ReferenceStats.from_features(feats, resize=resize, weights_sha256=extractor.weights_sha256, key=key, source=source)
    if cache:
        stats.save(path)
        logger.info("FID reference statistics cached at %s", path)
    return stats


def as_reference_stats(
    reference: ReferenceLike, extractor: FeatureExtractor, resize: str, backend: str, **kw: Any
) -> ReferenceStats:
    """:class:`ReferenceStats` for any reference :func:`diffsqueeze.metrics.fid.compute_fid` takes.

    Args:
        reference: :class:`ReferenceStats`, a ``.safetensors`` statistics file, or a folder /
            in-memory images (through :func:`reference_stats`, cached).
        extractor / resize / backend: what the generated images go through; given statistics
            must have been computed with the same weights and resize.
        **kw: passed on to :func:`reference_stats` (cache, cache_dir, batch_size, ...).

    Raises:
        ValueError: statistics computed with other weights or another resize.
    """
    if isinstance(reference, ReferenceStats):
        stats = reference
    elif isinstance(reference, (str, os.PathLike)) and os.fspath(reference).endswith(".safetensors"):
        stats = ReferenceStats.load(reference)
        if not stats.source:
            stats.source = os.fspath(reference)
    else:
        return reference_stats(reference, backend=backend, resize=resize, extractor=extractor, **kw)
    if stats.weights_sha256 != extractor.weights_sha256:
        raise ValueError(
            f"reference statistics were computed with weights {stats.weights_sha256[:12]}, "
            f"not {extractor.weights_sha256[:12]}"
        )
    if stats.resize != resize:
        raise ValueError(f"reference statistics were computed with resize {stats.resize!r}, not {resize!r}")
    return stats
