"""ITD: the information-theoretic diffusion loss, a log-SNR weighted eps-MSE that is also a likelihood estimate
(Kong et al. 2023).

    -log p(x) ~= h_G + 1/2 E_alpha[ w(alpha) (mse(x, alpha) - mmse_G(alpha)) ]        (nats)

with alpha (log-SNR) from a logistic(loc, scale) truncated to [loc - 3 scale, loc + 3 scale], w = 1/q its inverse
density, mse(x, alpha) = || eps - eps_hat(x_alpha, alpha) ||^2 and the Gaussian reference
mmse_G(alpha) = sum_i sigmoid(alpha + log lambda_i), h_G = d/2 log(2 pi e) + 1/2 sum_i log lambda_i, lambda_i the
eigenvalues of the data covariance (per-dimension variances when ``covariance="diagonal"``).
"""

from __future__ import annotations

import math

import torch

from difflab.denoisers import eps_hat, per_sample
from difflab.devices import device_of, on, to_device
from difflab.errors import require
from difflab.objectives.base import Objective


class TruncatedLogistic:
    """logistic(loc, scale) truncated to [lo, hi] (default loc -+ 3 scale): inverse-CDF draws, deterministic
    nodes (midpoints of equal-probability bins) and the inverse density w = 1/q used as importance weight."""

    def __init__(self, loc: float, scale: float, lo: float | None = None, hi: float | None = None):
        require(scale > 0, f"logistic scale must be > 0, got {scale}")
        self.loc, self.scale = float(loc), float(scale)
        self.lo = self.loc - 3 * self.scale if lo is None else float(lo)
        self.hi = self.loc + 3 * self.scale if hi is None else float(hi)
        require(self.lo < self.hi, f"need lo < hi for the truncated logistic, got [{self.lo}, {self.hi}]")
        sig = lambda v: 1 / (1 + math.exp(-(v - self.loc) / self.scale))  # noqa: E731
        self.u_lo, self.u_hi = sig(self.lo), sig(self.hi)  # the CDF at the truncation points

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        """u in [u_lo, u_hi] -> value (the untruncated logistic's inverse CDF)."""
        return self.loc + self.scale * torch.logit(u)

    def sample(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        u = self.u_lo + (self.u_hi - self.u_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        return self.quantile(u).to(dtype)

    def nodes(self, n: int, dtype=torch.float64) -> torch.Tensor:
        u = self.u_lo + (self.u_hi - self.u_lo) * (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return self.quantile(u).to(dtype)

    def weight(self, v: torch.Tensor) -> torch.Tensor:
        """1 / q(v) = scale (u_hi - u_lo) / (sigmoid(z) sigmoid(-z)), z = (v - loc) / scale."""
        z = (v - self.loc) / self.scale
        return self.scale * (self.u_hi - self.u_lo) / (torch.sigmoid(z) * torch.sigmoid(-z))


def data_eigenvalues(x: torch.Tensor, covariance: str = "auto") -> torch.Tensor:
    """Eigenvalues (d,) of the covariance of x (N, *shape), float64; ``diagonal``: per-dimension variances.

    ``auto`` is ``full`` up to d = 256 and ``diagonal`` above (images)."""
    require(covariance in ("auto", "full", "diagonal"),
            f"covariance must be auto, full or diagonal, got {covariance!r}")
    xf = x.reshape(x.shape[0], -1).to(torch.float64)
    require(xf.shape[0] >= 2, "need at least 2 data points to estimate the data covariance")
    if covariance == "diagonal" or (covariance == "auto" and xf.shape[1] > 256):
        lam = xf.var(0)
    else:
        lam = torch.linalg.eigvalsh(torch.cov(xf.T).reshape(xf.shape[1], xf.shape[1]))
    return lam.clamp_min(1e-12)


def default_loc_scale(lam: torch.Tensor) -> tuple[float, float]:
    """loc = -mean(log lambda); scale = 3 for d <= 2, else sqrt(1 + (3 / pi) var(log lambda))."""
    log_lam = lam.log()
    loc = -float(log_lam.mean())
    if lam.numel() <= 2:
        return loc, 3.0
    return loc, math.sqrt(1 + 3 / math.pi * float(log_lam.var(unbiased=False)))


class ITDLoss(Objective):
    """The ITD objective: per-example -log p(x) estimates from one alpha draw each (the training loss).

    Args:
        lam: (d,) eigenvalues of the data covariance (see :func:`data_eigenvalues`); set by the trainer from the
            training data when not given.
        loc, scale: the truncated logistic of the log-SNR; None derives them from ``lam`` (spec defaults).
        covariance: how ``lam`` is estimated from data: ``auto``, ``full`` or ``diagonal``.
    """

    precond = "eps-continuous"
    needs_data = True
    help = ("log-SNR weighted eps-MSE (a likelihood bound): loc, scale (from the data's covariance), "
            "covariance (auto | full | diagonal)")

    def __init__(self, lam=None, loc: float | None = None, scale: float | None = None, covariance: str = "auto"):
        require(scale is None or scale > 0, f"ITD scale must be > 0, got {scale}")
        self.covariance = covariance
        self._loc, self._scale = loc, scale
        self.lam = None
        if lam is not None:
            self.set_reference(torch.as_tensor(lam, dtype=torch.float64).reshape(-1))

    @property
    def fitted(self) -> bool:
        """Whether the Gaussian reference (``lam``) is set."""
        return self.lam is not None

    def fit(self, x: torch.Tensor) -> ITDLoss:
        """Set the Gaussian reference from data x (N, *shape)."""
        return self.set_reference(data_eigenvalues(x, self.covariance))

    def set_reference(self, lam: torch.Tensor) -> ITDLoss:
        require(bool((lam > 0).all()), "ITD reference eigenvalues must be positive")
        self.lam = lam
        loc, scale = default_loc_scale(lam)
        self.loc = loc if self._loc is None else float(self._loc)
        self.scale = scale if self._scale is None else float(self._scale)
        self.alpha_dist = TruncatedLogistic(self.loc, self.scale)
        self.h_gauss = 0.5 * lam.numel() * math.log(2 * math.pi * math.e) + 0.5 * float(lam.log().sum())
        return self

    # ----------------------------------------------------------------------------------------- pieces

    def sample_alpha(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        return self.alpha_dist.sample(n, generator, dtype)

    def quadrature_alpha(self, n: int, dtype=torch.float64) -> torch.Tensor:
        """n deterministic log-SNR nodes at the midpoints of equal-probability bins (a midpoint rule in u)."""
        return self.alpha_dist.nodes(n, dtype)

    def weight(self, alpha: torch.Tensor) -> torch.Tensor:
        """w(alpha) = 1 / q(alpha) = scale tanh(3/2) / (sigmoid(z) sigmoid(-z)), z = (alpha - loc) / scale."""
        return self.alpha_dist.weight(alpha)

    def mmse_gauss(self, alpha: torch.Tensor) -> torch.Tensor:
        """sum_i sigmoid(alpha + log lambda_i): the eps-MMSE of the Gaussian reference, (n,)."""
        return torch.sigmoid(alpha[:, None] + on(self.lam, alpha).log().to(alpha.dtype)[None]).sum(1)

    def mse(self, D, x0: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """|| eps - eps_hat(x0 + sigma eps, sigma) ||^2 with sigma = exp(-alpha / 2), per example (B,)."""
        x, sigma = self.inputs(x0, alpha, eps)
        return ((eps - eps_hat(D, x, sigma)) ** 2).reshape(x0.shape[0], -1).sum(1)

    @staticmethod
    def inputs(x0: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's rows of :meth:`mse`: (x0 + sigma eps, sigma) with sigma = exp(-alpha / 2)."""
        sigma = (-0.5 * alpha).exp()
        return x0 + per_sample(sigma, x0) * eps, sigma

    def nll_terms(self, D, x0: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-example estimates h_G + 1/2 w(alpha) (mse - mmse_G), one alpha per row, (B,) nats."""
        self.check(x0)
        return self.terms_from_mse(alpha, self.mse(D, x0, alpha, eps))

    def terms_from_mse(self, alpha: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
        """h_G + 1/2 w(alpha) (mse - mmse_G(alpha)) for per-row alpha and mse (B,)."""
        return self.h_gauss + 0.5 * self.weight(alpha) * (mse - self.mmse_gauss(alpha))

    def check(self, x0: torch.Tensor) -> None:
        """Refuse data the reference was not fitted to (or no reference at all)."""
        require(self.lam is not None, "the ITD reference is not set: call fit(x_train) or pass lam")
        require(self.lam.numel() == x0[0].numel(),
                f"ITD reference has {self.lam.numel()} dimensions but the data has {x0[0].numel()}")

    @torch.no_grad()
    def nll(self, D, x: torch.Tensor, n_alpha: int = 128, quadrature: bool = True, seed: int = 0,
            max_rows: int = 1 << 16) -> torch.Tensor:
        """-log p(x) estimates (N,) in nats for x (N, *shape), float64: each point gets ``n_alpha`` log-SNR values
        (quadrature nodes, the default, or Monte-Carlo draws), each with its own noise; rows run in chunks."""
        require(isinstance(n_alpha, int) and n_alpha >= 1, f"n_alpha must be a positive integer, got {n_alpha!r}")
        g = torch.Generator().manual_seed(seed)
        x = x.to(torch.float64)
        N = x.shape[0]
        alpha = self.quadrature_alpha(n_alpha).repeat(N) if quadrature else self.sample_alpha(N * n_alpha, g)
        xs = x.repeat_interleave(n_alpha, 0)
        eps = torch.randn(xs.shape, generator=g, dtype=torch.float64)
        xs, alpha, eps = to_device((xs, alpha, eps), device_of(D))  # drawn on the CPU, computed on D's device
        out = torch.cat([self.nll_terms(D, xs[i:i + max_rows], alpha[i:i + max_rows], eps[i:i + max_rows])
                         for i in range(0, len(xs), max_rows)])
        return out.reshape(N, n_alpha).mean(1).cpu()

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        self.check(x0)
        alpha = self.sample_alpha(x0.shape[0], generator, x0.dtype)
        return {"alpha": alpha, "eps": torch.randn(x0.shape, generator=generator, dtype=x0.dtype)}

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        return self.nll_terms(D, x0, draws["alpha"], draws["eps"])
