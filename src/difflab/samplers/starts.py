"""Starting trajectories of the parallel sampler: the buffer X (n + 1, M, *shape) before the first sweep.

- ``prior``: every slot is x_0 (the buffer as :func:`~difflab.samplers.picard.picard` allocates it).
- ``warm`` (:func:`warm_start`): a coarse deterministic pass of a few denoiser calls.
- ``extrapolate`` (:func:`extrapolated_start`, ParaSolver's preconditioned start, Lu et al. 2025): P true steps,
  then every later step with the last clean estimate x0_hat frozen and the pre-drawn noise z_j, so the buffer
  already carries the chain's noise and lands near a clean sample. No denoiser call after the P steps.
"""

from __future__ import annotations

import torch

from difflab.conditioning import NO_COND, Cond
from difflab.denoisers import flow_x0
from difflab.errors import require
from difflab.samplers.base import Chain, Noise

FROZEN_ROWS = "frozen_rows"  # the condition :func:`extend` hands its steps: each row's sample (for :class:`Frozen`)


def warm_start(chain: Chain, X: torch.Tensor, steps: int, cond: Cond = NO_COND) -> int:
    """Fill the trajectory buffer X (n + 1, M, *shape) from X[0] with a coarse deterministic (DDIM-like) pass of
    ``steps`` denoiser calls (with the M samples' condition ``cond``): at each coarse level, x0_hat and the implied
    noise direction e give every finer state a_j x0_hat + b_j e up to the next level (carrying x0_hat, for a chain
    that carries a clean estimate). Returns the NFE per sample it used (its sequential rounds)."""
    n = chain.n_steps
    a, b = chain.state_coef[:, 0], chain.state_coef[:, 1]
    cuts = sorted({round(i * n / steps) for i in range(steps + 1)})
    used = 0
    for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
        x = chain.split(X[c0])[0]
        if b[c0] == 0:
            break
        if a[c0] > 0:
            x0 = chain.denoiser(x / a[c0].to(x.dtype), (b[c0] / a[c0]).to(x.dtype).expand(x.shape[0]), **cond)
        else:  # pure noise (a flow chain's t = 1): only a denoiser with a flow form answers there
            x0 = flow_x0(chain.denoiser, x / b[c0].to(x.dtype), torch.ones((), dtype=x.dtype), **cond)
        e = (x - a[c0].to(x.dtype) * x0) / b[c0].to(x.dtype)
        for j in range(c0 + 1, c1 + 1):
            X[j] = chain.lift(a[j].to(x.dtype) * x0 + b[j].to(x.dtype) * e, x0)
        used += 1
    return used


class Frozen:
    """A stand-in denoiser that returns a fixed clean estimate whatever the state and noise level: ``x0`` (M,
    *shape), one per sample. Its condition is the rows' sample indices, ``frozen_rows`` (R,) int64 (the estimate
    already holds the samples' own condition), so it follows a step that evaluates a subset of rows, like Heun's
    correction."""

    def __init__(self, x0: torch.Tensor):
        self.x0 = x0

    def __call__(self, x, sigma, frozen_rows):
        return self.x0[frozen_rows]

    def flow_x0(self, x_t, t, frozen_rows):
        return self.x0[frozen_rows]


class _Recorder:
    """The chain's denoiser, keeping its last output (the clean estimate of the last step)."""

    def __init__(self, denoiser):
        self.denoiser, self.last = denoiser, None

    def __call__(self, x, sigma, **cond):
        self.last = self.denoiser(x, sigma, **cond)
        return self.last

    def flow_x0(self, x_t, t, **cond):
        self.last = flow_x0(self.denoiser, x_t, t, **cond)
        return self.last


def extrapolated_start(chain: Chain, noise: Noise, X: torch.Tensor, steps: int) -> tuple[int, torch.Tensor]:
    """Fill X (n + 1, M, *shape) from X[0]: ``steps`` (P) true sequential steps, then the rest of the chain with the
    P-th step's clean estimate frozen (:func:`extend`). Returns P (the sequential rounds, capped at n) and the frozen
    estimates (M, *shape)."""
    require(chain.step_for is not None, f"the {chain.name} chain cannot rebuild its step, so it has no "
                                        "extrapolated start: use init='prior' or 'warm'")
    n, M = chain.n_steps, X.shape[1]
    P = min(steps, n)
    recorder = _Recorder(chain.denoiser)
    step = chain.step_for(recorder)
    for j in range(P):
        X[j + 1] = step(X[j], j, None if noise.z is None else noise.z[:, j], noise.cond)
    x0 = recorder.last.to(X.dtype)
    rows = torch.arange(M)
    extend(chain, noise, X, x0, torch.full((M,), P, dtype=torch.long), torch.full((M,), n, dtype=torch.long), rows)
    return P, x0


def extend(chain: Chain, noise: Noise, X: torch.Tensor, x0: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
           rows: torch.Tensor) -> None:
    """For each sample ``rows[a]``, set X[first[a] + 1 .. last[a]] by stepping from X[first[a]] with its frozen clean
    estimate ``x0[rows[a]]`` and its pre-drawn noise (all (A,) tensors; no denoiser call).

    With the clean estimate frozen, every chain's step is affine in the state, x_{j+1} = a_j x_j + u_j (DDPM,
    DDIM, Euler and Heun alike), so the steps are read off in one vectorised call at x = 0 and x = 1 and chained by
    a parallel prefix scan (log2 L rounds) instead of L sequential steps: the same states up to round-off. A chain
    that carries a clean estimate in its state (``lift``) carries the frozen one: the steps are read off at
    lift(0, x0) and lift(1, x0), exact from a state that carries x0 (the extrapolated start's P-th), a guess
    otherwise (a window's last state, which carries its own)."""
    L = int((last - first).max()) if len(first) else 0
    if L <= 0:
        return
    j = first[:, None] + torch.arange(L)[None]  # (A, L) the steps to take
    go = j < last[:, None]
    jj, rr = j.clamp(max=chain.n_steps - 1).reshape(-1), rows[:, None].expand(-1, L).reshape(-1)
    z = None if noise.z is None else noise.z[rr, jj]
    step = chain.step_for(Frozen(x0))
    zero = torch.zeros((len(jj), *x0.shape[1:]), dtype=X.dtype, device=X.device)
    frozen = {FROZEN_ROWS: rr}
    u = step(chain.lift(zero, x0[rr]), jj, z, frozen)
    a = step(chain.lift(torch.ones_like(zero), x0[rr]), jj, z, frozen) - u
    shape = (len(first), L, *X.shape[2:])
    keep = go.reshape(*go.shape, *([1] * (X.ndim - 2))).to(X.device)
    a = torch.where(keep, a.reshape(shape), 1.0)  # steps past a sample's range: the identity
    u = torch.where(keep, u.reshape(shape), 0.0)
    s = 1
    while s < L:  # prefix k becomes step k after prefix k - s
        a, u = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1), torch.cat([u[:, :s], a[:, s:] * u[:, :-s] + u[:, s:]], 1)
        s *= 2
    x = a * X[first, rows].unsqueeze(1) + u  # states first + 1 .. first + L
    X[(j + 1)[go], rows[:, None].expand(-1, L)[go]] = x[go]
