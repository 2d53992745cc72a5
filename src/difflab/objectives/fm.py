"""Flow matching: rectified flow / conditional flow matching with sigma_min = 0.

The path x_t = (1 - t) x0 + t n, n ~ N(0, I), and the regression of a velocity v(x_t, t) on u = n - x0:

    L = | v(x_t, t) - (n - x0) |^2,        t ~ uniform(0, 1) or logit-normal(loc, scale), optionally shifted.

In difflab's sigma-space terms it is a weighting and a noise-level density: x_t / (1 - t) = x0 + sigma n with
sigma = t / (1 - t), x0_hat = x_t - t v, so |v - u|^2 = |D - x0|^2 / t^2 with D the denoiser of the ``flow``
preconditioning; logit-normal t is log-normal sigma and the shift multiplies sigma. The loss is computed in the
velocity form when the network is a velocity network (no 1 / t^2 amplification of round-off near t = 0), in the
weighted denoiser form for any other.

``ot = true`` is OT-CFM's minibatch coupling (Tong et al. 2024): the noise rows are paired with the data rows by
the exact assignment that minimises sum_i |x0_i - n_pi(i)|^2 (scipy's linear_sum_assignment, O(B^3): about 9 ms
for B = 256 and 0.17 s for B = 1,024 on this project's CPU, where a Dino MLP step takes 20 ms; ``ot_block = 256``
pairs within blocks of 256 consecutive rows instead, as OT-CFM's per-device batches do). The noise is drawn first
and the assignment is computed in ``draw`` on the whole (global) batch, so splitting the batch across processes or
chunks leaves it as it is.

The loss-weighting options (:mod:`difflab.objectives.weighting`) apply with the velocity form's own weight on
|D - x0|^2, ((1 + sigma) / sigma)^2 = 1 / t^2, and the path's SNR (1 - t)^2 / t^2 = 1 / sigma^2.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.denoisers import FlowPrecond, per_sample
from difflab.errors import require
from difflab.objectives.base import Objective
from difflab.objectives.weighting import WEIGHTING_HELP, Reweighted
from difflab.schedules import flow_sigma, shift_t

T_DENSITIES = ("uniform", "logit-normal")
T_CLAMP = 1e-5  # t is kept in [T_CLAMP, 1 - T_CLAMP]: sigma finite and positive (STF's weights need both)


def _sum_dims(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).sum(1)


def velocity_of(D):
    """The velocity network behind D (a :class:`FlowPrecond`, possibly with a bound condition), or None."""
    from difflab.conditioning import Bound

    inner = D.denoiser if isinstance(D, Bound) else D
    return inner if isinstance(inner, FlowPrecond) else None


def ot_pairing(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation pi (B,) int64 minimising sum_i |x0_i - noise_pi(i)|^2 (exact; float64 costs)."""
    from scipy.optimize import linear_sum_assignment

    a = x0.reshape(x0.shape[0], -1).double().cpu()
    b = noise.reshape(noise.shape[0], -1).double().cpu()
    cost = torch.cdist(a, b).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    pi = np.empty(len(rows), dtype=np.int64)
    pi[rows] = cols
    return torch.from_numpy(pi)


class FlowMatching(Reweighted, Objective):
    """Conditional flow matching on the rectified-flow path (sigma_min = 0).

    Args:
        t_density: ``"uniform"`` (rectified flow, torchcfm) or ``"logit-normal"`` (SD3: t = sigmoid(loc + scale z)).
        loc, scale: the logit-normal's (SD3's defaults 0, 1).
        shift: SD3's timestep shift a, t' = a t / (1 + (a - 1) t) (1: none).
        ot: pair noise and data rows by minibatch optimal transport (OT-CFM).
        ot_block: solve the assignment within blocks of this many consecutive rows (0: the whole batch).
        weighting, snr_gamma, learned_weighting: the loss weighting (:mod:`difflab.objectives.weighting`): a weight
            W(sigma) on |D - x0|^2 is the factor W t^2 on |v - u|^2.
    """

    precond = "flow"
    help = ("flow matching (rectified flow, sigma_min 0; a velocity network): t_density (uniform | logit-normal), "
            "loc (0), scale (1), shift (1: none; SD3's timestep shift), ot (false: minibatch optimal-transport "
            f"pairing of noise to data, OT-CFM), ot_block (0: the whole batch; else blocks of this many rows), "
            f"{WEIGHTING_HELP}")

    def __init__(self, t_density: str = "uniform", loc: float = 0.0, scale: float = 1.0, shift: float = 1.0,
                 ot: bool = False, ot_block: int = 0, weighting: str = "none", snr_gamma: float | None = None,
                 learned_weighting: bool = False):
        require(t_density in T_DENSITIES, f"fm t_density must be one of {', '.join(T_DENSITIES)}, got {t_density!r}")
        require(scale > 0, f"fm scale must be > 0, got {scale}")
        require(shift > 0, f"fm shift must be > 0 (1: none), got {shift}")
        require(isinstance(ot, bool), f"fm ot must be true or false, got {ot!r}")
        require(isinstance(ot_block, int) and ot_block >= 0, f"fm ot_block must be an integer >= 0 (0: the whole "
                                                             f"batch), got {ot_block!r}")
        self.t_density, self.loc, self.scale, self.shift, self.ot = t_density, loc, scale, shift, ot
        self.ot_block = ot_block
        self.init_weighting(weighting, snr_gamma, learned_weighting)

    def sample_t(self, B: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B,) float64 times from the density, shifted, in [T_CLAMP, 1 - T_CLAMP]."""
        if self.t_density == "uniform":
            t = torch.rand(B, generator=generator, dtype=torch.float64)
        else:
            t = torch.sigmoid(self.loc + self.scale * torch.randn(B, generator=generator, dtype=torch.float64))
        return shift_t(t, self.shift).clamp(T_CLAMP, 1 - T_CLAMP)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """The density of the (shifted) t at t (float64), for plots and checks."""
        t = t.double()
        a = self.shift
        u = t / (a - (a - 1) * t)  # the unshifted time
        du = a / (a - (a - 1) * t) ** 2
        if self.t_density == "uniform":
            p = torch.ones_like(u)
        else:
            z = (torch.log(u) - torch.log1p(-u) - self.loc) / self.scale
            p = torch.exp(-0.5 * z**2) / (self.scale * math.sqrt(2 * math.pi) * u * (1 - u))
        return p * du

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """t (B,), its sigma = t / (1 - t) and the noise (B, *shape), paired with the rows by OT when ``ot``."""
        t = self.sample_t(x0.shape[0], generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        if self.ot:
            k = self.ot_block or x0.shape[0]
            noise = torch.cat([noise[i:i + k][ot_pairing(x0[i:i + k], noise[i:i + k])]
                               for i in range(0, x0.shape[0], k)])
        return {"t": t.to(x0.dtype), "sigma": flow_sigma(t).to(x0.dtype), "noise": noise}

    def noised(self, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        """The sigma-space point x0 + sigma n = x_t / (1 - t) (what STF weighs its references by)."""
        return x0 + per_sample(draws["sigma"], x0) * draws["noise"]

    def regress(self, D, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, x0: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """|v(x_t, t) - u|^2 towards the clean ``target`` at the sigma-space point x (B, *shape): u = (x_t - target)
        / t, formed as n - x0 + (x0 - target) / t when the row's x0 and noise are given (exact when target = x0).
        For a network that is not a velocity network: ((1 + sigma) / sigma)^2 |D(x, sigma) - target|^2, the same.
        Reweighted by the weighting options (the form's weight on |D - target|^2 is ((1 + sigma) / sigma)^2)."""
        s = per_sample(sigma, x)
        t = s / (1 + s)
        form = ((1 + sigma) / sigma) ** 2 if self.weighting != "none" else None
        if velocity_of(D) is None:
            return self.reweight(((1 + sigma) / sigma) ** 2 * _sum_dims((D(x, sigma) - target) ** 2), sigma, x, form)
        x_t = x / (1 + s)
        u = (x_t - target) / t if x0 is None else noise - x0 + (x0 - target) / t
        loss = _sum_dims((D.velocity(x_t, t.reshape(-1)) - u) ** 2)  # (D: the network, or it with its condition)
        return self.reweight(loss, sigma, x, form)

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        return self.regress(D, self.noised(x0, draws), draws["sigma"], x0, x0, draws["noise"])
