"""SA: the sequence-aware loss (Nguyen et al. 2024).

From one clean x0 and one timestep t per example, K consecutive steps t, t-1, ..., t-K+1 are noised independently,
x_{t-k} = sqrt(abar_{t-k}) x0 + sqrt(1 - abar_{t-k}) eps_k, and the signed errors e_k = eps_k - eps_hat(x_{t-k})
are summed before squaring, so errors that would accumulate along a sampling trajectory are penalised together:

    L = || e_0 ||^2 + lambda (1 / K^2) || sum_k m_k tau_k e_k ||^2,      m_k = 1[t - k >= 1]

(the k = 0 term is L_simple; steps past t = 1 drop out; tau_k = 1, or the normalised weights of the estimation-gap
recursion). The K network evaluations run as one forward pass of K x B rows.

On a flow-matching model (``grid = "flow"``) the steps are K consecutive times of the flow-Euler grid and the errors
are the velocity's, e_k = (n_k - x0) - v(x_{t_k}, t_k) with x_{t_k} = (1 - t_k) x0 + t_k n_k: the k = 0 term is
the fm loss on that grid.
"""

from __future__ import annotations

import torch

from difflab.conditioning import cond_repeat, rearrange
from difflab.denoisers import eps_hat, flow_velocity, per_sample
from difflab.devices import on
from difflab.errors import require
from difflab.objectives.base import Objective
from difflab.schedules import DDPMSchedule, edm_sigma_steps, flow_times

SA_GRIDS = ("ddpm", "edm", "flow")


def gap_coefficients(schedule: DDPMSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_s, gamma_s) for s = 0..T (index 0 unused): the estimation-gap recursion D_s = c_s e_s + gamma_s D_{s+1}
    with c_s = beta_s / sqrt(alpha_s (1 - abar_s)) and gamma_s = sqrt(alpha_s) (1 - abar_{s-1}) / (1 - abar_s)."""
    a, ab, b = schedule.alpha, schedule.abar, schedule.beta
    c = torch.zeros_like(ab)
    g = torch.zeros_like(ab)
    c[1:] = b[1:] / (a[1:] * (1 - ab[1:])).sqrt()
    g[1:] = a[1:].sqrt() * (1 - ab[:-1]) / (1 - ab[1:])
    return c, g


def tau_weights(schedule: DDPMSchedule, t: torch.Tensor, K: int, normalise: bool = True) -> torch.Tensor:
    """(B, K) weights tau_{i,s} = c_s prod_{j=i}^{s-1} gamma_j of the steps s = t - k, with i = t - K + 1 the lowest
    step of the window (clamped at 1); 0 for steps below 1; normalised to mean 1 over each window's valid steps."""
    c, g = (on(v, t) for v in gap_coefficients(schedule))
    steps = t[:, None] - torch.arange(K, device=t.device)[None]  # (B, K), s = t - k
    low = (t - K + 1).clamp(min=1)  # i, the window's lowest valid step
    prod = torch.ones(steps.shape, dtype=g.dtype, device=t.device)
    for m in range(K - 1):  # prod_{j=i}^{s-1} gamma_j, one factor j = i + m at a time (gamma_1 = 0 is allowed)
        j = low + m
        use = j[:, None] <= steps - 1
        prod = prod * torch.where(use, g[j.clamp(max=schedule.T)][:, None], torch.ones((), dtype=g.dtype))
    tau = c[steps.clamp(min=1)] * prod
    valid = steps >= 1
    tau = torch.where(valid, tau, torch.zeros_like(tau))
    return tau / (tau.sum(1, keepdim=True) / valid.sum(1, keepdim=True)) if normalise else tau


class SALoss(Objective):
    """SA-K: L_simple + lambda L_sa over K consecutive levels of a sampling grid.

    Args:
        K: consecutive steps (2: SA-2).
        lam: lambda (the paper: 1.0 for K = 2 on CelebA 64, 0.3 for SA-3, 0.2 for SA-4).
        normaliser: ``"K2"`` (1/K^2, the current reference code) or ``"K"`` (1/K, an earlier version's).
        tau: weight the errors by the normalised estimation-gap weights instead of 1 (DDPM grid only).
        antithetic: pair t with T + 1 - t (DDPM grid only).
        grid: ``"ddpm"`` (the T steps of the DDPM schedule, the papers' setting), ``"edm"`` (continuous-time
            sigma training: neighbours on the EDM sampling grid of ``grid_steps`` levels, sigma_min..sigma_max) or
            ``"flow"`` (a flow-matching velocity network: neighbours on the flow-Euler grid of ``grid_steps`` times,
            default 1000: t = k / 1000, k = 1..1000, shifted by ``shift``).
        schedule: the DDPM schedule.
    """

    precond = "eps"
    uses_schedule = True
    help = ("sequence-aware loss: K (2), lam (1.0), normaliser (K2 | K), tau (false: equal weights; true: the "
            "estimation-gap weights), antithetic (false), grid (ddpm: the DDPM steps | edm: neighbours on the EDM "
            "sampling grid of grid_steps (64) levels between sigma_min (0.002) and sigma_max (80), an EDM network | "
            "flow: neighbours on the flow-Euler grid of grid_steps (1000) times with shift (1), a velocity network)")

    def __init__(self, K: int = 2, lam: float = 1.0, normaliser: str = "K2", tau: bool = False,
                 antithetic: bool = False, grid: str = "ddpm", grid_steps: int | None = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, shift: float = 1.0,
                 schedule: DDPMSchedule | None = None):
        require(isinstance(K, int) and K >= 1, f"SA K must be a positive integer, got {K!r}")
        require(lam >= 0, f"SA lambda must be >= 0, got {lam}")
        require(normaliser in ("K2", "K"), f"SA normaliser must be 'K2' or 'K', got {normaliser!r}")
        require(grid in SA_GRIDS, f"SA grid must be one of {', '.join(SA_GRIDS)}, got {grid!r}")
        require(grid == "ddpm" or not (tau or antithetic), "SA tau and antithetic apply to the DDPM grid only")
        grid_steps = grid_steps if grid_steps is not None else 1000 if grid == "flow" else 64
        require(isinstance(grid_steps, int) and grid_steps >= 2, f"SA grid_steps must be >= 2, got {grid_steps!r}")
        require(shift > 0 and (shift == 1 or grid == "flow"), f"SA shift applies to the flow grid and must be > 0, "
                                                              f"got {shift}")
        self.K, self.lam, self.normaliser, self.tau, self.antithetic = K, lam, normaliser, tau, antithetic
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        self.grid = grid
        if grid == "edm":  # levels 0..N-1 from sigma_max down to sigma_min; "next" = one level less noise
            self.levels = edm_sigma_steps(grid_steps, sigma_min, sigma_max)[:-1].flip(0)  # index 0: sigma_min
        elif grid == "flow":  # times 0..N-1 from the grid's smallest up to t = 1
            self.levels = flow_times(grid_steps, shift)[:-1].flip(0)
        else:  # index t: the DDPM step t (index 0 unused)
            self.levels = self.schedule.sigma

    @classmethod
    def precond_for(cls, options: dict | None = None) -> str:
        """eps; "edm" for ``grid = "edm"`` (continuous-time SA trains a sigma-space network), "flow" for the flow
        grid (a velocity network)."""
        return {"edm": "edm", "flow": "flow"}.get((options or {}).get("grid"), cls.precond)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """A top level t per example (DDPM step 1..T, or EDM grid index 0..N-1 counted from sigma_min) and the
        independent noise of its K steps t, t-1, ..., t-K+1."""
        B = x0.shape[0]
        lo, hi = (1, self.schedule.T) if self.grid == "ddpm" else (0, len(self.levels) - 1)
        if self.antithetic:
            half = torch.randint(lo, hi + 1, ((B + 1) // 2,), generator=generator)
            t = torch.cat([half, hi + lo - half])[:B]
        else:
            t = torch.randint(lo, hi + 1, (B,), generator=generator)
        eps = torch.randn((B, self.K, *x0.shape[1:]), generator=generator, dtype=x0.dtype)
        return {"t": t, "eps": eps}

    def errors(self, D, x0: torch.Tensor, draws: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(e (B, K, *shape), mask (B, K)): the signed errors of the K steps, from one forward of K x B rows."""
        t, eps = draws["t"], draws["eps"]
        B, K = x0.shape[0], self.K
        steps = t[:, None] - torch.arange(K, device=t.device)[None]  # (B, K)
        first = 1 if self.grid == "ddpm" else 0
        mask = steps >= first
        sig = on(self.levels, steps)[steps.clamp(min=first)].to(x0.dtype).reshape(-1)  # (B K,)
        e = eps.reshape(B * K, *x0.shape[1:])
        DK = rearrange(D, lambda c: cond_repeat(c, K))  # (a conditional D: each row's condition for its K steps)
        if self.grid == "flow":  # sig holds times: velocity errors on the flow path
            x0k = x0.repeat_interleave(K, 0)
            x_t = (1 - per_sample(sig, e)) * x0k + per_sample(sig, e) * e
            v = flow_velocity(DK, x_t, sig)
            return (e - x0k - v).reshape(B, K, *x0.shape[1:]), mask
        x = x0.repeat_interleave(K, 0) + per_sample(sig, e) * e  # sigma-space samples of the K steps
        err = (e - eps_hat(DK, x, sig)).reshape(B, K, *x0.shape[1:])
        return err, mask

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        err, mask = self.errors(D, x0, draws)
        B, K = mask.shape
        simple = err[:, 0].reshape(B, -1).pow(2).sum(1)
        w = mask.to(err.dtype)
        if self.tau:
            w = w * tau_weights(self.schedule, draws["t"], K).to(err.dtype)
        summed = (w.reshape(B, K, *([1] * (err.ndim - 2))) * err).sum(1)
        norm = K**2 if self.normaliser == "K2" else K
        return simple + self.lam * summed.reshape(B, -1).pow(2).sum(1) / norm
