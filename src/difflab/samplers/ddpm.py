"""DDPM ancestral sampling and DDIM(eta) on any decreasing sub-sequence of DDPM timesteps.

The state is the VP sample x_t = sqrt(abar_t) (x0 + sigma_t n); the denoiser is queried in sigma-space at
x_t / sqrt(abar_t). A step goes from t = tau_j to s = tau_{j+1} (s = 0 after the last: abar_0 = 1, clean data),
with the effective beta = 1 - abar_t / abar_s, so a sub-sequence is the exact DDPM of the skipped chain.
"""

from __future__ import annotations

import torch

from difflab.conditioning import NO_COND
from difflab.errors import require
from difflab.samplers.base import Chain, bcast
from difflab.schedules import DDPMSchedule


def _table(schedule: DDPMSchedule, steps, spacing: str) -> dict[str, torch.Tensor]:
    """Per-step coefficients (float64, (n,)) for timesteps tau_0 > ... > tau_{n-1} and a final s = 0."""
    if isinstance(steps, int):
        t = schedule.timesteps(steps, spacing)
    else:
        t = torch.as_tensor(steps, dtype=torch.long).reshape(-1)
        require(len(t) >= 1 and bool((t[:-1] > t[1:]).all()) and int(t[-1]) >= 1 and int(t[0]) <= schedule.T,
                f"timesteps must be strictly decreasing integers in 1..{schedule.T}")
    s = torch.cat([t[1:], torch.zeros(1, dtype=torch.long)])
    abar_t, abar_s = schedule.abar[t], schedule.abar[s]
    beta = 1 - abar_t / abar_s
    beta_tilde = (1 - abar_s) / (1 - abar_t) * beta
    return {
        "t": t,
        "abar_t": abar_t,
        "abar_s": abar_s,
        "beta": beta,
        "beta_tilde": beta_tilde,
        "sigma_t": ((1 - abar_t) / abar_t).sqrt(),
        "gamma1": abar_s.sqrt() * beta / (1 - abar_t),
        "gamma2": (abar_t / abar_s).sqrt() * (1 - abar_s) / (1 - abar_t),
    }


def _state_coef(schedule: DDPMSchedule, c: dict) -> torch.Tensor:
    """(n + 1, 2): state j = sqrt(abar) x0 + sqrt(1 - abar) e at t = tau_j, and the clean final state (1, 0)."""
    abar = schedule.abar[torch.cat([c["t"], torch.zeros(1, dtype=torch.long)])]
    return torch.stack([abar.sqrt(), (1 - abar).sqrt()], 1)


def _x0_hat(denoiser, x, j, c, clip, cond=NO_COND):
    """The denoiser's clean estimate at the VP state x of step j (with the rows' condition), optionally clipped to
    [-clip, clip]."""
    x0 = denoiser(x * bcast(c["abar_t"][j].rsqrt(), x), c["sigma_t"][j].to(x.dtype), **cond)
    return x0.clamp(-clip, clip) if clip is not None else x0


def ddpm_chain(
    denoiser,
    steps=None,
    schedule: DDPMSchedule | None = None,
    variance: str = "beta",
    spacing: str = "uniform",
    clip: float | None = None,
) -> Chain:
    """DDPM ancestral sampler: x_s = gamma1 x0_hat + gamma2 x_t + sqrt(v) z, no noise at the last step.

    Args:
        denoiser: D(x, sigma, **cond).
        steps: number of steps (a sub-sequence with ``spacing``) or an explicit decreasing list of timesteps;
            None: every step of the schedule (T).
        schedule: the DDPM schedule (linear, T = 1000).
        variance: ``"beta"`` (v = beta, "large": the CDL sequential code) or ``"beta_tilde"``
            (v = (1 - abar_s)/(1 - abar_t) beta, "small": the CDL parallel code, SA's eta = 1).
        spacing: ``"uniform"`` or ``"quadratic"`` when ``steps`` is a number.
        clip: clip x0_hat to [-clip, clip] (1.0 for images in [-1, 1]); None keeps it as is.
    """
    require(variance in ("beta", "beta_tilde"), f"unknown DDPM variance {variance!r}: use 'beta' or 'beta_tilde'")
    schedule = schedule if schedule is not None else DDPMSchedule()
    c = _table(schedule, schedule.T if steps is None else steps, spacing)
    v = c[variance].clone()
    v[-1] = 0.0  # the last step returns the posterior mean
    sd = v.sqrt()

    def step_for(D):
        def step(x, j, z, cond=NO_COND):
            x0 = _x0_hat(D, x, j, c, clip, cond)
            x_next = bcast(c["gamma1"][j], x) * x0 + bcast(c["gamma2"][j], x) * x
            return x_next + bcast(sd[j], x) * z

        return step

    n = len(c["t"])
    return Chain("ddpm", n, step_for(denoiser), denoiser, prior_scale=1.0, stochastic=True,
                 nfe=torch.ones(n, dtype=torch.long), noise_var=v, state_coef=_state_coef(schedule, c),
                 step_for=step_for)


def ddim_chain(
    denoiser,
    steps=50,
    eta: float = 0.0,
    schedule: DDPMSchedule | None = None,
    spacing: str = "uniform",
    clip: float | None = None,
) -> Chain:
    """DDIM(eta): x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - s_eta^2) eps_hat + s_eta z, s_eta^2 = eta^2 beta_tilde.

    eta = 0 is deterministic (the probability-flow discretisation); eta = 1 is DDPM with the beta_tilde variance.
    The final step goes to abar = 1 (clean data), so the last output is x0_hat of the smallest timestep.
    """
    require(eta >= 0, f"DDIM eta must be >= 0, got {eta}")
    schedule = schedule if schedule is not None else DDPMSchedule()
    c = _table(schedule, steps, spacing)
    s_eta2 = eta**2 * c["beta_tilde"]
    dir_coef = (1 - c["abar_s"] - s_eta2).clamp_min(0).sqrt()
    s_eta = s_eta2.sqrt()

    def step_for(D):
        def step(x, j, z, cond=NO_COND):
            x0 = _x0_hat(D, x, j, c, clip, cond)
            eps = (x - bcast(c["abar_t"][j].sqrt(), x) * x0) * bcast((1 - c["abar_t"][j]).rsqrt(), x)
            x_next = bcast(c["abar_s"][j].sqrt(), x) * x0 + bcast(dir_coef[j], x) * eps
            return x_next + bcast(s_eta[j], x) * z if eta > 0 else x_next

        return step

    n = len(c["t"])
    return Chain("ddim", n, step_for(denoiser), denoiser, prior_scale=1.0, stochastic=eta > 0,
                 nfe=torch.ones(n, dtype=torch.long), noise_var=c["beta_tilde"].clone(),
                 state_coef=_state_coef(schedule, c), step_for=step_for)
