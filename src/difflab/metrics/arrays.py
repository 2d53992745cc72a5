"""User input (numpy, torch, nested lists) as checked float64 numpy arrays, with one-line errors: any array, a
feature matrix (N, D), Gaussian statistics (mu (D,), sigma (D, D)); and their float64 products."""

from __future__ import annotations

import numpy as np
import torch

from difflab.errors import DifflabError, require


def as_float64(a, name: str, hint: str = "") -> np.ndarray:
    """Any real array-like as a float64 numpy array; ``hint`` (e.g. " of shape (n, d)") ends the error lines."""
    if isinstance(a, torch.Tensor):
        require(not a.is_complex(), f"{name} is complex; pass real numbers{hint}")
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise DifflabError(f"{name} is not an array of numbers; pass a numpy array or tensor{hint}") from e
    require(arr.dtype.kind in "biuf", f"{name} has dtype {arr.dtype}; pass real numbers{hint}")
    return np.asarray(arr, dtype=np.float64)


def check_features(features, name: str = "features", min_rows: int = 2) -> np.ndarray:
    """Features as a finite float64 (N, D) array with N >= ``min_rows`` (default 2)."""
    f = as_float64(features, name)
    require(f.ndim == 2, f"{name} has shape {f.shape}; pass one feature vector per row, shape (N, D)")
    require(
        f.shape[0] >= min_rows,
        f"{name} has {f.shape[0]} row(s); pass at least {min_rows} feature vectors",
    )
    require(f.shape[1] >= 1, f"{name} has zero columns; pass features of shape (N, D) with D >= 1")
    bad = int((~np.isfinite(f)).any(axis=1).sum())
    require(bad == 0, f"{name} has {bad} row(s) with NaN or inf values; check the images and the extractor")
    return f


def check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as finite float64 arrays; ``name`` (e.g. "first") starts the error lines."""
    mu, sigma = as_float64(mu, f"{name} mu"), as_float64(sigma, f"{name} sigma")
    require(mu.ndim == 1 and mu.size >= 1, f"{name} mu has shape {mu.shape}; pass a mean vector of shape (D,)")
    d = mu.shape[0]
    require(
        sigma.shape == (d, d),
        f"{name} sigma has shape {sigma.shape} but mu has {d} entries; pass a covariance of shape ({d}, {d})",
    )
    require(np.isfinite(mu).all(), f"{name} mu has NaN or inf values; recompute the statistics")
    require(np.isfinite(sigma).all(), f"{name} sigma has NaN or inf values; recompute the statistics")
    return mu, sigma


def matmul64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a (n, k) @ b (k, m) in float64 through torch, so the product honours ``torch.set_num_threads`` (numpy's
    BLAS does not)."""
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()
