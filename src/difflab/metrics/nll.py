"""Likelihood by the ITD estimator: -log p(x) per example, in nats and bits/dim.

Each point gets ``n_alpha`` log-SNR values, either Monte-Carlo draws from the truncated logistic or deterministic
quadrature nodes (midpoints of equal-probability bins, the default: lower variance), each with its own noise.
"""

from __future__ import annotations

import math

import torch

from difflab.objectives.itd import ITDLoss


def itd_nll(D, x: torch.Tensor, itd: ITDLoss, n_alpha: int = 128, quadrature: bool = True, seed: int = 0,
            max_rows: int = 1 << 16) -> torch.Tensor:
    """-log p(x) estimates (N,) in nats for data x (N, *shape) under denoiser D (see :meth:`ITDLoss.nll`)."""
    return itd.nll(D, x, n_alpha=n_alpha, quadrature=quadrature, seed=seed, max_rows=max_rows)


def nll_summary(nll: torch.Tensor, dim: int) -> dict:
    """Mean NLL in nats and bits/dim, with the standard error of the mean."""
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    return {"nll_nats": mean, "nll_nats_se": se, "bits_per_dim": mean / (dim * math.log(2)),
            "bits_per_dim_se": se / (dim * math.log(2))}
