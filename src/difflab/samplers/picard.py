"""Parallel sampling by Picard iteration (ParaDiGMS, Shih et al. 2023), over any sequential :class:`Chain`.

The whole chain x_{j+1} = step(x_j, j, z_j) is solved as a fixed point. A trajectory buffer X[0..n] starts with
every slot at x_0 (or a cheap coarse warm start). Each sweep evaluates the steps of a window [b, e) in ONE batched
call, with the same pre-drawn noise every sweep, and rebuilds the window by cumulative sums of the drifts
step(X[j]) - X[j]. Positions whose change is below ``tol`` (relative to the step's noise standard deviation) are
accepted from the front; the window slides past them (spec/samplers.md).

Convergence is judged per sample by default, so sample k is the same whatever the batch it is drawn with;
``convergence="batch"`` is the ParaDiGMS / CDL-paper rule (a position is accepted when it converged for every
sample in the batch), kept for comparison with the papers' iteration counts.

With ``tol = 0`` (or a window of 1) the result equals the sequential sampler to floating-point round-off.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.errors import require
from difflab.samplers.base import Chain, Noise

PICARD_DEFAULTS = {"window": None, "tol": 0.1, "max_sweeps": None, "init": "prior", "warm_steps": 10,
                   "convergence": "sample", "max_batch": None}


@dataclass
class PicardResult:
    """What one Picard call returns: samples and per-sample work."""

    x: torch.Tensor  # (M, *shape) samples
    sweeps: torch.Tensor  # (M,) sweeps each sample needed
    nfe: torch.Tensor  # (M,) denoiser evaluations per sample (float64)
    iterations: int  # sweeps of the call: its sequential depth
    converged: bool  # False when max_sweeps stopped it early
    wall_time_s: float


def check_picard_options(chain: Chain, window, tol, max_sweeps, init, warm_steps, convergence, max_batch) -> int:
    """Validate the options (one clear line each) and return the window size."""
    n = chain.n_steps
    p = n if window is None else window
    require(isinstance(p, int) and not isinstance(p, bool) and p >= 1,
            f"Picard window must be a positive integer (or None for the whole chain), got {window!r}")
    require(isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0,
            f"Picard tolerance must be a number >= 0, got {tol!r}")
    require(max_sweeps is None or (isinstance(max_sweeps, int) and max_sweeps >= 1),
            f"max_sweeps must be a positive integer or None, got {max_sweeps!r}")
    require(init in ("prior", "warm"), f"Picard init must be 'prior' or 'warm', got {init!r}")
    require(isinstance(warm_steps, int) and warm_steps >= 1, f"warm_steps must be >= 1, got {warm_steps!r}")
    require(convergence in ("sample", "batch"), f"convergence must be 'sample' or 'batch', got {convergence!r}")
    require(max_batch is None or (isinstance(max_batch, int) and max_batch >= 1),
            f"max_batch must be a positive integer or None, got {max_batch!r}")
    return min(p, n)


def _world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is False or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def evaluate_rows(fn: Callable, x: torch.Tensor, j: torch.Tensor, z, max_batch: int | None, group=None):
    """fn(x, j, z) over rows in chunks of at most ``max_batch``; under torch.distributed the rows are split
    across the group's processes and gathered, so every process gets the full result."""
    rank, world = _world(group)
    V = x.shape[0]
    if world > 1:
        per = -(-V // world)
        lo, hi = min(rank * per, V), min((rank + 1) * per, V)
        part = _chunked(fn, x[lo:hi], j[lo:hi], None if z is None else z[lo:hi], max_batch)
        import torch.distributed as dist

        padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype)
        padded[: hi - lo] = part
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat(gathered)[:V]
    return _chunked(fn, x, j, z, max_batch)


def _chunked(fn, x, j, z, max_batch):
    if max_batch is None or x.shape[0] <= max_batch:
        return fn(x, j, z)
    return torch.cat([fn(x[i : i + max_batch], j[i : i + max_batch], None if z is None else z[i : i + max_batch])
                      for i in range(0, x.shape[0], max_batch)])


def warm_start(chain: Chain, X: torch.Tensor, steps: int) -> int:
    """Fill the trajectory buffer X (n + 1, M, *shape) from X[0] with a coarse deterministic (DDIM-like) pass of
    ``steps`` denoiser calls: at each coarse level, x0_hat and the implied noise direction e give every finer state
    a_j x0_hat + b_j e up to the next level. Returns the NFE per sample it used."""
    n = chain.n_steps
    a, b = chain.state_coef[:, 0], chain.state_coef[:, 1]
    cuts = sorted({round(i * n / steps) for i in range(steps + 1)})
    used = 0
    for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True):
        x = X[c0]
        if b[c0] == 0:
            break
        x0 = chain.denoiser(x / a[c0].to(x.dtype), (b[c0] / a[c0]).to(x.dtype).expand(x.shape[0]))
        e = (x - a[c0].to(x.dtype) * x0) / b[c0].to(x.dtype)
        for j in range(c0 + 1, c1 + 1):
            X[j] = a[j].to(x.dtype) * x0 + b[j].to(x.dtype) * e
        used += 1
    return used


def picard(
    chain: Chain,
    noise: Noise,
    window: int | None = None,
    tol: float = 0.1,
    max_sweeps: int | None = None,
    init: str = "prior",
    warm_steps: int = 10,
    convergence: str = "sample",
    max_batch: int | None = None,
    callback: Callable | None = None,
    group=None,
    on_sweep: Callable | None = None,
) -> PicardResult:
    """Solve ``chain`` for the samples of ``noise`` by Picard iteration.

    Args:
        chain: any sequential sampler (DDPM, DDIM, Heun, Euler); its steps are reused, not re-derived.
        noise: pre-drawn noise (:func:`draw_noise`), held fixed across sweeps.
        window: steps evaluated per sweep (None: the whole chain; 32..100 for images).
        tol: accept a position when ||x' - x||^2 / (d v_j) <= tol^2, v_j the step's noise variance (the eta = 1
            variance for deterministic chains); 0 reproduces the sequential sampler.
        max_sweeps: stop after this many sweeps even if not converged (None: at most n, always enough).
        init: ``"prior"`` (every slot x_0) or ``"warm"`` (a coarse pass of ``warm_steps`` denoiser calls).
        convergence: ``"sample"`` (per sample; batch-invariant) or ``"batch"`` (ParaDiGMS: all samples together).
        max_batch: evaluate the window's rows in chunks of at most this many (memory bound).
        callback: ``callback(sweep, x_end, X)`` after each sweep, with the current end points (M, *shape) and the
            whole trajectory buffer (n + 1, M, *shape), e.g. to track a metric per iteration or draw paths.
        group: a torch.distributed process group to split each sweep's rows across (None: the default group when
            one is initialised; False: never distribute).
        on_sweep: ``on_sweep(sweep, accepted)`` after each sweep, with the steps accepted so far per sample (M,)
            (``n_steps``: that sample is done), e.g. for progress ("sweep 12: 430/1000 steps converged").
    """
    p = check_picard_options(chain, window, tol, max_sweeps, init, warm_steps, convergence, max_batch)
    require(not chain.stochastic or noise.z is not None,
            "this chain needs per-step noise: draw it with stochastic=True")
    t0 = time.perf_counter()
    n = chain.n_steps
    x0 = chain.prior_scale * noise.x_T
    M, shape = x0.shape[0], x0.shape[1:]
    d = max(1, math.prod(shape))
    X = x0.unsqueeze(0).repeat(n + 1, *([1] * x0.ndim))
    nfe = torch.zeros(M, dtype=torch.float64)
    if init == "warm":
        nfe += warm_start(chain, X, warm_steps)
    b = torch.zeros(M, dtype=torch.long)
    sweeps = torch.zeros(M, dtype=torch.long)
    var = chain.noise_var.to(x0.dtype)
    nfe_step = chain.nfe.to(torch.float64)
    tol2 = float(tol) ** 2
    limit = n if max_sweeps is None else max_sweeps
    it = 0
    while it < limit:
        act = (b < n).nonzero().squeeze(1)
        if len(act) == 0:
            break
        bA = b[act]
        eA = (bA + p).clamp(max=n)
        L = eA - bA
        W = int(L.max())
        w = torch.arange(W)
        J = bA[:, None] + w[None]  # (A, W) step indices of the window
        valid = w[None] < L[:, None]
        Jc = J.clamp(max=n - 1)
        kk = act[:, None].expand(-1, W)
        rk, rj = kk[valid], Jc[valid]
        xin = X[rj, rk]
        z = noise.z[rk, rj] if chain.stochastic else None
        f = evaluate_rows(chain.step, xin, rj, z, max_batch, group)
        drift = torch.zeros((len(act), W, *shape), dtype=x0.dtype)
        drift[valid] = f - xin
        Xnew = X[bA, act].unsqueeze(1) + drift.cumsum(1)  # predictions of states J + 1
        J1 = (J + 1).clamp(max=n)
        err = ((Xnew - X[J1, kk]) ** 2).reshape(len(act), W, -1).sum(-1) / d
        v = var[Jc]
        ok = ((err <= tol2 * v) | (v == 0)) & valid
        lead = ok.long().cumprod(1).sum(1)
        if convergence == "batch":
            lead = lead.min().expand(len(act))
        X[J1[valid], kk[valid]] = Xnew[valid]
        b_new = bA + torch.minimum(lead + 1, L)
        e_new = (b_new + p).clamp(max=n)
        F = int((e_new - eA).max())
        if F > 0:  # slots entering the window start as a copy of the window's last state
            jj = eA[:, None] + 1 + torch.arange(F)[None]
            fill = jj <= e_new[:, None]
            src = X[eA, act]
            X[jj[fill], act[:, None].expand(-1, F)[fill]] = src.unsqueeze(1).expand(-1, F, *shape)[fill]
        nfe[act] += (nfe_step[Jc] * valid).sum(1)
        sweeps[act] += 1
        b[act] = b_new
        it += 1
        if callback is not None:
            callback(it, X[n], X)
        if on_sweep is not None:
            on_sweep(it, b)
    return PicardResult(X[n] * chain.output_scale, sweeps, nfe, it, bool((b >= n).all()),
                        time.perf_counter() - t0)
