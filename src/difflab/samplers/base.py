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

A conditional denoiser's condition rides with the rows: :class:`Noise` carries a row-aligned mapping ``cond``
(keyword -> (M, ...) tensor, e.g. ``{"class_labels": y}``; :mod:`difflab.conditioning`), the samplers select,
repeat and gather it with the rows they evaluate, and every step calls its denoiser as ``D(x, sigma, **cond)``.
No sampler knows a condition's keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch

from difflab.conditioning import NO_COND, Cond, check_rows, cond_rows, cond_to
from difflab.devices import device_of, state_dtype, to_device
from difflab.seeds import derive_seed

StepFn = Callable[..., torch.Tensor]  # step(x, j, z, cond=NO_COND) -> x_next


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
        step: ``step(x, j, z, cond=NO_COND) -> x_next`` with x (M, *shape), j the step index (an int: every row at
            that step, the sequential case) or (M,) int64 step indices (the parallel case), z (M, *shape) or None,
            and cond the rows' condition (a mapping of (M, ...) tensors; empty: unconditional), passed to the
            denoiser as ``D(x, sigma, **cond)`` (a subset of rows gets ``cond_rows(cond, rows)``).
        denoiser: the D(x, sigma, **cond) the steps call.
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
    samples' row-aligned condition ``cond`` (keyword -> (M, ...) tensor, e.g. ``{"class_labels": y}``; default
    empty: unconditional)."""

    x_T: torch.Tensor
    z: torch.Tensor | None
    cond: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rows(self.cond, self.x_T.shape[0], "sample")

    def to(self, device: torch.device) -> Noise:
        """The same noise on ``device`` (the parallel sampler needs every step's noise there at once)."""
        return Noise(*to_device((self.x_T, self.z), device), cond_to(self.cond, device))

    def rows(self, index) -> Noise:
        """The noise and condition of samples ``index`` (a slice or (R,) int64 indices)."""
        return Noise(self.x_T[index], None if self.z is None else self.z[index], cond_rows(self.cond, index))


@dataclass(frozen=True)
class Placement:
    """Where one sampling call runs: the state's ``device`` and ``dtype``, resolved once (:meth:`of`)."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def of(cls, denoiser, device=None, dtype=None) -> Placement:
        """``device`` (None: the denoiser's, :func:`~difflab.devices.device_of`) and the state ``dtype`` there
        (float32, float64, or ``"auto"`` / None: the device's default, :func:`~difflab.devices.state_dtype`)."""
        device = device_of(denoiser) if device is None else torch.device(device)
        return cls(device, state_dtype(dtype, device))

    def extra(self) -> dict:
        """The stats' record of it: {"device": "cpu", "state_dtype": "float64"}."""
        return {"device": str(self.device), "state_dtype": str(self.dtype).removeprefix("torch.")}


def draw_noise(
    seed: int, indices, shape: tuple[int, ...], n_steps: int, stochastic: bool, dtype=None, cond: Cond | None = None
) -> Noise:
    """Per-sample noise for the samples ``indices`` (an iterable of ints) under the run ``seed``, on the CPU.

    Sample k's generator yields x_T first, then the (n_steps, *shape) step noise. Drawn in float64, cast to
    ``dtype`` (None: the default state dtype, :func:`difflab.devices.state_dtype`). ``cond``: the samples'
    row-aligned condition (one row per index), carried as it is (None: unconditional).
    """
    return noise_for(seed, indices, shape, n_steps, stochastic, state_dtype(dtype), cond)


def noise_for(seed: int, indices, shape: tuple[int, ...], n_steps: int, stochastic: bool, dtype: torch.dtype,
              cond: Cond | None = None) -> Noise:
    """:func:`draw_noise` in a dtype already resolved (a sampling call resolves it once, :class:`Placement`)."""
    g = torch.Generator()
    xs, zs = [], []
    for k in indices:
        g.manual_seed(derive_seed(seed, k))
        xs.append(torch.randn(shape, generator=g, dtype=torch.float64))
        if stochastic:
            zs.append(torch.randn((n_steps, *shape), generator=g, dtype=torch.float64))
    x_T = torch.stack(xs).to(dtype)
    z = torch.stack(zs).to(dtype) if stochastic else None
    return Noise(x_T, z, dict(cond or NO_COND))


def run_chain(chain: Chain, noise: Noise, callback: Callable | None = None, device=None) -> torch.Tensor:
    """The sequential sampler: x_0 = prior_scale x_T, then every step in order, each with the noise's condition.
    Returns the samples (M, *shape) on ``device`` (None: the chain's denoiser's), where the state lives; the step
    noise is moved there step by step.

    ``callback(j, x)`` is called after each step with the new state's x (M, *shape).
    """
    device = device_of(chain.denoiser) if device is None else torch.device(device)
    x = chain.lift(chain.prior_scale * noise.x_T.to(device))
    cond = cond_to(noise.cond, device)
    for j in range(chain.n_steps):
        z = noise.z[:, j].to(device) if noise.z is not None else None
        x = chain.step(x, j, z, cond)
        if callback is not None:
            callback(j, chain.split(x)[0])
    return chain.split(x)[0]
