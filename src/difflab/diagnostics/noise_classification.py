"""Noise classification: how well a denoiser's implied classifier tells clean points from noised ones (CDL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from difflab.devices import device_of
from difflab.objectives.density_ratio import log_density_ratio, noise_to


def noise_classification(D, x: torch.Tensor, zetas, n_alpha: int = 64, seed: int = 0, loc: float | None = None,
                         scale: float | None = None) -> list[dict]:
    """Accuracy and cross-entropy of the implied classifier "clean vs noised to zeta" on held-out data x (N, ...),
    per zeta: half the evaluation is x itself (label +1), half is x noised to zeta (label -1). Computed on D's
    device, with the noise drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    x = x.to(device=device_of(D), dtype=torch.float64)
    out = []
    for z in zetas:
        zt = torch.full((x.shape[0],), float(z), dtype=x.dtype, device=x.device)
        noisy = noise_to(x, zt, torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device))
        logits = torch.cat([log_density_ratio(D, x, zt, n_alpha, g, loc=loc, scale=scale),
                            log_density_ratio(D, noisy, zt, n_alpha, g, loc=loc, scale=scale)])
        y = torch.cat([torch.ones(len(x)), -torch.ones(len(x))]).to(device=x.device, dtype=x.dtype)
        out.append({"zeta": float(z), "accuracy": float(((logits > 0).to(x.dtype) * 2 - 1 == y).double().mean()),
                    "cross_entropy": float(F.softplus(-y * logits).mean() / math.log(2))})
    return out
