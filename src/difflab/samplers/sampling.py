"""Drawing samples from a chain, sequentially or by Picard iteration, a block of samples at a time.

A sampling call resolves where it runs once (:class:`~difflab.samplers.base.Placement`: the state's device and
dtype), and cuts the samples' row-aligned condition (``cond``, e.g. ``{"class_labels": y}``) into blocks with their
noise, so sample k is the same, with its own condition, whatever the batch size or the number of processes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from difflab import devices
from difflab.conditioning import Cond, check_rows, cond_rows
from difflab.errors import require
from difflab.samplers.base import Chain, Placement, SampleStats, noise_for, run_chain
from difflab.samplers.picard import PicardOptions, PicardResult, picard


def sample_chain(
    chain: Chain,
    n: int,
    seed: int,
    shape: tuple[int, ...],
    batch_size: int = 4096,
    start: int = 0,
    dtype: torch.dtype | str | None = None,
    progress: bool = False,
    parallel: PicardOptions | dict | None = None,
    callback: Callable | None = None,
    group=None,
    cond: Cond | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Draw samples ``start .. start + n - 1`` of run ``seed``, ``batch_size`` at a time.

    ``parallel``: None runs the chain sequentially; a :class:`PicardOptions` or a dict of some of its fields
    (window, tol, ...; ``{}``: the defaults) solves it by parallel Picard iteration instead.
    ``group``: the torch.distributed process group a parallel call splits each sweep's rows across (None: the
    default group when one is initialised; False: never distribute); see :func:`difflab.samplers.picard.picard`.
    ``callback``: called per step, ``callback(j, x)`` (sequential), or per sweep, ``callback(sweep, x_end, X)``
    (parallel), for every block.
    ``cond``: the samples' row-aligned condition, a mapping of keyword -> (n, ...) tensor passed to the denoiser
    (``{"class_labels": y}`` with y (n,) int64 for a class-conditional network; None: unconditional).
    ``device``: where the state and the sampler's arithmetic live (None: the denoiser's device); ``dtype``: the
    state's dtype, float32, float64, or ``"auto"`` / None (the default) for the device's default, float64 on the CPU
    (:func:`difflab.devices.state_dtype`). The noise is drawn on the CPU and moved; each block's samples come back.
    ``progress``: report progress on stderr (a bar on a terminal, plain lines otherwise; :mod:`difflab.progress`):
    steps done, or for a parallel call the sweep and the steps every sample has converged.
    Returns the samples (n, *shape) in the state dtype, on the CPU, and the call's :class:`SampleStats`.
    """
    _check_call(n, batch_size, cond)
    options = None if parallel is None else PicardOptions.of(parallel)
    where = Placement.of(chain.denoiser, device, dtype)
    return _sample(chain, n, seed, shape, batch_size, start, where, cond, progress, options, callback, group)


def sample_by_batches(chain: Chain, n: int, seed: int, shape: tuple[int, ...], batch_size: int = 4096,
                      start: int = 0, dtype: torch.dtype | str | None = None, cond: Cond | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, SampleStats]:
    """Sequential sampling of samples ``start .. start + n - 1`` under torchrun, the batches of a one-process call
    (of ``batch_size``) dealt round-robin to the processes, each with its rows of ``cond``; every process returns all
    n samples (the blocks are summed into zeros, which is exact; on the CPU) and the call's stats. ``dtype``,
    ``device`` and ``cond`` as for :func:`sample_chain`; outside torchrun it is :func:`sample_chain`."""
    from difflab.training import distributed

    _check_call(n, batch_size, cond)
    where = Placement.of(chain.denoiser, device, dtype)
    rank, size = distributed.world()
    t0 = time.perf_counter()
    out = torch.zeros((n, *shape), dtype=where.dtype)
    for i, lo in enumerate(range(0, n, batch_size)):
        if i % size == rank:
            m = min(batch_size, n - lo)
            part = None if cond is None else cond_rows(cond, slice(lo, lo + m))
            x, _ = _sample(chain, m, seed, shape, batch_size, start + lo, where, part)
            out[lo:lo + len(x)] = x
    out = distributed.all_reduce_sum_tensor(out)
    wall = distributed.all_reduce_max(time.perf_counter() - t0)
    return out, _sequential_stats(chain, n, wall, where)


def _check_call(n: int, batch_size: int, cond: Cond | None) -> None:
    require(isinstance(n, int) and n >= 1, f"number of samples must be a positive integer, got {n!r}")
    require(isinstance(batch_size, int) and batch_size >= 1,
            f"batch size must be a positive integer, got {batch_size!r}")
    check_rows(cond or {}, n, "sample")


def _sample(chain: Chain, n: int, seed: int, shape: tuple[int, ...], batch_size: int, start: int,
            where: Placement, cond: Cond | None, progress: bool = False, options: PicardOptions | None = None,
            callback: Callable | None = None, group=None) -> tuple[torch.Tensor, SampleStats]:
    """:func:`sample_chain` with its arguments checked and its device and dtype resolved (``where``)."""
    t0 = time.perf_counter()
    starts = range(start, start + n, batch_size)
    bar = _progress(len(starts) * chain.n_steps, chain.name if options is None else "picard-" + chain.name,
                    progress, options is not None)
    out, results = [], []
    with torch.inference_mode():
        for i_block, b in enumerate(starts):
            idx = range(b, min(b + batch_size, start + n))
            part = None if cond is None else cond_rows(cond, slice(b - start, b - start + len(idx)))
            noise = noise_for(seed, idx, shape, chain.n_steps, chain.stochastic, where.dtype, part)
            if options is None:
                out.append(devices.host(run_chain(chain, noise, _with_bar(bar, callback), where.device)))
                continue
            res = picard(chain, noise.to(where.device), options, callback=callback, group=group,
                         on_sweep=_sweep_progress(bar, i_block * chain.n_steps, chain.n_steps, len(starts)))
            out.append(devices.host(res.x))
            results.append(res)
    bar.close()  # (an exception closes nothing: the run is over anyway)
    wall = time.perf_counter() - t0
    if options is None:
        return torch.cat(out), _sequential_stats(chain, n, wall, where)
    return torch.cat(out), _parallel_stats(chain, n, wall, where, options, results)


def _sequential_stats(chain: Chain, n: int, wall: float, where: Placement) -> SampleStats:
    return SampleStats(chain.name, n, chain.n_steps, float(chain.nfe.sum()), wall, extra=where.extra())


def _parallel_stats(chain: Chain, n: int, wall: float, where: Placement, options: PicardOptions,
                    results: list[PicardResult]) -> SampleStats:
    """The stats of a parallel call from its blocks' results: sweeps (the maximum, and per sample their mean and
    99th percentile), the mean NFE, the sequential rounds, and TAA's fallback rate."""
    extra = {**where.extra(), "window": options.window_for(chain.n_steps), "tol": options.tol,
             "criterion": options.criterion, "convergence": options.convergence, "init": options.init,
             "accel": options.accel, "sequential_rounds": max(r.rounds for r in results),
             "sequential_nfe_per_sample": float(chain.nfe.sum())}
    if options.accel != "none":  # TAA's position updates, and those that fell back to the plain one
        extra["accel_memory"] = options.accel_memory
        extra["accel_fallback_rate"] = sum(r.fallbacks for r in results) / max(1, sum(r.accelerated for r in results))
    s = torch.cat([r.sweeps for r in results]).double()
    extra["mean_sweeps"] = float(s.mean())  # iterations is the maximum: a few slow samples set it
    extra["p99_sweeps"] = float(torch.quantile(s, 0.99))
    return SampleStats("picard-" + chain.name, n, chain.n_steps, float(torch.cat([r.nfe for r in results]).mean()),
                       wall, iterations=max(r.iterations for r in results), extra=extra)


def _with_bar(bar, callback):
    def fn(*args):
        bar.update(1)
        if callback is not None:
            callback(*args)

    return fn


def _sweep_progress(bar, offset: int, n_steps: int, n_blocks: int):
    """Picard progress: after each sweep the count is the steps every sample of the block has converged (plus the
    blocks before), the description names the sweep (and the block, when there are several)."""
    block = "" if n_blocks == 1 else f"block {offset // n_steps + 1}/{n_blocks}, "
    name = bar.desc

    def fn(sweep: int, accepted: torch.Tensor) -> None:
        bar.set_description(f"{name}, {block}sweep {sweep}")
        bar.set_postfix(**{"samples done": f"{int((accepted >= n_steps).sum())}/{len(accepted)}"})
        bar.update(offset + int(accepted.min()) - bar.n)

    return fn


def _progress(total: int, desc: str, enabled: bool, parallel: bool = False):
    from difflab.progress import progress

    return progress(total, f"sample {desc}", unit="step converged" if parallel else "step", enabled=enabled,
                    leave=False)
