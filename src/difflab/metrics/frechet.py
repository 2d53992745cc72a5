"""The Frechet distance (FID when the features are Inception-v3's) between Gaussians fitted to features.

Features (N, D) are summarised by their mean ``mu`` (D,) and unbiased covariance ``sigma`` (D, D) in float64
(:func:`feature_statistics`, or :class:`RunningStats` for streams), and

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

is computed in float64 with scipy's matrix square root. Reference statistics may come from an ``.npz`` file
(:mod:`difflab.metrics.stats_files`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from difflab.errors import require
from difflab.metrics.arrays import check_features, check_stats, matmul64
from difflab.metrics.stats_files import load_stats


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D); float64.

    If the square root of ``sigma1 @ sigma2`` is not finite, ``eps * I`` (default 1e-6) is added to both
    covariances. A negligible imaginary part (round-off) is dropped; a large one raises :class:`DifflabError`.
    """
    from scipy import linalg

    mu1, sigma1 = check_stats(mu1, sigma1, "first")
    mu2, sigma2 = check_stats(mu2, sigma2, "second")
    require(
        mu1.shape == mu2.shape,
        f"statistics have different dimensions ({mu1.shape[0]} vs {mu2.shape[0]}); compute both with the same "
        "feature extractor",
    )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on (near-)singular products; the checks below decide
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(mu1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    require(
        np.isfinite(covmean).all(),
        "the matrix square root of sigma1 @ sigma2 is not finite; check that both covariances are valid",
    )
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        imag, scale = float(np.abs(diag.imag).max()), max(1.0, float(np.abs(diag.real).max()))
        require(
            imag <= 1e-3 * scale,
            f"the matrix square root has an imaginary part of {imag:.3g}; the covariances are not positive "
            "semi-definite (recompute them from more samples)",
        )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D) with N >= 2."""
    f = check_features(features)
    mu = f.mean(axis=0)
    c = f - mu
    return mu, matmul64(c.T, c) / (f.shape[0] - 1)


class RunningStats:
    """Streaming :func:`feature_statistics` for feature sets too large to keep: ``update(batch)``, ``stats()``.

    Sums are kept in float64 around a shift (the first batch's mean) so the covariance does not lose digits.
    """

    def __init__(self):
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> RunningStats:
        """Add a batch of features (n, D); returns self."""
        f = check_features(features, min_rows=1)
        if self._shift is None:
            d = f.shape[1]
            self._shift, self._sum, self._outer = f.mean(axis=0), np.zeros(d), np.zeros((d, d))
        require(
            f.shape[1] == self._shift.shape[0],
            f"features have {f.shape[1]} columns but earlier batches had {self._shift.shape[0]}; use one extractor",
        )
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._outer += matmul64(c.T, c)
        self.n += f.shape[0]
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) in float64 of everything added so far (needs >= 2 rows)."""
        require(self.n >= 2, f"only {self.n} feature row(s) were added; statistics need at least 2")
        m = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, sigma


def _resolve_ref(ref_stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ref_stats, (str, os.PathLike)):
        return load_stats(ref_stats)
    require(
        isinstance(ref_stats, (tuple, list)) and len(ref_stats) == 2,
        "reference statistics must be a (mu, sigma) pair or a path to an .npz with keys mu and sigma",
    )
    return ref_stats[0], ref_stats[1]


def fid_from_features(features, ref_stats) -> float:
    """Frechet distance of features (N, D) to ``ref_stats``: a (mu, sigma) pair or an .npz path."""
    mu_ref, sigma_ref = _resolve_ref(ref_stats)
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


__all__ = ["RunningStats", "feature_statistics", "fid_from_features", "frechet_distance"]
