"""Drawing samples from a chain, sequentially or by Picard iteration, a block of samples at a time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from difflab import devices
from difflab.errors import require
from difflab.samplers.base import Chain, SampleStats, draw_noise, run_chain
from difflab.samplers.picard import PicardOptions, picard


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
    labels: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Draw samples ``start .. start + n - 1`` of run ``seed``, ``batch_size`` at a time.

    ``parallel``: None runs the chain sequentially; a :class:`PicardOptions` or a dict of some of its fields
    (window, tol, ...; ``{}``: the defaults) solves it by parallel Picard iteration instead.
    ``group``: the torch.distributed process group a parallel call splits each sweep's rows across (None: the
    default group when one is initialised; False: never distribute); see :func:`difflab.samplers.picard.picard`.
    ``callback``: called per step, ``callback(j, x)`` (sequential), or per sweep, ``callback(sweep, x_end, X)``
    (parallel), for every block.
    ``labels``: (n,) int64 class labels of the samples, for a class-conditional network (None: unconditional).
    ``device``: where the state and the sampler's arithmetic live (None: the denoiser's device); ``dtype``: the
    state's dtype, float32, float64, or ``"auto"`` / None (the default) for the device's default, float64 on the CPU
    (:func:`difflab.devices.state_dtype`). The noise is drawn on the CPU and moved; each block's samples come back.
    ``progress``: report progress on stderr (a bar on a terminal, plain lines otherwise; :mod:`difflab.progress`):
    steps done, or for a parallel call the sweep and the steps every sample has converged.
    Returns the samples (n, *shape) in the state dtype, on the CPU, and the call's :class:`SampleStats`.
    """
    require(isinstance(n, int) and n >= 1, f"number of samples must be a positive integer, got {n!r}")
    require(isinstance(batch_size, int) and batch_size >= 1,
            f"batch size must be a positive integer, got {batch_size!r}")
    require(labels is None or tuple(labels.shape) == (n,), f"labels must have shape ({n},), one per sample")
    options = None if parallel is None else PicardOptions.of(parallel)
    device = devices.device_of(chain.denoiser) if device is None else torch.device(device)
    dtype = devices.state_dtype(dtype, device)
    t0 = time.perf_counter()
    out, sweeps, per_sample, nfe, rounds = [], [], [], [], []
    accelerated = fallbacks = 0  # TAA's position updates, and those that fell back to the plain one
    starts = range(start, start + n, batch_size)
    bar = _progress(len(starts) * chain.n_steps, chain.name if options is None else "picard-" + chain.name,
                    progress, options is not None)
    with torch.inference_mode():
        for i_block, b in enumerate(starts):
            idx = range(b, min(b + batch_size, start + n))
            noise = draw_noise(seed, idx, shape, chain.n_steps, chain.stochastic, dtype)
            if labels is not None:
                noise.labels = labels[b - start: b - start + len(idx)]
            if options is None:
                out.append(devices.host(run_chain(chain, noise, callback=_with_bar(bar, callback), device=device)))
                continue
            res = picard(chain, noise.to(device), options, callback=callback, group=group,
                         on_sweep=_sweep_progress(bar, i_block * chain.n_steps, chain.n_steps, len(starts)))
            out.append(devices.host(res.x))
            sweeps.append(res.iterations)
            per_sample.append(res.sweeps)
            nfe.append(res.nfe)
            rounds.append(res.rounds)
            accelerated += res.accelerated
            fallbacks += res.fallbacks
    bar.close()  # (an exception closes nothing: the run is over anyway)
    wall = time.perf_counter() - t0
    where = {"device": str(device), "state_dtype": str(dtype).removeprefix("torch.")}
    if options is None:
        return torch.cat(out), SampleStats(chain.name, n, chain.n_steps, float(chain.nfe.sum()), wall, extra=where)
    extra = {**where, "window": options.window_for(chain.n_steps), "tol": options.tol, "criterion": options.criterion,
             "convergence": options.convergence, "init": options.init, "accel": options.accel,
             "sequential_rounds": max(rounds), "sequential_nfe_per_sample": float(chain.nfe.sum())}
    if options.accel != "none":
        extra["accel_memory"] = options.accel_memory
        extra["accel_fallback_rate"] = fallbacks / max(1, accelerated)
    s = torch.cat(per_sample).double()
    extra["mean_sweeps"] = float(s.mean())  # iterations is the maximum: a few slow samples set it
    extra["p99_sweeps"] = float(torch.quantile(s, 0.99))
    stats = SampleStats("picard-" + chain.name, n, chain.n_steps, float(torch.cat(nfe).mean()), wall,
                        iterations=max(sweeps), extra=extra)
    return torch.cat(out), stats


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
