"""Frechet distance and KID (diffsqueeze.metrics.frechet) against float64 closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsqueeze.metrics.frechet import (
    clipped_subset_size,
    frechet_distance,
    kernel_inception_distance,
)


def random_spd(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


METHODS = ["eigh", "sqrtm"]

# ---------------------------------------------------------------------------------------------
# frechet_distance against float64 closed forms


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_diagonal_gaussians(method: str) -> None:
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_commuting_rotated_gaussians(method: str) -> None:
    # Shared eigenbasis: sqrt(S1 S2) = Q diag(sqrt(a b)) Q^T, so d^2 = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    rng = np.random.default_rng(1)
    d = 48
    q = random_rotation(d, rng)
    a, b = rng.uniform(0.01, 5, d), rng.uniform(0.01, 5, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_frechet_distance_non_commuting_2d(method: str) -> None:
    # 2x2: S1 S2 has real non-negative eigenvalues l1, l2 and
    # Tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(Tr(S1 S2) + 2 sqrt(det(S1 S2))).
    rng = np.random.default_rng(2)
    for _ in range(5):
        s1, s2 = random_spd(2, rng), random_spd(2, rng)
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        m = s1 @ s2
        tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_frechet_distance_one_dimensional() -> None:
    # N(1, 2^2) vs N(4, 3^2): (1 - 4)^2 + (2 - 3)^2 = 10
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([4.0]), np.array([[9.0]])) == pytest.approx(10.0)


def test_frechet_distance_accepts_float32_torch_and_computes_in_float64() -> None:
    rng = np.random.default_rng(3)
    d = 32
    s1, s2 = random_spd(d, rng).astype(np.float32), random_spd(d, rng).astype(np.float32)
    mu1, mu2 = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    ref = frechet_distance(mu1.astype(np.float64), s1.astype(np.float64), mu2.astype(np.float64), s2.astype(np.float64))
    got = frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("n", [5, 200])  # rank-deficient (n < d) and full-rank sample covariances
def test_frechet_distance_of_identical_statistics_is_zero(n: int) -> None:
    rng = np.random.default_rng(4)
    f = rng.random((n, 64))
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma) + 1e-12
    if n > 64:
        assert abs(frechet_distance(mu, sigma, mu, sigma, method="sqrtm")) < 1e-7 * np.trace(sigma)


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


# ---------------------------------------------------------------------------------------------
# KID


def _mmd_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written as explicit sums."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_explicit_sums_when_subset_is_whole_set() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.random((6, 8)), rng.random((6, 8)) + 0.2
    mean, std = kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_mmd_reference(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole set


def test_kid_subset_size_clipped_and_seeded() -> None:
    assert clipped_subset_size(5, 7, 1000) == 5
    assert clipped_subset_size(5000, 7000, 1000) == 1000
    with pytest.raises(ValueError, match="at least 2"):
        clipped_subset_size(1, 7, 1000)
    rng = np.random.default_rng(6)
    x, y = rng.random((20, 8)), rng.random((30, 8))
    a = kernel_inception_distance(x, y, subsets=10, subset_size=10, seed=1)
    assert a == kernel_inception_distance(x, y, subsets=10, subset_size=10, seed=1)
    assert a != kernel_inception_distance(x, y, subsets=10, subset_size=10, seed=2)
    assert a[1] > 0
