"""Far-field gain: how a denoiser extrapolates to states far outside the data, where parallel samplers go.

Picard iterates that have not converged yet can sit thousands of noise standard deviations away from any path a
sequential sampler takes (on the Dino set their mean distance reaches 10^3 to 10^8 state-noise std within a
dozen sweeps). No objective trains there, so what the denoiser returns is the network's extrapolation:

    gain(R, sigma) = E_u || D(R u, sigma) || / || R u ||,   u uniform on the unit sphere scaled to norm sqrt(d).

The exact denoiser pulls a far state back towards the data: for a Gaussian mixture its gain falls with R to the
components' own shrinkage c^2 / (c^2 + sigma^2) (below 0.01 for Dino at sigma >= 0.1; 0 for a finite point set).
A network extrapolates: its gain stays about constant in R, at whatever slope training left it. Above 1, a far
state's clean estimate lies further out than the state itself, the DDPM steps push it outwards, and the Picard
iterates beyond the converged front grow geometrically, which slows the front (docs/results.md: "Why some models need
many Picard sweeps").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from difflab.devices import device_of
from difflab.errors import require


@dataclass
class FarField:
    radii: np.ndarray  # (R,)
    sigmas: np.ndarray  # (S,)
    gain: np.ndarray  # (R, S) mean ||D(x)|| / ||x||

    def to_dict(self) -> dict:
        return {"radii": self.radii.tolist(), "sigmas": self.sigmas.tolist(), "gain": self.gain.tolist()}


@torch.no_grad()
def far_field_gain(denoiser, shape: tuple[int, ...], sigmas, radii=(10.0, 1000.0), n_dirs: int = 64,
                   seed: int = 0) -> FarField:
    """gain[r, s] for the denoiser ``D(x, sigma)`` on examples of ``shape``, at radii (in units of the
    per-coordinate scale: ||x|| = R sqrt(d)) and noise levels ``sigmas``; ``n_dirs`` random directions."""
    sigmas = [float(s) for s in sigmas]
    radii = [float(r) for r in radii]
    require(len(sigmas) >= 1 and all(math.isfinite(s) and s > 0 for s in sigmas),
            f"sigmas must be positive numbers, got {sigmas}")
    require(len(radii) >= 1 and all(math.isfinite(r) and r > 0 for r in radii),
            f"radii must be positive numbers, got {radii}")
    require(isinstance(n_dirs, int) and n_dirs >= 1, f"n_dirs must be a positive integer, got {n_dirs!r}")
    d = math.prod(shape)
    u = torch.randn((n_dirs, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = (u / u.norm(dim=1, keepdim=True) * math.sqrt(d)).to(device_of(denoiser))  # drawn on the CPU, used on D's
    gain = torch.zeros((len(radii), len(sigmas)), dtype=torch.float64, device=u.device)
    for i, r in enumerate(radii):
        x = (r * u).reshape(n_dirs, *shape)
        for k, s in enumerate(sigmas):
            y = denoiser(x, torch.full((n_dirs,), s, dtype=x.dtype, device=x.device))
            gain[i, k] = (y.double().reshape(n_dirs, -1).norm(dim=1) / (r * math.sqrt(d))).mean()
    return FarField(np.array(radii), np.array(sigmas), gain.cpu().numpy())
