"""Likelihood by the ITD estimator: -log p(x) per example, in nats and bits/dim (spec/evaluation.md).

Each point gets ``n_alpha`` log-SNR values, either Monte-Carlo draws from the truncated logistic or deterministic
quadrature nodes (midpoints of equal-probability bins, the default: lower variance), each with its own noise.
"""

from __future__ import annotations

import math

import torch

from difflab.errors import require
from difflab.objectives.itd import ITDLoss


@torch.no_grad()
def itd_nll(D, x: torch.Tensor, itd: ITDLoss, n_alpha: int = 128, quadrature: bool = True, seed: int = 0,
            max_rows: int = 1 << 16) -> torch.Tensor:
    """-log p(x) estimates (N,) in nats for data x (N, *shape) under denoiser D, float64.

    The N x n_alpha evaluations run in chunks of at most ``max_rows`` rows.
    """
    require(isinstance(n_alpha, int) and n_alpha >= 1, f"n_alpha must be a positive integer, got {n_alpha!r}")
    g = torch.Generator().manual_seed(seed)
    x = x.to(torch.float64)
    N = x.shape[0]
    if quadrature:
        alpha = itd.quadrature_alpha(n_alpha).repeat(N)
    else:
        alpha = itd.sample_alpha(N * n_alpha, g)
    xs = x.repeat_interleave(n_alpha, 0)
    eps = torch.randn(xs.shape, generator=g, dtype=torch.float64)
    out = torch.cat([itd.nll_terms(D, xs[i : i + max_rows], alpha[i : i + max_rows], eps[i : i + max_rows])
                     for i in range(0, len(xs), max_rows)])
    return out.reshape(N, n_alpha).mean(1)


def nll_summary(nll: torch.Tensor, dim: int) -> dict:
    """Mean NLL in nats and bits/dim, with the standard error of the mean."""
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    return {"nll_nats": mean, "nll_nats_se": se, "bits_per_dim": mean / (dim * math.log(2)),
            "bits_per_dim_se": se / (dim * math.log(2))}
