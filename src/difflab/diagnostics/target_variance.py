"""Target variance (STF Figs. 2-3): how noisy are the regression targets of DSM and of STF at each noise level?

For a finite training set {y_j} and x = y_i + sigma n (i uniform), with targets in eps form (x - target) / sigma
(the sigma^2-weighted score target):

- V_DSM(sigma) = E_x[ Tr Cov_{x0 ~ p(x0 | x)}(x0) ] / sigma^2, exact posterior weights over ALL training points;
- V_STF(sigma; n) = E_x[ Tr Cov_R(T_R(x)) ] / sigma^2 over reference batches R of size n that contain y_i;
- bias_STF(sigma; n) = E_x[ |E_R T_R(x) - E[x0 | x]|^2 ] / sigma^2.

V_DSM vanishes at small sigma (the posterior sits on one point) and at large sigma (the target is the mean), and
peaks in between, where several points share the posterior; there STF divides it by about n - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def _posterior_moments(x: torch.Tensor, sigma: float, Y: torch.Tensor, chunk_elems: int = 1 << 24):
    """Posterior mean (B, d) and trace of the posterior covariance (B,) of x0 given x over the points Y (N, d)."""
    half_y2 = 0.5 * (Y**2).sum(1)
    y2 = (Y**2).sum(1)
    rows = max(1, chunk_elems // len(Y))
    means, traces = [], []
    for i in range(0, len(x), rows):
        w = torch.softmax((x[i:i + rows] @ Y.T - half_y2[None]) / sigma**2, dim=1)
        m = w @ Y
        means.append(m)
        traces.append((w @ y2 - (m**2).sum(1)).clamp_min(0))
    return torch.cat(means), torch.cat(traces)


@dataclass
class TargetVariance:
    sigma: np.ndarray  # (K,)
    v_dsm: np.ndarray  # (K,)
    v_stf: dict  # n -> (K,)
    bias_stf: dict  # n -> (K,)

    def to_dict(self) -> dict:
        return {"sigma": self.sigma.tolist(), "v_dsm": self.v_dsm.tolist(),
                "v_stf": {str(k): v.tolist() for k, v in self.v_stf.items()},
                "bias_stf": {str(k): v.tolist() for k, v in self.bias_stf.items()}}


@torch.no_grad()
def target_variance(data: torch.Tensor, sigmas, ref_sizes=(16, 64, 256), n_x: int = 256, n_draws: int = 32,
                    seed: int = 0) -> TargetVariance:
    """V_DSM, V_STF and the STF bias on a noise-level grid for the finite set ``data`` (N, *shape), float64.

    ``n_x`` noisy points per level (the same clean points and noise directions at every level), ``n_draws``
    reference batches per point for the STF statistics."""
    g = torch.Generator().manual_seed(seed)
    Y = data.reshape(len(data), -1).to(torch.float64)
    N = len(Y)
    own = torch.randint(0, N, (n_x,), generator=g)
    noise = torch.randn(n_x, Y.shape[1], generator=g, dtype=torch.float64)
    others = {n: torch.randint(0, N, (n_draws, n_x, n - 1), generator=g) for n in ref_sizes}
    sigmas = np.asarray(sigmas, dtype=np.float64)
    v_dsm = np.zeros(len(sigmas))
    v_stf = {n: np.zeros(len(sigmas)) for n in ref_sizes}
    bias = {n: np.zeros(len(sigmas)) for n in ref_sizes}
    for k, s in enumerate(sigmas):
        x = Y[own] + s * noise
        post_mean, post_tr = _posterior_moments(x, float(s), Y)
        v_dsm[k] = float(post_tr.mean()) / s**2
        for n in ref_sizes:
            T = torch.stack([_stf_rows(x, s, Y, own, others[n][r]) for r in range(n_draws)])  # (draws, n_x, d)
            v_stf[n][k] = float(T.var(0, unbiased=True).sum(1).mean()) / s**2
            bias[n][k] = float(((T.mean(0) - post_mean) ** 2).sum(1).mean()) / s**2
    return TargetVariance(sigmas, v_dsm, v_stf, bias)


def _stf_rows(x, s, Y, own, others) -> torch.Tensor:
    """STF targets of each row with its own reference batch [own point, n - 1 random others], batched over rows
    with exact differences: (rows, n, d) at a time."""
    R = torch.cat([Y[own][:, None], Y[others]], dim=1)  # (rows, n, d), the own point first
    logits = -((x[:, None] - R) ** 2).sum(-1) / (2 * s**2)
    return (torch.softmax(logits, dim=1)[:, :, None] * R).sum(1)
