"""DPM-Solver++ (2M): the data-prediction, second-order multistep solver of the probability-flow ODE (Lu et al. 2022),
as diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` runs it.

Two names, one step: ``dpmpp-2m`` on the DDPM (VP) timestep grid, its state the VP sample (the options of DDIM:
steps, schedule, spacing, clip), and ``dpmpp-2m-edm`` on EDM's sigma grid, its state in sigma-space (the options
of Heun: steps, sigma_min, sigma_max, rho). With sigma-space levels s_j (s_n = 0), lambda_j = log(alpha_j /
sigma_j) = -log s_j, h_j = lambda_{j+1} - lambda_j, r_j = h_{j-1} / h_j and the data estimate D_j = D(x_j, s_j):

    x_{j+1} = a_{j+1} [ (s_{j+1} / s_j) x_j / a_j + (1 - e^{-h_j}) ((1 + 1/(2 r_j)) D_j - 1/(2 r_j) D_{j-1}) ],

with e^{-h_j} = s_{j+1} / s_j and a_j the state's scale (sqrt(abar) on the VP grid, 1 in sigma-space). The first
step and the last (to s = 0, where it returns D_{n-1}) are first order (the 1/(2 r) terms dropped), as diffusers'
``lower_order_final`` with ``final_sigmas_type="zero"``; two steps are DDIM's.

The method is not Markov in x, so the chain's state is [x_j, D_{j-1}] (M, 2, *shape), stepped to [x_{j+1}, D_j]
with one denoiser call (``lift`` / ``split`` of :class:`~difflab.samplers.base.Chain`; D_{-1} = 0 is never used):
a deterministic chain that the parallel sampler solves like any other, summing the drifts of x and taking D_j as
the step returns it.
"""

from __future__ import annotations

import torch

from difflab.conditioning import NO_COND
from difflab.samplers.base import Chain, bcast
from difflab.samplers.ddpm import _state_coef, _table
from difflab.samplers.edm import RHO, SIGMA_MAX, SIGMA_MIN, sigma_space_terms
from difflab.schedules import DDPMSchedule, edm_sigma_steps


def _carry(x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
    """The state [x, d] (M, 2, *shape) of x and the carried estimate d (M, *shape; None: zeros)."""
    return torch.stack([x, torch.zeros_like(x) if d is None else d.to(x)], 1)


def _split(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and d (M, *shape) of a state [x, d] (M, 2, *shape)."""
    return state[:, 0], state[:, 1]


def _chain(name: str, denoiser, s: torch.Tensor, a: torch.Tensor, clip: float | None, state_coef: torch.Tensor,
           noise_var: torch.Tensor, prior_scale: float) -> Chain:
    """The 2M chain over sigma-space levels s (n + 1,) with s_n = 0, the state j being a_j (x0 + s_j e) (a (n + 1,))."""
    n = len(s) - 1
    ratio = s[1:] / s[:-1]  # e^{-h_j}
    lam = -s[:-1].log()  # lambda_j, j < n (lambda_n = inf)
    h = lam[1:] - lam[:-1]  # h_j, j < n - 1
    r = h[:-1] / h[1:]  # r_j, j = 1 .. n - 2
    c = torch.zeros(n, dtype=torch.float64)
    c[1:n - 1] = 0.5 / r  # 1/(2 r_j); 0 at the first-order first and last steps
    x_coef = a[1:] / a[:-1] * ratio
    d_coef = a[1:] * (1 - ratio)
    now, prev = d_coef * (1 + c), d_coef * c  # the weights of D_j and D_{j-1}
    inv_a = a[:-1].reciprocal()

    def step_for(D):
        def step(state, j, z, cond=NO_COND):
            x, d_prev = _split(state)
            d = D(x * bcast(inv_a[j], x), s[j].to(x.dtype), **cond).to(x.dtype)
            d = d.clamp(-clip, clip) if clip is not None else d
            x_next = bcast(x_coef[j], x) * x + bcast(now[j], x) * d - bcast(prev[j], x) * d_prev
            return torch.stack([x_next, d], 1)

        return step

    return Chain(name, n, step_for(denoiser), denoiser, prior_scale=prior_scale, stochastic=False,
                 nfe=torch.ones(n, dtype=torch.long), noise_var=noise_var, state_coef=state_coef, step_for=step_for,
                 lift=_carry, split=_split)


def dpmpp_chain(
    denoiser,
    steps=20,
    schedule: DDPMSchedule | None = None,
    spacing: str = "trailing",
    clip: float | None = None,
) -> Chain:
    """DPM-Solver++ 2M on DDPM timesteps tau_0 > ... > tau_{n-1} and a final abar = 1; the state is VP, x_0 = x_T.

    Args:
        denoiser: D(x, sigma, **cond).
        steps: number of steps (a sub-sequence with ``spacing``) or an explicit decreasing list of timesteps (20).
        schedule: the DDPM schedule (linear, T = 1000).
        spacing: any of :meth:`~difflab.schedules.DDPMSchedule.timesteps`; the default ``"trailing"`` (T, ...,
            T/n, diffusers' ``timestep_spacing="trailing"``) because a grid that ends at t = 1 (``"uniform"``) makes
            the second-last step's h far larger than the one before: 1/(2 r) then extrapolates D, and 10 steps are
            worse than DDIM's. diffusers' own ``"linspace"`` and ``"leading"`` lists for DPM-Solver are not
            difflab's: pass them as a list.
        clip: clip D to [-clip, clip] before it enters the update (1.0 for images in [-1, 1]); None keeps it.
    """
    schedule = schedule if schedule is not None else DDPMSchedule()
    c = _table(schedule, steps, spacing)
    zero = torch.zeros(1, dtype=torch.float64)
    s = torch.cat([c["sigma_t"], zero])
    a = torch.cat([c["abar_t"], zero + 1]).sqrt()
    return _chain("dpmpp-2m", denoiser, s, a, clip, _state_coef(schedule, c), c["beta_tilde"].clone(), 1.0)


def dpmpp_edm_chain(denoiser, steps: int = 20, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                    rho: float = RHO) -> Chain:
    """DPM-Solver++ 2M on EDM's sigma grid (:func:`~difflab.schedules.edm_sigma_steps`, N = ``steps`` levels and 0);
    the state is in sigma-space, x_0 = sigma_max x_T."""
    s = edm_sigma_steps(steps, sigma_min, sigma_max, rho)
    var, coef = sigma_space_terms(s)
    return _chain("dpmpp-2m-edm", denoiser, s, torch.ones_like(s), None, coef, var, float(s[0]))
