"""Flow-matching ODE samplers: Euler and Heun in t on x_t, as diffusers' ``FlowMatchEulerDiscreteScheduler`` and
``FlowMatchHeunDiscreteScheduler`` run them.

The state is x_t = (1 - t) x0 + t n, from t_0 = 1 (pure noise, x_T itself) down the grid of
:func:`~difflab.schedules.flow_times` to t_n = 0; the ODE dx/dt = v(x_t, t) with v = (x_t - x0_hat) / t, which a
velocity network gives directly and any other denoiser through its clean estimate
(:func:`~difflab.denoisers.flow_velocity`).

- Euler: x_{j+1} = x_j + (t_{j+1} - t_j) v(x_j, t_j). In sigma-space (x~ = x_t / (1 - t), sigma = t / (1 - t)) it
  is the Euler (= DDIM) step of the same levels: the flow path is the VE path rescaled.
- Heun: the Euler predictor, then the average of the two slopes, v(x_j, t_j) and v(x_pred, t_{j+1}); the last step
  (to t = 0) stays Euler: 2n - 1 network calls, as diffusers' Heun makes them.
"""

from __future__ import annotations

import torch

from difflab.conditioning import NO_COND, cond_rows
from difflab.denoisers import flow_velocity
from difflab.samplers.base import Chain, bcast
from difflab.schedules import flow_times

FLOW_T = 1000  # diffusers' num_train_timesteps: the grid's bottom before the last step is 1 / 1000


def flow_terms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the parallel sampler, over the times t (n + 1,) from 1 to 0: the eta = 1 (DDPM-posterior) variance of
    each step in x_t's scale, t_{j+1}^2 (1 - (sigma_{j+1} / sigma_j)^2), which scales its tolerance (n,), and the
    state's coefficients (1 - t_j, t_j) on x0 and the noise (n + 1, 2)."""
    t_cur, t_next = t[:-1], t[1:]
    ratio = t_next * (1 - t_cur) / (t_cur * (1 - t_next))  # sigma_{j+1} / sigma_j, 0 at t_j = 1
    return t_next**2 * (1 - ratio**2), torch.stack([1 - t, t], 1)


def flow_euler_chain(denoiser, steps: int = 50, shift: float = 1.0, heun: bool = False) -> Chain:
    """Euler (or Heun, ``heun=True``) on diffusers' flow-matching grid of ``steps`` times with SD3's ``shift``.

    Args:
        denoiser: a flow-matching model (a :class:`FlowPrecond`), or any denoiser with a ``flow_x0`` (the exact
            ones); a sigma-space network cannot start at t = 1 and is refused there.
        steps: n, the grid's times before the final 0 (diffusers' ``num_inference_steps``; default 50, its own).
        shift: diffusers' ``shift`` (1: none; SD3 uses 3).
    """
    t = flow_times(steps, shift, FLOW_T)
    t_cur, t_next = t[:-1], t[1:]
    dt = t_next - t_cur
    second = (t_next > 0) & heun  # the steps with a corrector

    def step_for(D):
        def step(x, j, z, cond=NO_COND):
            tc = t_cur[j].to(device=x.device, dtype=x.dtype)
            h = bcast(dt[j], x)
            v = flow_velocity(D, x, tc, **cond)
            x_next = x + h * v
            if not heun:
                return x_next
            if isinstance(j, int):  # every row at the same step
                if not second[j]:
                    return x_next
                return x + h * 0.5 * (v + flow_velocity(D, x_next, t_next[j].to(x.dtype), **cond))
            rows = second[j]
            if rows.any():
                tn = t_next[j][rows].to(device=x.device, dtype=x.dtype)
                v2 = flow_velocity(D, x_next[rows], tn, **cond_rows(cond, rows))
                x_next = x_next.clone()
                x_next[rows] = x[rows] + h[rows] * 0.5 * (v[rows] + v2)
            return x_next

        return step

    var, coef = flow_terms(t)
    return Chain("flow-heun" if heun else "flow-euler", steps, step_for(denoiser), denoiser, prior_scale=1.0,
                 stochastic=False, nfe=1 + second.long(), noise_var=var, state_coef=coef, step_for=step_for)


def flow_heun_chain(denoiser, steps: int = 50, shift: float = 1.0) -> Chain:
    """Heun on diffusers' flow-matching grid (see :func:`flow_euler_chain`): 2n - 1 network calls."""
    return flow_euler_chain(denoiser, steps, shift, heun=True)
