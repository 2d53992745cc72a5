"""Kernel Inception Distance (KID): the unbiased MMD^2 with a cubic polynomial kernel, averaged over subsets."""

from __future__ import annotations

import numpy as np

from difflab.errors import require
from difflab.metrics.arrays import check_features, matmul64


def kid(
    features_a,
    features_b,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int | None = 0,
    generator: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance of features (N_a, D) and (N_b, D): (mean, std) over ``subsets`` (default 100) of
    the unbiased MMD^2.

    Kernel k(x, y) = (x . y / D + 1)^3; each subset draws ``min(subset_size, N_a, N_b)`` rows (default 1000)
    from each set without replacement, with ``generator`` or else ``numpy.random.default_rng(seed)``.
    """
    a, b = check_features(features_a, "features_a"), check_features(features_b, "features_b")
    require(
        a.shape[1] == b.shape[1],
        f"features_b has {b.shape[1]} columns but features_a has {a.shape[1]}; use one extractor for both",
    )
    require(isinstance(subsets, int) and subsets >= 1, f"subsets must be an integer >= 1, got {subsets!r}")
    require(
        isinstance(subset_size, int) and subset_size >= 2, f"subset_size must be an integer >= 2, got {subset_size!r}"
    )
    rng = generator if generator is not None else np.random.default_rng(seed)
    d, m = a.shape[1], min(subset_size, a.shape[0], b.shape[0])
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = ((matmul64(u, v.T) / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


__all__ = ["kid"]
