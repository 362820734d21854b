"""Fréchet distance and kernel distance between two sets of image features (float64 numpy).

* FID (Heusel et al. 2017): fit a Gaussian to each feature set and report
  ||mu1 - mu2||² + tr(S1 + S2 - 2 (S1 S2)^½). The trace of the matrix square root is taken as
  the sum of sqrt(eigenvalues) of S1^½ S2 S1^½, which is symmetric positive semi-definite and
  has the same eigenvalues as S1 S2; ``eigh`` on it is exact where scipy's ``sqrtm`` of the
  non-symmetric product needs an imaginary-part clean-up, and needs no scipy.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): the unbiased estimator of the
  squared MMD with the polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over random
  subsets (their and torchmetrics'/clean-fid's protocol); unlike FID it has no bias in the
  number of samples, so small evaluations can be compared.

Which network produced the features is the caller's business (orchestrator/eval/features.py);
numbers are only comparable between runs that used the same features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_features(x, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{what} must be a 2-D array (samples, features) with at least 2 samples, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return a


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance (unbiased, ddof=1) of a feature set, float64."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int

    @classmethod
    def of(cls, features) -> "GaussianStats":
        f = _as_features(features, "features")
        return cls(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False)), f.shape[0])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (tiny negative eigenvalues from
    rounding are clipped to 0)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^½) for symmetric PSD S1, S2 (see the module docstring)."""
    s1 = _psd_sqrt(sigma1)
    inner = s1 @ sigma2 @ s1
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))
    # Exact arithmetic gives >= 0; eigenvalue rounding can leave -1e-12 for identical inputs.
    return max(value, 0.0)


def fid_from_features(features1, features2) -> float:
    a, b = GaussianStats.of(features1), GaussianStats.of(features2)
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³, the KID kernel (Bińkowski et al. 2018, eq. 8 with
    degree 3, gamma 1/d, coef 1)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimate of MMD²(P, Q) from x ~ P (m samples) and y ~ Q (n samples):
    the U-statistic that leaves out the diagonal of k(x, x) and k(y, y)
    (Gretton et al. 2012, eq. 3)."""
    x, y = _as_features(x, "x"), _as_features(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


@dataclass(frozen=True)
class KID:
    mean: float
    std: float  # standard deviation over subsets (spread, not a standard error)
    subsets: int
    subset_size: int


def kernel_inception_distance(features1, features2, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> KID:
    """Mean and std of ``mmd2_unbiased`` over ``subsets`` random subsets of ``subset_size``
    drawn without replacement from each set (capped at the smaller set's size)."""
    a, b = _as_features(features1, "features1"), _as_features(features2, "features2")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples, got subset_size={subset_size}")
    rng = np.random.default_rng(seed)
    vals = np.array([
        mmd2_unbiased(a[rng.choice(a.shape[0], size, replace=False)], b[rng.choice(b.shape[0], size, replace=False)])
        for _ in range(subsets)
    ])
    return KID(float(vals.mean()), float(vals.std()), subsets, size)
