"""Class conditioning of a denoiser: labels bound to a batch's rows, and classifier-free guidance.

- :class:`Labelled` binds class labels y (B,) to a denoiser, so that an objective written for ``D(x, sigma)``
  trains a class-conditional network unchanged. Where an objective re-arranges its rows (repeats, subsets,
  concatenations) it re-arranges the labels the same way with :func:`relabel`, which leaves an unlabelled
  denoiser as it is. A row count that does not match its labels is refused, so a missed re-arrangement fails
  loudly instead of pairing rows with the wrong labels.
- :class:`Guided` is classifier-free guidance (Ho and Salimans 2022): with weight w,
  D_w(x, sigma, y) = (1 + w) D(x, sigma, y) - w D(x, sigma, null), both halves in one network call. w = 0 is the
  plain conditional denoiser; w is diffusers' ``guidance_scale`` minus 1.

The unconditional label ``NULL`` (-1) is what label dropout writes in training: difflab's U-Net reads it as the
zero label vector (EDM's convention); a network with a learned null class takes its own index instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.denoisers import denoise, flow_velocity, flow_x0, per_sample
from difflab.errors import require

NULL = -1  # the unconditional label


class Labelled:
    """``D(x, sigma)`` = ``denoiser(x, sigma, class_labels=y)`` with the labels ``y`` (B,) bound to x's rows."""

    def __init__(self, denoiser, y: torch.Tensor):
        self.denoiser, self.y = denoiser, y

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        require(x.shape[0] == len(self.y), f"{x.shape[0]} rows for {len(self.y)} class labels: an objective "
                                           "re-arranged its rows without relabel()")
        return denoise(self.denoiser, x, sigma, self.y)

    def eps(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """eps_hat with the bound labels (the network's direct noise prediction where it has one)."""
        if hasattr(self.denoiser, "eps"):
            require(x.shape[0] == len(self.y), f"{x.shape[0]} rows for {len(self.y)} class labels")
            return self.denoiser.eps(x, sigma, class_labels=self.y)
        return (x - self(x, sigma)) / per_sample(sigma, x)

    def velocity(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The flow velocity v(x_t, t) with the bound labels (a flow-matching network's own where it has one)."""
        require(x_t.shape[0] == len(self.y), f"{x_t.shape[0]} rows for {len(self.y)} class labels")
        return flow_velocity(self.denoiser, x_t, t, self.y)


def relabel(D, arrange: Callable[[torch.Tensor], torch.Tensor]):
    """D with its bound labels re-arranged as its rows are (e.g. ``lambda y: y.repeat_interleave(K)``); an
    unlabelled D unchanged."""
    return Labelled(D.denoiser, arrange(D.y)) if isinstance(D, Labelled) else D


def with_labels(D, y: torch.Tensor | None):
    """D bound to the labels y (B,), or D itself when y is None (an unconditional run)."""
    return D if y is None else Labelled(D, y)


class Guided(torch.nn.Module):
    """Classifier-free guidance of a class-conditional denoiser with weight ``w`` (>= 0) and unconditional label
    ``null`` (default :data:`NULL`); called like the denoiser, ``D_w(x, sigma, class_labels=y)``."""

    def __init__(self, denoiser, w: float, null: int = NULL):
        super().__init__()
        require(w >= 0, f"guidance weight must be >= 0 (0: no guidance), got {w}")
        self.denoiser, self.w, self.null = denoiser, float(w), int(null)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._guide(denoise, x, sigma, class_labels)

    def flow_x0(self, x_t: torch.Tensor, t, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The guided clean estimate on the flow path (a flow-matching model's; t = 1 included)."""
        return self._guide(flow_x0, x_t, t, class_labels)

    def _guide(self, estimate, x: torch.Tensor, level, class_labels) -> torch.Tensor:
        """(1 + w) cond - w uncond of ``estimate(denoiser, x, level, labels)`` (denoise or flow_x0; level: sigma or
        t, a scalar or (B,)), both halves in one call."""
        require(class_labels is not None, "classifier-free guidance needs class labels (--class K, all or random)")
        B = x.shape[0]
        s = torch.as_tensor(level, dtype=x.dtype, device=x.device)
        s2 = s.reshape(1).expand(2 * B) if s.ndim == 0 else torch.cat([s, s])
        y = torch.as_tensor(class_labels, device=x.device)
        both = estimate(self.denoiser, torch.cat([x, x]), s2, torch.cat([y, torch.full_like(y, self.null)]))
        cond, uncond = both[:B], both[B:]
        return cond + self.w * (cond - uncond)
