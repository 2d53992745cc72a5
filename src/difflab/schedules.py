"""Noise schedules and the conversions between t, abar, sigma and log-SNR.

Conventions: sigma-space ``x = x0 + sigma * n``; VP space
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps = sqrt(abar) (x0 + sigma eps)`` with ``sigma^2 = (1 - abar) / abar``;
log-SNR ``alpha = log(abar / (1 - abar)) = -2 log sigma``, so ``abar = sigmoid(alpha)``.
All schedule tables are float64.
"""

from __future__ import annotations

import math

import torch

from difflab.devices import on
from difflab.errors import require

# --------------------------------------------------------------------------------------------- conversions


def sigma_to_abar(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + sigma**2)


def abar_to_sigma(abar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar)."""
    return ((1.0 - abar) / abar).sqrt()


def sigma_to_logsnr(sigma: torch.Tensor) -> torch.Tensor:
    """alpha = -2 log sigma."""
    return -2.0 * sigma.log()


def logsnr_to_sigma(alpha: torch.Tensor) -> torch.Tensor:
    """sigma = exp(-alpha / 2)."""
    return (-0.5 * alpha).exp()


def logsnr_to_abar(alpha: torch.Tensor) -> torch.Tensor:
    """abar = sigmoid(alpha)."""
    return torch.sigmoid(alpha)


def abar_to_logsnr(abar: torch.Tensor) -> torch.Tensor:
    """alpha = log(abar / (1 - abar))."""
    return abar.log() - (-abar).log1p()


# --------------------------------------------------------------------------------------------- DDPM (discrete)


DDPM_KINDS = ("linear", "cosine", "scaled_linear")


class DDPMSchedule:
    """Discrete DDPM schedule with timesteps t = 1..T; index 0 is clean data (abar_0 = 1, sigma_0 = 0).

    Tables of length T + 1 (float64): ``beta``, ``alpha = 1 - beta``, ``abar = cumprod(alpha)``, ``sigma``.

    Args:
        T: number of diffusion steps (1000 in all three papers).
        kind: ``"linear"`` (beta from ``beta_start`` to ``beta_end``), ``"cosine"`` (Nichol and Dhariwal, s = 0.008;
            diffusers' ``squaredcos_cap_v2``) or ``"scaled_linear"`` (sqrt(beta) linear, as diffusers names it).
        beta_start, beta_end: the (scaled) linear schedule's end points (1e-4, 0.02).
    """

    def __init__(self, T: int = 1000, kind: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02):
        require(isinstance(T, int) and T >= 2, f"schedule T must be an integer >= 2, got {T!r}")
        require(kind in DDPM_KINDS, f"unknown DDPM schedule kind {kind!r}: use {', '.join(map(repr, DDPM_KINDS))}")
        self.T, self.kind = T, kind
        self.beta_start, self.beta_end = beta_start, beta_end
        if kind == "linear":
            beta = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            beta = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
        self.alpha = 1.0 - self.beta
        self.abar = torch.cumprod(self.alpha, 0)
        self.sigma = abar_to_sigma(self.abar)
        self._log_sigma = self.sigma[1:].log()  # increasing in t = 1..T

    def config(self) -> dict:
        return {"T": self.T, "kind": self.kind, "beta_start": self.beta_start, "beta_end": self.beta_end}

    @property
    def sigma_min(self) -> float:
        return float(self.sigma[1])

    @property
    def sigma_max(self) -> float:
        return float(self.sigma[self.T])

    def t_from_sigma(self, sigma: torch.Tensor, discrete: bool = True) -> torch.Tensor:
        """Timestep for a sigma: the nearest integer t in 1..T (``discrete``), else a continuous t >= 0.

        The continuous t interpolates t linearly in log sigma between table entries and extrapolates with the
        end segments' slopes outside [sigma_1, sigma_T] (clamped at t = 0). Returns float64 of sigma's shape.
        """
        ls = sigma.to(torch.float64).clamp_min(1e-30).log()
        grid = on(self._log_sigma, ls)
        idx = torch.searchsorted(grid, ls.contiguous()).clamp(1, self.T - 1)  # grid[idx-1] <= ls < grid[idx]
        lo, hi = grid[idx - 1], grid[idx]
        frac = (ls - lo) / (hi - lo)
        t = idx.to(torch.float64) + frac  # grid[k] is t = k + 1, so lo is t = idx
        if discrete:
            return t.round().clamp(1, self.T)
        return t.clamp_min(0.0)

    def timesteps(self, n: int, spacing: str = "uniform") -> torch.Tensor:
        """A strictly decreasing sub-sequence of n timesteps in T..1 (int64; diffusers' 0-based index is t - 1).

        ``uniform``: round(linspace(T, 1, n)); ``quadratic``: 1 + (T - 1) u^2 on a uniform u grid (denser at low
        noise, DDIM's choice); collisions at the low end are pushed apart so that exactly n distinct steps remain.
        diffusers' ``timestep_spacing`` conventions, as its schedulers compute them (then + 1):
        ``leading`` (its default): k T // n for k = n - 1 .. 0, a fixed stride that never reaches T unless n = T;
        ``trailing``: round(T - k T / n) - 1 for k = 0 .. n - 1, from T down; ``linspace``: round(linspace(0, T - 1,
        n)), from T down, which is ``uniform`` up to ties in the rounding.
        """
        require(isinstance(n, int) and 1 <= n <= self.T, f"number of steps must be in 1..{self.T}, got {n!r}")
        require(spacing in SPACINGS, f"unknown spacing {spacing!r}: use {', '.join(map(repr, SPACINGS))}")
        if spacing in DIFFUSERS_SPACINGS:
            return torch.from_numpy(_diffusers_timesteps(self.T, n, spacing) + 1)
        u = torch.linspace(1.0, 0.0, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
        frac = u if spacing == "uniform" else u**2
        t = (1 + (self.T - 1) * frac).round().long()
        for i in range(n - 2, -1, -1):  # strictly decreasing, smallest at least 1
            t[i] = max(int(t[i]), int(t[i + 1]) + 1)
        return t


SPACINGS = ("uniform", "quadratic", "leading", "trailing", "linspace")
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")


def _diffusers_timesteps(T: int, n: int, spacing: str):
    """diffusers' 0-based inference timesteps (numpy int64, decreasing) for ``timestep_spacing`` (steps_offset 0)."""
    import numpy as np

    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)


# --------------------------------------------------------------------------------------------- continuous


class VPSchedule:
    """Continuous VP schedule (EDM, Song et al.), t in [eps_t, 1]:
    sigma(t) = sqrt(exp(0.5 beta_d t^2 + beta_min t) - 1)."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, eps_t: float = 1e-5):
        self.beta_d, self.beta_min, self.eps_t = beta_d, beta_min, eps_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t).sqrt()

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""
        return ((self.beta_min**2 + 2 * self.beta_d * torch.log1p(sigma**2)).sqrt() - self.beta_min) / self.beta_d


def edm_sigma_steps(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float64
) -> torch.Tensor:
    """EDM discretisation: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i < n, and sigma_n = 0.

    Returns n + 1 values (float64 by default), decreasing, ending in 0.
    """
    require(isinstance(n, int) and n >= 1, f"number of EDM steps must be a positive integer, got {n!r}")
    require(0 < sigma_min < sigma_max, f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(n, dtype=torch.float64)
    denom = max(n - 1, 1)
    s = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).to(dtype)


# --------------------------------------------------------------------------------------------- flow matching


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t): the rectified-flow path x_t = (1 - t) x0 + t n is the VE path x0 + sigma n scaled by
    1 - t."""
    return t / (1 - t)


def flow_t(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma), the inverse of :func:`flow_sigma`."""
    return sigma / (1 + sigma)


def shift_t(t, shift: float):
    """SD3's timestep shift t' = a t / (1 + (a - 1) t) (diffusers' ``shift``), i.e. sigma' = a sigma; a = 1: none."""
    return shift * t / (1 + (shift - 1) * t)


def flow_times(n: int, shift: float = 1.0, T: int = 1000) -> torch.Tensor:
    """The n + 1 times t_0 = 1 > ... > t_{n-1} > t_n = 0 of diffusers' ``FlowMatchEulerDiscreteScheduler`` (and its
    Heun twin) with ``num_train_timesteps`` T, as it computes them: its training grid k / T (k = 1..T) shifted, then
    n times spaced linearly from that grid's top (1) to its bottom, shift(1 / T), and shifted again (so with a shift
    the last time is shifted twice, as diffusers does), and a final 0. float64."""
    require(isinstance(n, int) and n >= 1, f"number of flow steps must be a positive integer, got {n!r}")
    require(isinstance(T, int) and T >= 1, f"num_train_timesteps must be a positive integer, got {T!r}")
    require(shift > 0, f"shift must be > 0, got {shift}")
    lo = shift_t(1.0 / T, shift)
    t = shift_t(torch.linspace(1.0, lo, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64),
                shift)
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])
