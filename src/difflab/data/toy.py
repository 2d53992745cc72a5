"""Toy data sets with ``sample(n, seed) -> (n, d)`` float64 tensors.

- ``dino``: the Datasaurus dino (142 points, shipped with the package), prepared as the CDL paper's code does:
  indices drawn with replacement, N(0, 0.15^2) jitter per coordinate in raw units, x -> (x/54 - 1) 4,
  y -> (y/48 - 1) 4, then each axis standardised to mean 0 and std 1. The standardisation uses the exact
  population moments of that jittered distribution, so it is the same map for every sample size and seed.
- ``moons``, ``8gaussians``, ``checkerboard``, ``circles``, ``spirals``, ``swissroll``: common 2-D sets, each
  standardised (per axis) with the population moments estimated once from 200,000 points of seed 0.
- ``gmm1d``: 0.5 N(-5, 1) + 0.5 N(+5, 1), raw units; ``denoiser()`` gives its exact denoiser.

Training uses ``train_data()`` (100,000 points, seed 42); evaluation ``eval_data()`` (8,000 fresh points, seed 1).
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import numpy as np
import torch

from difflab.denoisers import GMMDenoiser
from difflab.errors import require

N_TRAIN, TRAIN_SEED = 100_000, 42
N_EVAL, EVAL_SEED = 8_000, 1


class ToyData:
    """Base class: subclasses implement ``_draw(rng, n) -> ndarray (n, d)`` in raw units."""

    name = ""
    dim = 2

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) per axis used to standardise; identity by default."""
        return np.zeros(self.dim), np.ones(self.dim)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n points (n, d), float64, from numpy Generator(seed)."""
        require(isinstance(n, int) and n >= 1, f"number of points must be a positive integer, got {n!r}")
        x = self._draw(np.random.default_rng(seed), n)
        mean, std = self._moments()
        return torch.from_numpy((x - mean) / std)

    def train_data(self, n: int | None = None, seed: int = TRAIN_SEED) -> torch.Tensor:
        return self.sample(N_TRAIN if n is None else n, seed)

    def eval_data(self, n: int | None = None, seed: int = EVAL_SEED) -> torch.Tensor:
        return self.sample(N_EVAL if n is None else n, seed)


class EstimatedMoments(ToyData):
    """Standardised with per-axis moments estimated once from 200,000 raw points of seed 0."""

    def _moments(self):
        return _estimated_moments(type(self))


@functools.cache
def _estimated_moments(cls) -> tuple[np.ndarray, np.ndarray]:
    x = cls()._draw(np.random.default_rng(0), 200_000)
    return x.mean(0), x.std(0)


class Dino(ToyData):
    name = "dino"
    jitter = 0.15

    def __init__(self):
        raw = np.loadtxt(resources.files("difflab.data").joinpath("datasaurus_dino.csv").open(), delimiter=",",
                         skiprows=1)
        self.raw = raw  # (142, 2) raw Datasaurus units
        self.scale = np.array([4 / 54, 4 / 48])

    def _map(self, pts: np.ndarray) -> np.ndarray:
        """Raw Datasaurus units -> the tiny-diffusion map (x/54 - 1) 4, (y/48 - 1) 4."""
        return (pts - np.array([54.0, 48.0])) * self.scale

    def _draw(self, rng, n):
        idx = rng.integers(0, len(self.raw), n)
        return self._map(self.raw[idx] + self.jitter * rng.standard_normal((n, 2)))

    def _moments(self):
        mapped = self._map(self.raw)
        var = mapped.var(0) + (self.jitter * self.scale) ** 2  # population variance of the jittered mixture
        return mapped.mean(0), np.sqrt(var)

    def denoiser(self) -> GMMDenoiser:
        """The exact denoiser, score and log-density: the standardised set is a mixture of 142 equally weighted
        Gaussians (one per Datasaurus point, diagonal variances from the jitter)."""
        mean, std = self._moments()
        means = (self._map(self.raw) - mean) / std
        variances = np.broadcast_to((self.jitter * self.scale / std) ** 2, means.shape)
        return GMMDenoiser(torch.ones(len(means)), torch.from_numpy(means), torch.from_numpy(variances.copy()))


class Moons(EstimatedMoments):
    name = "moons"

    def _draw(self, rng, n):
        upper = rng.random(n) < 0.5
        a = rng.random(n) * math.pi
        x = np.where(upper, np.cos(a), 1 - np.cos(a))
        y = np.where(upper, np.sin(a), 0.5 - np.sin(a))
        return np.stack([x, y], 1) + 0.05 * rng.standard_normal((n, 2))


class EightGaussians(EstimatedMoments):
    name = "8gaussians"

    def _draw(self, rng, n):
        k = rng.integers(0, 8, n)
        centres = 2.0 * np.stack([np.cos(k * math.pi / 4), np.sin(k * math.pi / 4)], 1)
        return centres + 0.1 * rng.standard_normal((n, 2))


class Checkerboard(EstimatedMoments):
    name = "checkerboard"

    def _draw(self, rng, n):
        x = rng.uniform(-2, 2, n)
        col = np.floor(x).astype(int)
        row = rng.integers(0, 2, n) * 2 + (col % 2)  # a filled square sits where row + col is even
        y = rng.uniform(0, 1, n) + row - 2
        return np.stack([x, y], 1)


class Circles(EstimatedMoments):
    name = "circles"

    def _draw(self, rng, n):
        r = np.where(rng.random(n) < 0.5, 1.0, 0.5)
        a = rng.uniform(0, 2 * math.pi, n)
        return r[:, None] * np.stack([np.cos(a), np.sin(a)], 1) + 0.03 * rng.standard_normal((n, 2))


class Spirals(EstimatedMoments):
    name = "spirals"

    def _draw(self, rng, n):
        a = np.sqrt(rng.random(n)) * 3 * math.pi  # angle, denser near the centre's end
        sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
        pts = sign[:, None] * np.stack([a * np.cos(a), a * np.sin(a)], 1) / (3 * math.pi)
        return pts + 0.02 * rng.standard_normal((n, 2))


class SwissRoll(EstimatedMoments):
    name = "swissroll"

    def _draw(self, rng, n):
        a = 1.5 * math.pi * (1 + 2 * rng.random(n))
        return np.stack([a * np.cos(a), a * np.sin(a)], 1) / 10 + 0.05 * rng.standard_normal((n, 2))


class GMM1D(ToyData):
    """0.5 N(-5, 1) + 0.5 N(+5, 1) in R^1 (raw units): the CDL paper's two-mode mixture."""

    name = "gmm1d"
    dim = 1
    weights, means, variances = (0.5, 0.5), (-5.0, 5.0), (1.0, 1.0)

    def _draw(self, rng, n):
        k = rng.integers(0, 2, n)
        return (np.asarray(self.means)[k] + np.sqrt(np.asarray(self.variances))[k] * rng.standard_normal(n))[:, None]

    def denoiser(self) -> GMMDenoiser:
        """The exact denoiser, score and log-density of the mixture at every noise level."""
        return GMMDenoiser(self.weights, torch.tensor(self.means)[:, None], torch.tensor(self.variances))


TOY_SETS: dict[str, type[ToyData]] = {
    c.name: c for c in (Dino, Moons, EightGaussians, Checkerboard, Circles, Spirals, SwissRoll, GMM1D)
}
