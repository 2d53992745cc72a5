"""Row-aligned conditions of a denoiser, and classifier-free guidance.

A condition is a mapping ``cond`` of keyword name -> tensor whose first dimension is the batch's rows, e.g.
``{"class_labels": y}`` with y (B,) int64; ``{}`` is unconditional. A denoiser takes it as keywords,
``D(x, sigma, **cond)``, and code that moves rows (a sampler's batches and windows, an objective's repeats and
concatenations) moves the condition with them through :func:`cond_rows`, :func:`cond_repeat` and :func:`cond_cat`,
without knowing its keys.

- :class:`Bound` binds a condition to a denoiser, so that an objective written for ``D(x, sigma)`` trains a
  conditional network unchanged. Where an objective re-arranges its rows it re-arranges the bound condition the same
  way with :func:`rearrange`, which leaves an unbound denoiser as it is. A row count that does not match the bound
  condition is refused, so a missed re-arrangement fails loudly instead of pairing rows with the wrong condition.
- :class:`Guided` is classifier-free guidance (Ho and Salimans 2022): with weight w,
  D_w(x, sigma, y) = (1 + w) D(x, sigma, y) - w D(x, sigma, null), both halves in one network call. w = 0 is the
  plain conditional denoiser; w is diffusers' ``guidance_scale`` minus 1. Guidance by a worse model of the same data
  instead of the unconditional half, with the same convention, is autoguidance (:mod:`difflab.autoguidance`).

The unconditional label ``NULL`` (-1) is what label dropout writes in training: difflab's U-Net reads it as the
zero label vector (EDM's convention); a network with a learned null class takes its own index instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch

from difflab.denoisers import flow_velocity, flow_x0, per_sample
from difflab.errors import require

NULL = -1  # the unconditional label
LABELS = "class_labels"  # the condition's key for class labels (the networks' keyword)
NO_COND: Mapping[str, torch.Tensor] = MappingProxyType({})  # the unconditional (empty) condition

Cond = Mapping[str, torch.Tensor]


def cond_rows(cond: Cond, index) -> dict:
    """The condition of rows ``index`` (a slice, (R,) int64 indices or a (B,) bool mask): ``v[index]`` per key."""
    return {k: v[index] for k, v in cond.items()}


def cond_repeat(cond: Cond, k: int) -> dict:
    """Each row's condition k times in a row (B k rows, as ``x.repeat_interleave(k, 0)``)."""
    return {key: v.repeat_interleave(k, 0) for key, v in cond.items()}


def cond_cat(*conds: Cond) -> dict:
    """The conditions of consecutive blocks of rows as one (as ``torch.cat`` of the rows); all have the same keys."""
    keys = set(conds[0]) if conds else set()
    require(all(set(c) == keys for c in conds), "conditions to concatenate must have the same keys, got "
                                                f"{[sorted(c) for c in conds]}")
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds else {}


def cond_to(cond: Cond, device) -> dict:
    """The condition on ``device`` (a copy only of the tensors elsewhere)."""
    device = torch.device(device)
    return {k: v if v.device == device else v.to(device) for k, v in cond.items()}


def check_rows(cond: Cond, n: int, what: str = "rows") -> None:
    """Refuse a condition whose tensors do not have ``n`` rows (one per sample or batch row)."""
    for k, v in cond.items():
        require(torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == n,
                f"condition {k!r} must be a tensor with one row per {what} ({n}), got "
                f"{tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}")


class Bound:
    """``D(x, sigma)`` = ``denoiser(x, sigma, **cond)`` with the condition ``cond`` (each tensor (B, ...)) bound to
    x's rows; ``eps`` and ``velocity`` pass it on the same way."""

    def __init__(self, denoiser, cond: Cond):
        self.denoiser, self.cond = denoiser, dict(cond)
        first = next(iter(self.cond.values()), None)
        self.rows = first.shape[0] if torch.is_tensor(first) and first.ndim else None
        check_rows(self.cond, self.rows or 0)

    def _check(self, x: torch.Tensor) -> None:
        require(self.rows is None or x.shape[0] == self.rows,
                f"{x.shape[0]} rows for a condition of {self.rows} rows: an objective re-arranged its rows without "
                "rearrange()")

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self._check(x)
        return self.denoiser(x, sigma, **self.cond)

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """eps_hat with the bound condition (the network's direct noise prediction where it has one)."""
        if hasattr(self.denoiser, "eps"):
            self._check(x)
            return self.denoiser.eps(x, sigma, **self.cond)
        return (x - self(x, sigma)) / per_sample(sigma, x)

    def velocity(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The flow velocity v(x_t, t) with the bound condition (a flow-matching network's own where it has one)."""
        self._check(x_t)
        return flow_velocity(self.denoiser, x_t, t, **self.cond)


def bind(denoiser, cond: Cond | None):
    """``denoiser`` bound to the row-aligned ``cond`` (:class:`Bound`), or the denoiser itself for no condition."""
    return Bound(denoiser, cond) if cond else denoiser


def bound_cond(D) -> Cond:
    """The condition bound to D ({} for an unbound denoiser)."""
    return D.cond if isinstance(D, Bound) else NO_COND


def rearrange(D, arrange: Callable[[Cond], Cond]):
    """D with its bound condition re-arranged as its rows are (``arrange`` maps a condition to the new rows', e.g.
    ``lambda c: cond_repeat(c, K)``); an unbound D unchanged."""
    return Bound(D.denoiser, arrange(D.cond)) if isinstance(D, Bound) else D


class Guided(torch.nn.Module):
    """Classifier-free guidance of a class-conditional denoiser with weight ``w`` (>= 0) and unconditional label
    ``null`` (default :data:`NULL`); called like the denoiser, ``D_w(x, sigma, class_labels=y, **other)``: the
    unconditional half swaps the class labels for ``null`` and keeps any other condition."""

    def __init__(self, denoiser, w: float, null: int = NULL):
        super().__init__()
        require(w >= 0, f"guidance weight must be >= 0 (0: no guidance), got {w}")
        self.denoiser, self.w, self.null = denoiser, float(w), int(null)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self._guide(lambda D, x, s, **c: D(x, s, **c), x, sigma, cond)

    def flow_x0(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """The guided clean estimate on the flow path (a flow-matching model's; t = 1 included)."""
        return self._guide(flow_x0, x_t, t, cond)

    def _guide(self, estimate, x: torch.Tensor, level, cond: Cond) -> torch.Tensor:
        """(1 + w) cond - w uncond of ``estimate(denoiser, x, level, **cond)`` (a call or flow_x0; level: sigma or
        t, a scalar or (B,)), both halves in one call."""
        require(cond.get(LABELS) is not None, "classifier-free guidance needs class labels (--class K, all or random)")
        B = x.shape[0]
        s = torch.as_tensor(level, dtype=x.dtype, device=x.device)
        s2 = s.reshape(1).expand(2 * B) if s.ndim == 0 else torch.cat([s, s])
        y = torch.as_tensor(cond[LABELS], device=x.device)
        cond = {**cond, LABELS: y}
        both = estimate(self.denoiser, torch.cat([x, x]), s2,
                        **cond_cat(cond, {**cond, LABELS: torch.full_like(y, self.null)}))
        c, uncond = both[:B], both[B:]
        return c + self.w * (c - uncond)
