"""EDM Heun sampler (Karras et al. 2022, Algorithm 2), deterministic or with stochastic churn.

The state is in sigma-space. Step j goes from sigma_j to sigma_{j+1} (sigma_N = 0): optional churn to
sigma_hat = sigma_j (1 + gamma_j), an Euler step, and the Heun correction unless sigma_{j+1} = 0 (2N - 1 NFE).
"""

from __future__ import annotations

import math

import torch

from difflab.conditioning import NO_COND, cond_rows
from difflab.errors import require
from difflab.samplers.base import Chain, bcast
from difflab.schedules import edm_sigma_steps


def sigma_space_terms(sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the parallel sampler needs of a chain in sigma-space over levels ``sig`` (N + 1,), sigma_N = 0: the
    eta = 1 (DDPM-posterior) variance between consecutive levels (N,), which scales its tolerance, and the state's
    coefficients (1, sigma_j) on x0 and the noise (N + 1, 2)."""
    s_cur, s_next = sig[:-1], sig[1:]
    return s_next**2 * (s_cur**2 - s_next**2) / s_cur**2, torch.stack([torch.ones_like(sig), sig], 1)


SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0  # EDM's sigma grid (Karras et al. 2022): its samplers' defaults


def heun_chain(
    denoiser,
    steps: int = 18,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    S_churn: float = 0.0,
    S_tmin: float = 0.0,
    S_tmax: float = float("inf"),
    S_noise: float = 1.0,
    euler: bool = False,
) -> Chain:
    """EDM sampler with N = ``steps`` noise levels; ``euler=True`` drops the Heun correction (N NFE).

    Churn: gamma_j = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_j <= S_tmax, else 0;
    x_hat = x + sqrt(sigma_hat^2 - sigma_j^2) S_noise z_j. Deterministic when S_churn = 0.
    """
    require(S_churn >= 0 and S_noise >= 0, "S_churn and S_noise must be >= 0")
    sig = edm_sigma_steps(steps, sigma_min, sigma_max, rho)
    s_cur, s_next = sig[:-1], sig[1:]
    in_range = (s_cur >= S_tmin) & (s_cur <= S_tmax)
    # float64 throughout: torch.where with Python-float branches would give the default (float32) dtype
    g = torch.full_like(s_cur, min(S_churn / steps, math.sqrt(2) - 1), dtype=torch.float64)
    gamma = torch.where(in_range, g, torch.zeros_like(g))
    s_hat = s_cur * (1 + gamma)
    churn_sd = (s_hat**2 - s_cur**2).sqrt() * S_noise
    stochastic = bool((churn_sd > 0).any())
    heun = (s_next > 0) & (not euler)

    def step_for(D):
        def step(x, j, z, cond=NO_COND):
            x_hat = x + bcast(churn_sd[j], x) * z if stochastic else x
            sh, sn = s_hat[j].to(x.dtype), s_next[j].to(x.dtype)
            d = (x_hat - D(x_hat, sh, **cond)) / bcast(sh, x)
            x_next = x_hat + bcast(sn - sh, x) * d
            if isinstance(j, int):  # every row at the same step
                if not heun[j]:
                    return x_next
                d2 = (x_next - D(x_next, sn, **cond)) / bcast(sn, x)
                return x_hat + bcast(sn - sh, x) * 0.5 * (d + d2)
            rows = heun[j]
            if rows.any():
                xr, snr = x_next[rows], sn[rows]
                d2 = (xr - D(xr, snr, **cond_rows(cond, rows))) / bcast(snr, xr)
                x_next = x_next.clone()
                x_next[rows] = x_hat[rows] + bcast(snr - sh[rows], xr) * 0.5 * (d[rows] + d2)
            return x_next

        return step

    nfe = 1 + heun.long()
    var, coef = sigma_space_terms(sig)
    return Chain("euler" if euler else "heun", steps, step_for(denoiser), denoiser, prior_scale=float(sig[0]),
                 stochastic=stochastic, nfe=nfe, noise_var=var, state_coef=coef, step_for=step_for)
