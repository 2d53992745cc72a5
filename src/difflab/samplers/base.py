"""What every sampler shares: the chain of steps, per-sample noise, the sequential loop and its stats record.

A sampler is a :class:`Chain`: the discretised reverse process x_{j+1} = step(x_j, j, z_j), j = 0..n_steps-1,
with z_j the step's pre-drawn standard normal noise. ``step`` is vectorised over rows *and step indices*
(``j`` is a (M,) tensor), so the parallel (Picard) sampler can evaluate many steps in one denoiser call with the
very same arithmetic as the sequential loop. A multistep chain (DPM-Solver++ 2M) carries what its next step needs
in a larger state: ``lift`` builds a state from the data-shaped x and the carried part, ``split`` takes it apart.

Noise is drawn per sample: sample k owns a generator seeded from (seed, k) that yields its prior draw and then one
draw per step, so sample k is identical whatever the batch size, the chunking or the number of processes. It is
drawn on the CPU and moved to the state's device (the network's), one copy per step in the sequential loop; the
chains' per-step tables stay on the CPU and :func:`bcast` moves the few coefficients a step uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from difflab.devices import device_of, state_dtype, to_device
from difflab.seeds import derive_seed

StepFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M,) or scalar coefficients as (M or 1, 1, ..., 1) in x's dtype and device, to broadcast against x (M,
    *shape)."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class Chain:
    """A sequential sampler as a chain of steps.

    Fields:
        name: sampler name, e.g. ``"ddpm"``.
        n_steps: number of steps n.
        step: ``step(x, j, z[, y]) -> x_next`` with x (M, *shape), j the step index (an int: every row at that step,
            the sequential case) or (M,) int64 step indices (the parallel case), z (M, *shape) or None, and y (M,)
            the rows' class labels (given only for a class-conditional network).
        denoiser: the D(x, sigma) the steps call.
        prior_scale: the first state is ``prior_scale * x_T`` with x_T ~ N(0, I) (1 for DDPM/DDIM, sigma_max for EDM).
        stochastic: whether steps consume noise z_j.
        nfe: (n,) denoiser evaluations per step and sample.
        noise_var: (n,) variance of the step's noise (the eta = 1 variance for deterministic samplers); the
            parallel sampler measures convergence relative to it.
        state_coef: (n + 1, 2) pairs (a_j, b_j) such that state j is a_j x0 + b_j e for clean data x0 and a unit
            noise direction e: (sqrt(abar), sqrt(1 - abar)) for VP chains, (1, sigma) for sigma-space ones. It lets
            generic code (the parallel sampler's warm start) query the denoiser at any state.
        step_for: ``step_for(denoiser) -> step``, the same step over another denoiser (the parallel sampler's
            extrapolated start steps with a frozen clean estimate); None when the chain cannot rebuild its step.
        lift: ``lift(x, d=None) -> state``, the state (M, *state_shape) of the data-shaped x (M, *shape) that
            carries the clean estimate d (M, *shape; None: none yet), for a chain whose step needs more than x (a
            multistep method's previous estimate); by default the state is x. ``state_coef`` describes this x.
        split: ``split(state) -> (x, d)``, the inverse of lift; by default (state, None).
    """

    name: str
    n_steps: int
    step: StepFn
    denoiser: Callable
    prior_scale: float
    stochastic: bool
    nfe: torch.Tensor
    noise_var: torch.Tensor
    state_coef: torch.Tensor
    step_for: Callable | None = None
    lift: Callable = lambda x, d=None: x  # noqa: E731
    split: Callable = lambda state: (state, None)  # noqa: E731


@dataclass
class SampleStats:
    """What a sampling call reports (all per call)."""

    sampler: str
    n_samples: int
    steps: int
    nfe_per_sample: float
    wall_time_s: float
    iterations: int | None = None  # Picard sweeps (parallel samplers only)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        return {k: v for k, v in {**d, **extra}.items() if v is not None}


@dataclass
class Noise:
    """Pre-drawn noise for a block of samples: ``x_T`` (M, *shape) and ``z`` (M, n_steps, *shape) or None; and the
    samples' class labels ``labels`` (M,) int64 for a class-conditional network (None: unconditional)."""

    x_T: torch.Tensor
    z: torch.Tensor | None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device) -> Noise:
        """The same noise on ``device`` (the parallel sampler needs every step's noise there at once)."""
        return Noise(*to_device((self.x_T, self.z, self.labels), device))


def draw_noise(
    seed: int, indices, shape: tuple[int, ...], n_steps: int, stochastic: bool, dtype=None
) -> Noise:
    """Per-sample noise for the samples ``indices`` (an iterable of ints) under the run ``seed``, on the CPU.

    Sample k's generator yields x_T first, then the (n_steps, *shape) step noise. Drawn in float64, cast to
    ``dtype`` (None: the default state dtype, :func:`difflab.devices.state_dtype`).
    """
    dtype = state_dtype(dtype)
    g = torch.Generator()
    xs, zs = [], []
    for k in indices:
        g.manual_seed(derive_seed(seed, k))
        xs.append(torch.randn(shape, generator=g, dtype=torch.float64))
        if stochastic:
            zs.append(torch.randn((n_steps, *shape), generator=g, dtype=torch.float64))
    x_T = torch.stack(xs).to(dtype)
    z = torch.stack(zs).to(dtype) if stochastic else None
    return Noise(x_T, z)


def run_chain(chain: Chain, noise: Noise, callback: Callable | None = None, device=None) -> torch.Tensor:
    """The sequential sampler: x_0 = prior_scale x_T, then every step in order. Returns the samples (M, *shape) on
    ``device`` (None: the chain's denoiser's), where the state lives; the step noise is moved there step by step.

    ``callback(j, x)`` is called after each step with the new state's x (M, *shape).
    """
    device = device_of(chain.denoiser) if device is None else torch.device(device)
    x = chain.lift(chain.prior_scale * noise.x_T.to(device))
    labels = () if noise.labels is None else (noise.labels.to(device),)  # (a step takes labels only if there are)
    for j in range(chain.n_steps):
        z = noise.z[:, j].to(device) if noise.z is not None else None
        x = chain.step(x, j, z, *labels)
        if callback is not None:
            callback(j, chain.split(x)[0])
    return chain.split(x)[0]
