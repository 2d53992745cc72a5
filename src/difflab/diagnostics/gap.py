"""Estimation gap (SA Fig. 4): how far a model's own stochastic trajectory drifts from the truth, step by step.

From x_{t0} = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps with real x0, the model's DDPM (eta = 1, beta_tilde)
trajectory is followed down to step 1. At each step the model's noise estimate is compared with the noise implied
by the original x0, e_s = eps_hat(x_s, s) - (x_s - sqrt(abar_s) x0) / sqrt(1 - abar_s), and the errors are
accumulated as D_s = c_s e_s + gamma_s D_{s+1} (see objectives/sa.py). Reported: || batch mean of D_s || per step.
"""

from __future__ import annotations

import torch

from difflab.denoisers import eps_hat
from difflab.devices import device_of
from difflab.objectives.sa import gap_coefficients
from difflab.schedules import DDPMSchedule


@torch.no_grad()
def estimation_gap(D, x0: torch.Tensor, t0: int = 300, schedule: DDPMSchedule | None = None, seed: int = 0) -> dict:
    """The gap curve for clean data x0 (B, *shape): {"step": [t0 .. 1], "gap": [...], "error": [...]} where
    ``error`` is the batch-mean norm of e_s itself. Computed on D's device, with the noise drawn on the CPU."""
    sched = schedule if schedule is not None else DDPMSchedule()
    c, g = gap_coefficients(sched)
    gen = torch.Generator().manual_seed(seed)
    x0 = x0.to(device=device_of(D), dtype=torch.float64)

    def draw():
        return torch.randn(x0.shape, generator=gen, dtype=torch.float64).to(x0.device)

    ab = sched.abar
    x = ab[t0].sqrt() * x0 + (1 - ab[t0]).sqrt() * draw()
    steps, gaps, errors = [], [], []
    Dacc = torch.zeros_like(x0)
    for s in range(t0, 0, -1):
        sigma = sched.sigma[s]
        e_hat = eps_hat(D, x / ab[s].sqrt(), sigma)
        e_true = (x - ab[s].sqrt() * x0) / (1 - ab[s]).sqrt()
        e = e_hat - e_true
        Dacc = c[s] * e + g[s] * Dacc
        steps.append(s)
        gaps.append(Dacc.mean(0).norm())
        errors.append(e.reshape(len(e), -1).norm(dim=1).mean())
        # one eta = 1 DDPM step with the model's estimate
        x0_hat = (x - (1 - ab[s]).sqrt() * e_hat) / ab[s].sqrt()
        g1 = ab[s - 1].sqrt() * sched.beta[s] / (1 - ab[s])
        g2 = sched.alpha[s].sqrt() * (1 - ab[s - 1]) / (1 - ab[s])
        var = (1 - ab[s - 1]) / (1 - ab[s]) * sched.beta[s]
        x = g1 * x0_hat + g2 * x + (var.sqrt() * draw() if s > 1 else 0.0)
    return {"step": steps, "gap": torch.stack(gaps).tolist(), "error": torch.stack(errors).tolist()}
