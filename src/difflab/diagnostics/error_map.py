"""Denoiser-error map (CDL Fig. 1): |eps_theta(x_t, t) - eps*(x_t, t)| over a grid of (DDPM step t, VP state x_t),
against an exact denoiser, with the true marginal density p_t(x_t) to tell on-path from off-path regions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.denoisers import eps_hat
from difflab.schedules import DDPMSchedule


@dataclass
class ErrorMap:
    t: torch.Tensor  # (K,) DDPM steps
    x: torch.Tensor  # (G,) VP states x_t (1-D data)
    error: torch.Tensor  # (K, G) |eps_theta - eps*|
    density: torch.Tensor  # (K, G) p_t(x_t) of the true data

    def summary(self, threshold: float = 1e-3) -> dict:
        """Mean error where the data's marginal puts its mass (on-path: density-weighted) and where it has almost
        none (off-path: grid cells with p_t(x) < threshold)."""
        w = self.density / self.density.sum(1, keepdim=True)
        on = float((w * self.error).sum(1).mean())
        off_mask = self.density < threshold
        off = float(self.error[off_mask].mean()) if off_mask.any() else float("nan")
        return {"on_path_error": on, "off_path_error": off, "mean_error": float(self.error.mean())}


@torch.no_grad()
def eps_error_map(D, D_true, schedule: DDPMSchedule | None = None, t=None, x=None) -> ErrorMap:
    """The map for 1-D data. ``t``: DDPM steps (default 100 levels over 1..T); ``x``: VP states (default 301 points
    over [-10, 10]). ``D_true`` must have ``log_prob(x, sigma)`` (an analytic denoiser)."""
    schedule = schedule if schedule is not None else DDPMSchedule()
    t = torch.linspace(1, schedule.T, 100).round().long() if t is None else torch.as_tensor(t).long()
    x = torch.linspace(-10, 10, 301, dtype=torch.float64) if x is None else torch.as_tensor(x, dtype=torch.float64)
    err, dens = [], []
    for tt in t:
        abar, sigma = schedule.abar[tt], schedule.sigma[tt]
        y = (x / abar.sqrt())[:, None]  # sigma-space point of each VP state
        s = sigma.expand(len(x)).clone()
        err.append((eps_hat(D, y, s) - eps_hat(D_true, y, s)).abs()[:, 0])
        dens.append(D_true.log_prob(y, s).exp() / abar.sqrt())  # change of variables to the VP state
    return ErrorMap(t, x, torch.stack(err).double(), torch.stack(dens))
