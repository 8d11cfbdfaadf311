"""Frechet distance (FID) and kernel distance (KID) between feature sets, in float64.

FID (docs/methods.md §9): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` over 2048-d pool
features. KID: the unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
averaged over random subsets (Binkowski et al. 2018).

Pure math on arrays: no network, no images. Every FID/KID that diffsqueeze reports is computed
here, except on the torchmetrics backend (:class:`diffsqueeze.metrics.fid.FIDAccumulator`), where
torchmetrics computes it from the same features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.linalg

if TYPE_CHECKING:
    import torch

__all__ = [
    "MIN_FID_IMAGES",
    "frechet_distance",
    "clipped_subset_size",
    "kernel_inception_distance",
]

MIN_FID_IMAGES = 200
"""Images on each side below which a report shows FID as n/a. The Frechet distance of 2048-d
features from a few dozen images is dominated by the estimation noise of the covariances (12 vs
12 images of the same model give FID in the hundreds); 200 keeps rows of one table comparable,
though FID stays biased upwards against the usual 10k/50k-image numbers."""


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

    ``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (docs/methods.md §9).

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
