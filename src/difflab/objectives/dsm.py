"""Denoising score matching: DDPM eps (L_simple) and the EDM, VP and VE weightings.

Each has the call shape of :class:`~difflab.objectives.base.Objective` and is split into ``sample_sigma`` (the
noise-level distribution) and ``regress(D, x, sigma, target)`` (its weighted L2 towards a clean target), so that
other objectives (STF) can swap the target and keep the rest. Each takes the loss-weighting options of
:mod:`difflab.objectives.weighting` (min-SNR-gamma, soft-min-SNR, the v-loss weighting, EDM2's learned weighting).
"""

from __future__ import annotations

import math

import torch

from difflab.denoisers import eps_hat, per_sample
from difflab.errors import require
from difflab.objectives.base import Objective
from difflab.objectives.weighting import WEIGHTING_HELP, Reweighted, snr
from difflab.schedules import DDPMSchedule, VPSchedule


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


class NoisedRegression(Objective):
    """x = x0 + sigma n with the method's sigma; a weighted regression of D(x, sigma) towards x0."""

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        sigma = self.sample_sigma(x0.shape[0], generator, x0.dtype)
        return {"sigma": sigma, "noise": torch.randn(x0.shape, generator=generator, dtype=x0.dtype)}

    def noised(self, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        return x0 + per_sample(draws["sigma"], x0) * draws["noise"]

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        return self.regress(D, self.noised(x0, draws), draws["sigma"], x0)


class DSMEps(Reweighted, NoisedRegression):
    """L_simple = || eps - eps_hat(x_t, t) ||^2 with t ~ U{1..T} (DDPM).

    Args:
        schedule: the discrete DDPM schedule (linear, T = 1000).
        antithetic: draw t for half the batch and pair each with T + 1 - t (a cheap variance reduction).
        weighting, snr_gamma, learned_weighting: the loss weighting (:mod:`difflab.objectives.weighting`); the
            eps-MSE's own weight on |D - x0|^2 is SNR = 1 / sigma^2, so min-snr weighs it by min(SNR, gamma) / SNR.
    """

    precond = "eps"
    uses_schedule = True
    help = f"DDPM L_simple, t ~ U{{1..T}}: antithetic (false), {WEIGHTING_HELP}"

    def __init__(self, schedule: DDPMSchedule | None = None, antithetic: bool = False, weighting: str = "none",
                 snr_gamma: float | None = None, learned_weighting: bool = False):
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        self.antithetic = antithetic
        self.init_weighting(weighting, snr_gamma, learned_weighting)

    def sample_t(self, B: int, generator: torch.Generator | None) -> torch.Tensor:
        T = self.schedule.T
        if not self.antithetic:
            return torch.randint(1, T + 1, (B,), generator=generator)
        half = torch.randint(1, T + 1, ((B + 1) // 2,), generator=generator)
        return torch.cat([half, T + 1 - half])[:B]

    def sample_sigma(self, B: int, generator, dtype) -> torch.Tensor:
        """sigma_t for t ~ U{1..T} (antithetic pairs optional)."""
        return self.schedule.sigma[self.sample_t(B, generator)].to(dtype)

    def regress(self, D, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """|| (x - target) / sigma - eps_hat(x, sigma) ||^2: the eps form of the clean target (reweighted by the
        weighting options: its weight on |D - target|^2 is SNR)."""
        eps_target = (x - target) / per_sample(sigma, x)
        loss = _sum_dims((eps_hat(D, x, sigma) - eps_target) ** 2)
        return self.reweight(loss, sigma, x, snr(sigma) if self.weighting != "none" else None)


class SigmaWeighted(Reweighted, NoisedRegression):
    """lambda(sigma) || D(x0 + sigma n, sigma) - x0 ||^2 with sigma from the method's distribution.

    Subclasses define ``sample_sigma(B, generator, dtype)`` and ``weight(sigma)`` (their own lambda), and call
    ``init_weighting`` with the loss-weighting options, whose weighting replaces lambda (``loss_weight``).
    """

    precond = "edm"

    def sample_sigma(self, B: int, generator, dtype) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The weight of |D - x0|^2 in force: ``weight(sigma)``, or the weighting option's W(sigma)."""
        return self.weight(sigma) if self.weighting == "none" else self.x0_weight(sigma)

    def regress(self, D, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.reweight(self.loss_weight(sigma) * _sum_dims((D(x, sigma) - target) ** 2), sigma, x)


class EDMLoss(SigmaWeighted):
    """EDM: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022)."""

    uses_sigma_data = True
    help = f"EDM: P_mean (-1.2), P_std (1.2), sigma_data (model.sigma_data), {WEIGHTING_HELP}"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 1.0, weighting: str = "none",
                 snr_gamma: float | None = None, learned_weighting: bool = False):
        require(P_std > 0 and sigma_data > 0, "EDM loss needs P_std > 0 and sigma_data > 0")
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
        self.init_weighting(weighting, snr_gamma, learned_weighting)

    def sample_sigma(self, B, generator, dtype):
        return (self.P_mean + self.P_std * torch.randn(B, generator=generator, dtype=dtype)).exp()

    def weight(self, sigma):
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2


class VPLoss(SigmaWeighted):
    """EDM's VP variant: t ~ U(eps_t, 1), sigma = VP sigma(t) (beta_d 19.9, beta_min 0.1), lambda = 1 / sigma^2."""

    precond = "vp"
    help = f"EDM's VP variant: {WEIGHTING_HELP}"

    def __init__(self, schedule: VPSchedule | None = None, weighting: str = "none", snr_gamma: float | None = None,
                 learned_weighting: bool = False):
        self.schedule = schedule if schedule is not None else VPSchedule()
        self.init_weighting(weighting, snr_gamma, learned_weighting)

    def sample_sigma(self, B, generator, dtype):
        e = self.schedule.eps_t
        t = e + (1 - e) * torch.rand(B, generator=generator, dtype=torch.float64)
        return self.schedule.sigma(t).to(dtype)

    def weight(self, sigma):
        return 1 / sigma**2


class VELoss(SigmaWeighted):
    """EDM's VE variant: sigma log-uniform in [sigma_min, sigma_max] = [0.02, 100], lambda = 1 / sigma^2."""

    precond = "ve"
    help = f"EDM's VE variant: sigma_min (0.02), sigma_max (100), {WEIGHTING_HELP}"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, weighting: str = "none",
                 snr_gamma: float | None = None, learned_weighting: bool = False):
        require(0 < sigma_min < sigma_max, f"VE loss needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.init_weighting(weighting, snr_gamma, learned_weighting)

    def sample_sigma(self, B, generator, dtype):
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (lo + (hi - lo) * torch.rand(B, generator=generator, dtype=dtype)).exp()

    def weight(self, sigma):
        return 1 / sigma**2
