"""Parallel sampling by Picard iteration (ParaDiGMS, Shih et al. 2023), over any sequential :class:`Chain`.

The whole chain x_{j+1} = step(x_j, j, z_j) is solved as a fixed point. A trajectory buffer X[0..n] starts with
every slot at x_0 (or a cheap starting trajectory, :mod:`difflab.samplers.starts`). Each sweep evaluates the steps
of a window [begin, end) in ONE batched call, with the same pre-drawn noise every sweep, and rebuilds the window by
cumulative sums of the drifts step(X[j]) - X[j] (:func:`_sweep`). Positions whose change is below ``tol``
(relative to the step's noise standard deviation) are accepted from the front (:func:`_accepted`); the window
slides past them, and the slots that enter it start as a copy of the window's last state (:func:`_slide`).

Beyond ParaDiGMS: ``accel="taa"`` replaces the plain update of the positions past
the converged front by triangular Anderson acceleration (:mod:`difflab.samplers.anderson`), and
``init="extrapolate"`` starts from P true steps and a frozen clean estimate carried along the pre-drawn noise
(:mod:`difflab.samplers.starts`); slots entering a window are then extrapolated the same way. Neither costs a
denoiser call per sweep, and both keep the guarantees below. ``accel="taa"`` without a named ``init`` runs from
the extrapolated start: TAA from the prior start moves samples of deterministic chains off their sequential twins
at the default tol (why: :mod:`difflab.samplers.anderson`), and :func:`picard` warns when asked for it.

Convergence is judged per sample by default, so sample k is the same whatever the batch it is drawn with;
``convergence="batch"`` is the ParaDiGMS / CDL-paper rule (a position is accepted when it converged for every
sample in the batch), kept for comparison with the papers' iteration counts.

With ``tol = 0`` (or a window of 1) the result equals the sequential sampler to floating-point round-off, and a
call never takes more than n sweeps.

A chain whose state carries more than x (:class:`~difflab.samplers.base.Chain`'s ``lift``: DPM-Solver++ 2M's
[x_j, D_{j-1}]) is solved the same way: the drifts and their sums are over x, the carried part is predicted as
the step returned it (:func:`_sweep`), and the buffer, TAA's history and the accept rule's mean squared change are
over the whole state (so ``tol`` also bounds the change of the carried estimate); samples and callbacks get x.

A conditional denoiser's condition (``noise.cond``, e.g. ``{"class_labels": y}``) goes with the rows: every window
slot takes its sample's, and the rows' ``max_batch`` chunks and processes' shares cut it with them
(:func:`evaluate_rows`); the warm and extrapolated starts pass the samples' own. No key is read.

Where things live: the trajectory buffer, the drifts, the predictions and TAA's history are on the state's device
(the network's); the windows' bookkeeping (which sample is at which step) is small and stays on the CPU, where it
indexes the device tensors without a wait. The one copy back per sweep is the steps it accepted (:func:`_accepted`
through :func:`difflab.devices.host`), which decides the next window.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from difflab import devices
from difflab.conditioning import NO_COND, Cond, cond_rows
from difflab.errors import DifflabError, require, suggest
from difflab.samplers.anderson import TriangularAnderson
from difflab.samplers.base import Chain, Noise
from difflab.samplers.starts import extend, extrapolated_start, warm_start

INITS = ("prior", "warm", "extrapolate")
CRITERIA = ("cumulative", "step")
ACCELS = ("none", "taa")
# each option's command-line flag and what a message calls it: the CLI passes the fields straight through
LABELS = {"window": "Picard window", "tol": "Picard tolerance", "max_sweeps": "max_sweeps", "init": "Picard init",
          "warm_steps": "warm_steps", "convergence": "Picard convergence", "max_batch": "max_batch",
          "criterion": "Picard criterion", "init_steps": "init_steps", "accel": "Picard accel",
          "accel_memory": "accel_memory", "accel_reg": "accel_reg"}


class PicardWarning(UserWarning):
    """A combination of Picard options that is known to land far from the sequential samples."""


def _count(v) -> bool:
    """Whether v is a positive integer (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check(ok: bool, field: str, rule: str, value) -> None:
    """Refuse ``value`` of option ``field`` unless ``ok``, naming the CLI flag and the option: e.g. "--tol (Picard
    tolerance) must be a number >= 0, got -1"."""
    shown = format(value, "g") if isinstance(value, float) else repr(value)
    require(ok, f"--{field.replace('_', '-')} ({LABELS[field]}) {rule}, got {shown}")


@dataclass(frozen=True)
class PicardOptions:
    """The parallel sampler's options, checked once on construction (a bad value is refused in one line that names
    the CLI flag and the option, e.g. "--tol (Picard tolerance) must be a number >= 0, got -1").

    Fields:
        window: steps evaluated per sweep (None or 0: the whole chain, the default; 32..100 for images).
        tol: accept a position when its change is at most tol noise standard deviations,
            ||change||^2 / (d v_j) <= tol^2, v_j the step's noise variance (the eta = 1 variance for deterministic
            chains); 0 reproduces the sequential sampler. Default 0.1.
        criterion: what ``tol`` bounds: ``"cumulative"`` (the default) the change of the predicted state since the
            last sweep, x' - x, which telescopes to the sum of the one-step residuals from the window's start; or
            ``"step"`` the one-step residual step(x_j) - x_{j+1} alone (ParaTAA's rule, scaled like ours: errors add
            up along the chain, so it needs a far smaller tol for the same accuracy).
        max_sweeps: stop after this many sweeps even if not converged (None: at most n, always enough).
        init: ``"prior"`` (every slot x_0), ``"warm"`` (a coarse pass of ``warm_steps`` denoiser calls; default 10)
            or ``"extrapolate"`` (``init_steps`` true steps, default 1, then the last clean estimate frozen along the
            pre-drawn noise). None (the default) resolves on construction: ``"extrapolate"`` with ``accel="taa"``,
            else ``"prior"``. TAA from the prior start is unsafe on deterministic chains (module
            :mod:`difflab.samplers.anderson`): :meth:`warning`, and :func:`picard` warns (:class:`PicardWarning`).
        convergence: ``"sample"`` (per sample; batch-invariant; the default) or ``"batch"`` (ParaDiGMS: all samples
            together).
        max_batch: evaluate a sweep's rows in chunks of at most this many (a memory bound; None: all at once).
        accel: ``"none"`` (plain Picard, the default) or ``"taa"`` (triangular Anderson acceleration).
        accel_memory: m, the iterates TAA keeps per position, 1..8 (1 is plain Picard). Default 3.
        accel_reg: TAA's regularisation, relative to the mean diagonal of its least-squares matrix. Default 1e-3.
    """

    window: int | None = None
    tol: float = 0.1
    max_sweeps: int | None = None
    init: str | None = None
    warm_steps: int = 10
    convergence: str = "sample"
    max_batch: int | None = None
    criterion: str = "cumulative"
    init_steps: int = 1
    accel: str = "none"
    accel_memory: int = 3
    accel_reg: float = 1e-3

    def __post_init__(self) -> None:
        w, tol, r = self.window, self.tol, self.accel_reg
        _check(w is None or (isinstance(w, int) and not isinstance(w, bool) and w >= 0), "window",
               "must be an integer >= 0 (0: the whole chain)", w)
        if w == 0:
            object.__setattr__(self, "window", None)  # the whole chain, as --picard-window 0 in the studies
        _check(isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol) and tol >= 0,
               "tol", "must be a number >= 0", tol)
        _check(self.max_sweeps is None or _count(self.max_sweeps), "max_sweeps", "must be an integer >= 1",
               self.max_sweeps)
        _check(self.accel in ACCELS, "accel", f"must be one of {', '.join(ACCELS)}", self.accel)
        if self.init is None:  # TAA pairs with the extrapolated start unless a start is named
            object.__setattr__(self, "init", "extrapolate" if self.accel == "taa" else "prior")
        _check(self.init in INITS, "init", f"must be one of {', '.join(INITS)}", self.init)
        _check(_count(self.warm_steps), "warm_steps", "must be an integer >= 1", self.warm_steps)
        _check(_count(self.init_steps), "init_steps", "must be an integer >= 1", self.init_steps)
        _check(self.criterion in CRITERIA, "criterion", f"must be one of {', '.join(CRITERIA)}", self.criterion)
        _check(_count(self.accel_memory) and self.accel_memory <= 8, "accel_memory", "must be an integer in 1..8",
               self.accel_memory)
        _check(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0, "accel_reg",
               "must be a number > 0", r)
        _check(self.convergence in ("sample", "batch"), "convergence", "must be sample or batch", self.convergence)
        _check(self.max_batch is None or _count(self.max_batch), "max_batch", "must be an integer >= 1",
               self.max_batch)

    def warning(self, stochastic: bool) -> str | None:
        """The one-line warning for an unsafe combination on a chain that is ``stochastic`` or not, else None: TAA
        (memory > 1) from the prior start on a deterministic chain (heun, euler, ddim, dpmpp-2m...)."""
        if self.accel != "taa" or self.accel_memory == 1 or self.init != "prior" or stochastic:
            return None
        return ("--accel taa with --init prior on a deterministic chain can land samples far from the sequential "
                "ones (another mode) at this tol: use --init extrapolate (the default with --accel taa)")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order: window, tol, max_sweeps, init, warm_steps, convergence, max_batch, criterion,
        init_steps, accel, accel_memory, accel_reg."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, options: Mapping) -> PicardOptions:
        """Options from a dict of some of the fields (the rest keep their defaults); unknown keys are refused
        with a did-you-mean hint."""
        names = cls.names()
        for key in options:
            if key not in names:
                hint = (" (the process group is an argument of picard / sample_chain, not an option)"
                        if key == "group" else suggest(key, names))
                raise DifflabError(f"unknown Picard option {key!r}{hint}: use {', '.join(names)}")
        return cls(**options)

    @classmethod
    def of(cls, options: PicardOptions | Mapping | None = None) -> PicardOptions:
        """``options`` as a :class:`PicardOptions`: None gives the defaults, a dict goes through :meth:`from_dict`."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, Mapping):
            return cls.from_dict(options)
        raise DifflabError(f"Picard options must be a dict or PicardOptions, got {type(options).__name__}")

    def window_for(self, n_steps: int) -> int:
        """The effective window of a chain of ``n_steps`` steps: ``window`` capped at n (None: n)."""
        return n_steps if self.window is None else min(self.window, n_steps)


@dataclass
class PicardResult:
    """What one Picard call returns: samples and per-sample work."""

    x: torch.Tensor  # (M, *shape) samples
    sweeps: torch.Tensor  # (M,) sweeps each sample needed
    nfe: torch.Tensor  # (M,) denoiser evaluations per sample (float64)
    iterations: int  # sweeps of the call
    converged: bool  # False when max_sweeps stopped it early
    wall_time_s: float
    rounds: int = 0  # denoiser rounds outside the sweeps (warm, extrapolated start): depth = iterations + rounds
    accelerated: int = 0  # TAA: position updates it accelerated ...
    fallbacks: int = 0  # ... and those whose solve failed (plain update instead)


def _world(group) -> tuple[int, int]:
    import torch.distributed as dist

    if group is False or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def evaluate_rows(fn: Callable, x: torch.Tensor, j: torch.Tensor, z, max_batch: int | None, group=None,
                  cond: Cond = NO_COND):
    """fn(x, j, z, cond) over the V rows of x (V, *state), j (V,), z (V, *shape) or None and their condition
    ``cond`` (a mapping of (V, ...) tensors, cut with the rows; empty: unconditional), in chunks of at most
    ``max_batch``; under torch.distributed the rows are split across the group's processes and gathered, so every
    process gets the full result."""
    rank, world = _world(group)
    V = x.shape[0]
    if world > 1:
        per = -(-V // world)
        lo, hi = min(rank * per, V), min((rank + 1) * per, V)
        # (a process with no rows of this sweep still joins the gather; a step keeps its input's shape)
        part = _chunked(fn, x[lo:hi], j[lo:hi], _rows(z, lo, hi), max_batch, cond_rows(cond, slice(lo, hi))) \
            if hi > lo else x[lo:hi]
        import torch.distributed as dist

        padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: hi - lo] = part
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        return torch.cat(gathered)[:V]
    return _chunked(fn, x, j, z, max_batch, cond)


def _rows(t, lo: int, hi: int):
    return None if t is None else t[lo:hi]


def _chunked(fn, x, j, z, max_batch, cond: Cond = NO_COND):
    """fn(x, j, z, cond) in chunks of at most ``max_batch`` rows (None: all at once), each with its rows' cond."""
    if max_batch is None or x.shape[0] <= max_batch:
        return fn(x, j, z, cond)
    return torch.cat([fn(x[i:i + max_batch], j[i:i + max_batch], _rows(z, i, i + max_batch),
                         cond_rows(cond, slice(i, i + max_batch))) for i in range(0, x.shape[0], max_batch)])


@dataclass
class _Window:
    """The windows of one sweep: for each of the A unfinished samples, the steps [begin, end), padded to W slots.

    Fields: ``samples`` (A,) the samples' indices; ``begin``, ``end``, ``size`` (A,) the window bounds and its
    length; ``valid`` (A, W) the slots inside the window; ``rows`` (A, W) each slot's sample; ``steps`` (A, W) each
    slot's step index (capped at n - 1, so padding slots index the per-step tables); ``targets`` (A, W) the state
    each slot predicts (step + 1, capped at n).
    """

    samples: torch.Tensor
    begin: torch.Tensor
    end: torch.Tensor
    size: torch.Tensor
    valid: torch.Tensor
    rows: torch.Tensor
    steps: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def open(cls, begin: torch.Tensor, window: int, n: int) -> _Window | None:
        """The windows of the samples whose first unaccepted step ``begin`` (M,) is before n (None: all done)."""
        samples = (begin < n).nonzero().squeeze(1)
        if len(samples) == 0:
            return None
        first = begin[samples]
        end = (first + window).clamp(max=n)
        size = end - first
        width = int(size.max())
        offset = torch.arange(width)
        steps = first[:, None] + offset[None]
        return cls(samples, first, end, size, valid=offset[None] < size[:, None],
                   rows=samples[:, None].expand(-1, width), steps=steps.clamp(max=n - 1),
                   targets=(steps + 1).clamp(max=n))


def _sweep(chain: Chain, noise: Noise, X: torch.Tensor, win: _Window, max_batch: int | None, group,
           outputs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Evaluate every window slot's step in one batched call and predict the window's states by cumulative drifts:
    x[begin] + sum_{i <= slot} (step(X[j_i]) - X[j_i]) over the states' x; what a state carries besides x
    (:class:`~difflab.samplers.base.Chain`'s ``lift``) is a function of the step's input, not an increment, so it
    is predicted as the step returned it. Returns the predictions (A, W, *state) of states ``win.targets``
    (padding slots repeat the last valid x and carry zeros) and, with ``outputs``, the steps' own outputs
    step(X[j]) (A, W, *state; zero in padding slots; else None)."""
    rows, steps = win.rows[win.valid], win.steps[win.valid]
    state = X[steps, rows]
    z = noise.z[rows, steps] if chain.stochastic else None
    cond = cond_rows(noise.cond, rows)  # each slot's sample's condition
    out = evaluate_rows(chain.step, state, steps, z, max_batch, group, cond)
    out = out.to(X.dtype)  # (a denoiser may answer in another dtype than the state's)
    (x_in, _), (x_out, carried) = chain.split(state), chain.split(out)
    drift = torch.zeros((*win.valid.shape, *x_in.shape[1:]), dtype=X.dtype, device=X.device)
    drift[win.valid] = x_out - x_in
    predicted = chain.split(X[win.begin, win.samples])[0].unsqueeze(1) + drift.cumsum(1)
    if carried is not None:
        d = torch.zeros((*win.valid.shape, *carried.shape[1:]), dtype=X.dtype, device=X.device)
        d[win.valid] = carried
        predicted = chain.lift(predicted.flatten(0, 1), d.flatten(0, 1)).unflatten(0, win.valid.shape)
    stepped = None
    if outputs:
        stepped = torch.zeros_like(predicted)
        stepped[win.valid] = out
    return predicted, stepped


def _accepted(X: torch.Tensor, predicted: torch.Tensor, win: _Window, var: torch.Tensor, tol: float,
              convergence: str) -> torch.Tensor:
    """How many leading window slots have a prediction that moved by at most ``tol`` noise standard deviations since
    the last sweep (mean squared change over the d = prod(shape) coordinates <= tol^2 v_j; steps without noise
    always pass), per sample (A,) on X's device, or the batch's minimum for every sample with
    ``convergence="batch"``. Call it before the predictions are stored in X."""
    A, W = win.valid.shape
    d = max(1, math.prod(X.shape[2:]))
    change = ((predicted - X[win.targets, win.rows]) ** 2).reshape(A, W, -1).sum(-1) / d
    v = var[win.steps]
    ok = ((change <= float(tol) ** 2 * v) | (v == 0)) & win.valid.to(X.device)
    lead = ok.long().cumprod(1).sum(1)
    return lead.min().expand(A) if convergence == "batch" else lead


def _slide(X: torch.Tensor, win: _Window, accepted: torch.Tensor, window: int, n: int,
           extend: Callable | None = None) -> torch.Tensor:
    """Move each window past its accepted slots plus one (the step after the converged prefix had a converged input,
    so its prediction is final: every sweep accepts at least one step). The slots entering a window start as a
    copy of its last state X[end], or as ``extend(end, new_end, samples)`` fills them. Returns the new begin (A,)."""
    begin = win.begin + torch.minimum(accepted + 1, win.size)
    end = (begin + window).clamp(max=n)
    entering = int((end - win.end).max())
    if entering > 0 and extend is not None:
        extend(win.end, end, win.samples)
    elif entering > 0:
        slots = win.end[:, None] + 1 + torch.arange(entering)[None]
        fill = slots <= end[:, None]
        rows = win.samples[:, None].expand(-1, entering)
        last = X[win.end, win.samples].unsqueeze(1).expand(-1, entering, *X.shape[2:])
        X[slots[fill], rows[fill]] = last[fill]
    return begin


@dataclass
class _Trajectories:
    """One call's state: the trajectory buffer ``X`` (n + 1, M, *state), per sample the denoiser evaluations ``nfe``
    (M,) float64, the steps accepted so far ``begin`` (M,) (n: done) and the ``sweeps`` (M,) it took part in; the
    start's sequential ``rounds`` and ``fill(first, last, samples)``, how slots entering a window are set (None: a
    copy of the window's last state)."""

    X: torch.Tensor
    nfe: torch.Tensor
    begin: torch.Tensor
    sweeps: torch.Tensor
    rounds: int = 0
    fill: Callable | None = None

    @classmethod
    def start(cls, chain: Chain, noise: Noise, opts: PicardOptions) -> _Trajectories:
        """Every slot at x_0 (on the noise's device: sample_chain moves it), then the start ``opts.init`` asks for."""
        n = chain.n_steps
        x0 = chain.lift(chain.prior_scale * noise.x_T)
        M = x0.shape[0]
        t = cls(x0.unsqueeze(0).repeat(n + 1, *([1] * x0.ndim)), torch.zeros(M, dtype=torch.float64),
                torch.zeros(M, dtype=torch.long), torch.zeros(M, dtype=torch.long))
        if opts.init == "warm":
            t.rounds = warm_start(chain, t.X, opts.warm_steps, noise.cond)
            t.nfe += t.rounds
        elif opts.init == "extrapolate":
            t.rounds, frozen = extrapolated_start(chain, noise, t.X, opts.init_steps)
            t.nfe += chain.nfe[:t.rounds].sum().double()
            t.begin[:] = t.rounds  # those steps were taken sequentially: final

            def fill(first, last, samples):
                extend(chain, noise, t.X, frozen, first, last, samples)

            t.fill = fill
        return t

    def advance(self, chain: Chain, noise: Noise, win: _Window, opts: PicardOptions, var: torch.Tensor,
                group, taa: TriangularAnderson | None) -> None:
        """One sweep over the windows ``win``: evaluate their steps, accept the converged front, store the new
        states (accelerated past the front by ``taa``) and slide the windows."""
        X, n = self.X, chain.n_steps
        predicted, stepped = _sweep(chain, noise, X, win, opts.max_batch, group, outputs=opts.criterion == "step")
        moved = predicted if stepped is None else stepped
        accepted = devices.host(_accepted(X, moved, win, var, opts.tol, opts.convergence))  # the sweep's one wait
        if taa is not None:  # the next iterate: accelerated past the converged front
            predicted = taa.update(X[win.targets, win.rows], predicted, win.targets, win.samples, win.valid, accepted)
        X[win.targets[win.valid], win.rows[win.valid]] = predicted[win.valid]  # the window's new states
        new_begin = _slide(X, win, accepted, opts.window_for(n), n, self.fill)
        self.nfe[win.samples] += (chain.nfe.to(torch.float64)[win.steps] * win.valid).sum(1)
        self.sweeps[win.samples] += 1
        self.begin[win.samples] = new_begin


def _checked(chain: Chain, noise: Noise, options, kwargs: dict) -> PicardOptions:
    """The call's options (``options``, or the fields as ``kwargs``; not both) for this chain and noise; warns
    (:class:`PicardWarning`, at picard's caller) on a combination known to land far from the sequential samples."""
    require(options is None or not kwargs,
            f"give the Picard options as a PicardOptions or as keywords ({', '.join(kwargs)}), not both")
    opts = PicardOptions.of(kwargs if options is None else options)
    require(not chain.stochastic or noise.z is not None,
            "this chain needs per-step noise: draw it with stochastic=True")
    caution = opts.warning(chain.stochastic)
    if caution is not None:  # (shown once per calling line by Python's default filter)
        warnings.warn(caution, PicardWarning, stacklevel=3)
    return opts


def picard(
    chain: Chain,
    noise: Noise,
    options: PicardOptions | Mapping | None = None,
    *,
    callback: Callable | None = None,
    group=None,
    on_sweep: Callable | None = None,
    **kwargs,
) -> PicardResult:
    """Solve ``chain`` for the samples of ``noise`` by Picard iteration.

    Args:
        chain: any sequential sampler (DDPM, DDIM, Heun, Euler); its steps are reused, not re-derived.
        noise: pre-drawn noise (:func:`draw_noise`), held fixed across sweeps, with the samples' condition
            (``noise.cond``), which every evaluated row takes from its sample.
        options: a :class:`PicardOptions` or a dict of some of its fields (None: the defaults); or give the fields
            as keywords instead (``window=..., tol=...``; not both). ``accel="taa"`` without ``init`` runs from the
            extrapolated start; TAA from the prior start on a deterministic chain warns (:class:`PicardWarning`).
        callback: ``callback(sweep, x_end, X)`` after each sweep, with the current end points (M, *shape) and the
            whole trajectory buffer's x (n + 1, M, *shape; a view), e.g. to track a metric per iteration or draw
            paths.
        group: a torch.distributed process group to split each sweep's rows across (None: the default group when
            one is initialised; False: never distribute).
        on_sweep: ``on_sweep(sweep, accepted)`` after each sweep, with the steps accepted so far per sample (M,)
            (``n_steps``: that sample is done), e.g. for progress ("sweep 12: 430/1000 steps converged").
    """
    opts = _checked(chain, noise, options, kwargs)
    t0 = time.perf_counter()
    n, window = chain.n_steps, opts.window_for(chain.n_steps)
    t = _Trajectories.start(chain, noise, opts)
    X, M = t.X, t.X.shape[1]
    taa = TriangularAnderson(opts.accel_memory, opts.accel_reg, window, X) if opts.accel == "taa" else None
    var = chain.noise_var.to(device=X.device, dtype=X.dtype)
    limit = n if opts.max_sweeps is None else opts.max_sweeps
    it = 0
    while it < limit:
        win = _Window.open(t.begin, window, n)
        if win is None:
            break
        t.advance(chain, noise, win, opts, var, group, taa)
        it += 1
        if callback is not None:
            callback(it, chain.split(X[n])[0], chain.split(X.flatten(0, 1))[0].unflatten(0, (n + 1, M)))
        if on_sweep is not None:
            on_sweep(it, t.begin)
    return PicardResult(chain.split(X[n])[0].clone(), t.sweeps, t.nfe, it, bool((t.begin >= n).all()),
                        time.perf_counter() - t0, t.rounds, 0 if taa is None else taa.updated,
                        0 if taa is None else int(devices.host(taa.fallbacks)))
