"""The denoiser protocol ``D(x, sigma, **cond) -> x0_hat``, preconditioning wrappers, and analytic denoisers.

Shapes: ``x`` is (B, *shape); ``sigma`` is a scalar or (B,), one noise level per sample, in sigma-space
(``x = x0 + sigma * n``). A denoiser returns the estimate of E[x0 | x] with the shape of ``x``. A conditional one
also takes its row-aligned condition as keywords, each a tensor (B, ...) (e.g. ``class_labels=y``, y (B,) int64;
:mod:`difflab.conditioning`); an unconditional one is called with none.

- :class:`EDMPrecond`, :class:`VPPrecond`, :class:`VEPrecond` turn a backbone ``F(x_in, c_noise)`` into a denoiser;
  :class:`FlowPrecond` does it for a flow-matching velocity network, and :func:`flow_x0` asks any denoiser for the
  clean estimate at a point of the flow path x_t = (1 - t) x0 + t n (t = 1, pure noise, included).
- :class:`GaussianDenoiser`, :class:`GMMDenoiser`, :class:`EmpiricalDenoiser` are exact: for their data
  distribution they give the optimal denoiser, the score and the log-density of the noised marginal
  ``p_sigma = p * N(0, sigma^2 I)`` at every noise level. They are how the maths is tested.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from difflab.errors import require
from difflab.schedules import DDPMSchedule, VPSchedule


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor: ...


def per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a (B, 1, ..., 1) tensor in x's dtype and device, ready to broadcast against x of shape (B, *shape)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    require(s.shape == (x.shape[0],), f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def eps_hat(denoiser: Denoiser, x: torch.Tensor, sigma) -> torch.Tensor:
    """The noise prediction (x - D(x, sigma)) / sigma; uses the wrapper's direct ``eps`` when it has one."""
    if hasattr(denoiser, "eps"):
        return denoiser.eps(x, sigma)
    return (x - denoiser(x, sigma)) / per_sample(sigma, x)


def score(denoiser: Denoiser, x: torch.Tensor, sigma) -> torch.Tensor:
    """The score of p_sigma, grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
    s = per_sample(sigma, x)
    return (denoiser(x, sigma) - x) / s**2


# --------------------------------------------------------------------------------------------- preconditioning


class Precond(nn.Module):
    """Base of the wrappers: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise).

    The backbone ``net(x_in, c_noise) -> (B, *shape)`` runs in its own parameter dtype and on its own device; inputs
    are moved to them and the output back to x's dtype and device, so a sampler or objective keeps its arithmetic
    in the dtype and on the device it chose (float64 states around a float32 network, say), whatever the
    network's. (Random draws are made on the CPU, so that every device sees the same numbers.)
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def coefficients(self, sigma: torch.Tensor):  # pragma: no cover - abstract
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (B,)."""
        raise NotImplementedError

    def _net(self, x_in: torch.Tensor, c_noise: torch.Tensor, dtype, cond) -> torch.Tensor:
        """The backbone's output for its inputs and the condition ``cond`` (a mapping of keyword -> (B, ...) tensor,
        e.g. class_labels for difflab's U-Net with num_classes or a diffusers UNet with class embeds), all moved to
        its device (floating-point ones in its dtype), and back in ``dtype`` on x_in's device."""
        p = next(self.net.parameters())  # the backbone may live on a GPU: its inputs go there, its output comes back
        args = (x_in.to(device=p.device, dtype=p.dtype), c_noise.to(device=p.device, dtype=p.dtype))
        extra = {}
        for k, v in cond.items():
            v = torch.as_tensor(v, device=p.device)
            extra[k] = v.to(p.dtype) if v.is_floating_point() else v
        return self.net(*args, **extra).to(device=x_in.device, dtype=dtype)

    def _coefficients(self, sigma, x: torch.Tensor):
        """(c_skip, c_out, c_in) broadcastable against x, and c_noise (B,). A scalar sigma (one level for the
        whole batch, as in sequential sampling) is handled once rather than per row."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if s.ndim == 0:
            *c, c_noise = self.coefficients(s.reshape(1))
            return [v.reshape(1, *([1] * (x.ndim - 1))) for v in c], c_noise.expand(x.shape[0])
        *c, c_noise = self.coefficients(per_sample(s, x))
        return c, c_noise.reshape(-1)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """D(x, sigma) for x (B, *shape), sigma scalar or (B,); ``cond`` the backbone's row-aligned condition (e.g.
        class_labels (B,) for a class-conditional network; none for an unconditional one)."""
        (c_skip, c_out, c_in), c_noise = self._coefficients(sigma, x)
        return c_skip * x + c_out * self._net(c_in * x, c_noise, x.dtype, cond)


class EDMPrecond(Precond):
    """EDM (Karras et al. 2022): c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
    c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4, with sd = ``sigma_data`` (1.0 for standardised toy data,
    0.5 for images in [-1, 1])."""

    def __init__(self, net: nn.Module, sigma_data: float = 1.0):
        super().__init__(net)
        self.sigma_data = sigma_data

    def coefficients(self, s):
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, s.log() / 4


class VEPrecond(Precond):
    """VE (Song et al. 2021, EDM form): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2)."""

    def coefficients(self, s):
        return torch.ones_like(s), s, torch.ones_like(s), (0.5 * s).log()


class VPPrecond(Precond):
    """VP: F sees the VP sample x_t = x / sqrt(1 + sigma^2) and a timestep, and predicts (``prediction``)
    - ``"eps"``: the noise, D(x, sigma) = x - sigma F (DDPM; diffusers' ``epsilon``);
    - ``"x0"``: the clean data, D = F (diffusers' ``sample``);
    - ``"v"``: v = sqrt(abar) eps - sqrt(1 - abar) x0, D = x / (1 + sigma^2) - sigma F / sqrt(1 + sigma^2)
      (Salimans and Ho 2022; diffusers' ``v_prediction``).

    The timestep fed to F is:
    - with a :class:`DDPMSchedule`: the nearest integer t in 1..T (``discrete=True``, what a DDPM-trained net
      saw) or the continuous t interpolated in log sigma (``discrete=False``);
    - with a :class:`VPSchedule`: EDM's c_noise = (M - 1) t(sigma), M = 1000.
    """

    def __init__(self, net: nn.Module, schedule: DDPMSchedule | VPSchedule | None = None, discrete: bool = True,
                 prediction: str = "eps"):
        super().__init__(net)
        require(prediction in PREDICTIONS, f"unknown VP prediction {prediction!r}: use {', '.join(PREDICTIONS)}")
        self.schedule = schedule if schedule is not None else DDPMSchedule()
        self.discrete = discrete
        self.prediction = prediction

    def timestep(self, s: torch.Tensor) -> torch.Tensor:
        if isinstance(self.schedule, VPSchedule):
            return 999.0 * self.schedule.t(s)
        return self.schedule.t_from_sigma(s, discrete=self.discrete).to(s.dtype)

    def coefficients(self, s):
        c_in = 1 / (1 + s**2).sqrt()
        if self.prediction == "x0":
            return torch.zeros_like(s), torch.ones_like(s), c_in, self.timestep(s)
        if self.prediction == "v":
            return c_in**2, -s * c_in, c_in, self.timestep(s)
        return torch.ones_like(s), -s, c_in, self.timestep(s)

    def eps(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """eps_hat: F(x_t, t) directly for an eps network (no round-off from forming and undoing x - sigma F)."""
        if self.prediction != "eps":
            return (x - self(x, sigma, **cond)) / per_sample(sigma, x)
        (_, _, c_in), c_noise = self._coefficients(sigma, x)
        return self._net(c_in * x, c_noise, x.dtype, cond)


PREDICTIONS = ("eps", "x0", "v")  # what a VP network predicts


class FlowPrecond(Precond):
    """A flow-matching velocity network v(x_t, 1000 t) ~ n - x0 on the path x_t = (1 - t) x0 + t n, as a denoiser.

    With sigma = t / (1 - t) the path is the VE one scaled by 1 - t, x_t = x / (1 + sigma), and x0_hat = x_t - t v:
    c_skip = c_in = 1 / (1 + sigma), c_out = -sigma / (1 + sigma), c_noise = 1000 t (the timestep diffusers feeds
    SD3-style models). :meth:`velocity` and :meth:`flow_x0` take x_t and t directly, t = 1 included.
    """

    T = 1000  # the timestep scale: the network sees 1000 t

    def coefficients(self, s):
        c_in = 1 / (1 + s)
        return c_in, -s * c_in, c_in, self.T * s * c_in

    def velocity(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """v(x_t, t) (B, *shape) for t a scalar or (B,) in [0, 1]."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        return self._net(x_t, (self.T * t).reshape(-1).expand(x_t.shape[0]), x_t.dtype, cond)

    def flow_x0(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """The clean estimate x_t - t v(x_t, t)."""
        return x_t - per_sample(t, x_t) * self.velocity(x_t, t, **cond)


def flow_x0(denoiser: Denoiser, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
    """E[x0 | x_t] on the flow path x_t = (1 - t) x0 + t n, t a scalar or (B,) in [0, 1]; ``cond`` the denoiser's
    row-aligned condition (none: unconditional).

    A denoiser with a ``flow_x0`` method answers directly (a velocity network, the exact denoisers, guidance); any
    other is asked D(x_t / (1 - t), t / (1 - t)), which needs t < 1: a sigma-space network has no finite input at
    t = 1 (pure noise), where a flow sampler starts.
    """
    if hasattr(denoiser, "flow_x0"):
        return denoiser.flow_x0(x_t, t, **cond)
    tt = per_sample(t, x_t)
    require(bool((tt < 1).all()), f"{type(denoiser).__name__} cannot be evaluated at t = 1 (pure noise) of the flow "
                                  "path: flow samplers need a flow-matching model (objective fm, precond flow); "
                                  "sample this one with ddpm, ddim, heun or dpmpp-2m")
    s = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
    return denoiser(x_t / (1 - tt), s / (1 - s), **cond)


def flow_velocity(denoiser: Denoiser, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
    """v(x_t, t) = (x_t - E[x0 | x_t]) / t: a velocity network's own output (a ``velocity`` method), else from the
    clean estimate; ``cond`` as for :func:`flow_x0`."""
    if hasattr(denoiser, "velocity"):
        return denoiser.velocity(x_t, t, **cond)
    return (x_t - flow_x0(denoiser, x_t, t, **cond)) / per_sample(t, x_t)


# --------------------------------------------------------------------------------------------- analytic


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(torch.float64)


def _sigma2(sigma, x: torch.Tensor) -> torch.Tensor:
    return per_sample(sigma, x).reshape(-1, 1).to(torch.float64) ** 2


class GMMDenoiser:
    """Exact denoiser of a Gaussian mixture sum_k w_k N(mu_k, C_k) in R^d.

    Args:
        weights: (K,) mixture weights (normalised here).
        means: (K, d).
        covs: (K, d, d) covariances, or (K, d) diagonal variances, or (K,) isotropic variances.

    Under the channel x = x0 + sigma n the mixture stays a mixture, N(mu_k, C_k + sigma^2 I), so the posterior
    mean, the score and the log-density are closed form. All arithmetic is float64; outputs take x's dtype.
    """

    def __init__(self, weights, means, covs):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 1:
            means = means[:, None]
        K, d = means.shape
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(K)
        require(bool((w > 0).all()), "mixture weights must be positive")
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 1:
            covs = covs[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif covs.ndim == 2:
            covs = torch.diag_embed(covs)
        require(covs.shape == (K, d, d), f"covariances must be (K, d, d) = ({K}, {d}, {d}), got {tuple(covs.shape)}")
        self.log_w = (w / w.sum()).log()
        self.means = means
        self.covs = covs
        self.lam, self.U = torch.linalg.eigh(covs)  # (K, d), (K, d, d)
        self.lam = self.lam.clamp_min(0.0)
        self.dim = d

    def _parts(self, x, sigma):
        xf, s2 = _flat(x), _sigma2(sigma, x)  # (B, d), (B, 1)
        z = torch.einsum("kji,bkj->bki", self.U, xf[:, None, :] - self.means[None])  # U_k^T (x - mu_k): (B, K, d)
        var = self.lam[None] + s2[:, :, None]  # (B, K, d)
        log_n = -0.5 * ((z**2 / var) + (2 * math.pi * var).log()).sum(-1)  # (B, K)
        log_joint = self.log_w[None] + log_n
        return xf, z, var, log_joint

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        xf, z, var, log_joint = self._parts(x, sigma)
        r = torch.softmax(log_joint, dim=1)  # posterior component probabilities
        post = self.means[None] + torch.einsum("kij,bkj->bki", self.U, self.lam[None] / var * z)  # (B, K, d)
        return (r[:, :, None] * post).sum(1).to(x.dtype).reshape(x.shape)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        xf, z, var, log_joint = self._parts(x, sigma)
        r = torch.softmax(log_joint, dim=1)
        g = -torch.einsum("kij,bkj->bki", self.U, z / var)
        return (r[:, :, None] * g).sum(1).to(x.dtype).reshape(x.shape)

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p_sigma(x), (B,), float64."""
        return torch.logsumexp(self._parts(x, sigma)[3], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n clean draws (n, d), float64."""
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + torch.einsum("nij,nj->ni", self.U[k], self.lam[k].sqrt() * z)

    @property
    def mean(self) -> torch.Tensor:
        return (self.log_w.exp()[:, None] * self.means).sum(0)

    def flow_x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """E[x0 | x_t] on the flow path (see :func:`exact_flow_x0`)."""
        return exact_flow_x0(self, x_t, t)

    @property
    def cov(self) -> torch.Tensor:
        w = self.log_w.exp()
        m = self.mean
        dm = self.means - m
        return (w[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)


class GaussianDenoiser(GMMDenoiser):
    """Exact denoiser of N(mean, cov): D(x, sigma) = mu + C (C + sigma^2 I)^-1 (x - mu).

    ``cov``: (d, d), (d,) diagonal or a scalar."""

    def __init__(self, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.shape[1]
        if cov.ndim == 0:
            cov = cov * torch.eye(d, dtype=torch.float64)
        elif cov.ndim == 1:
            cov = torch.diag(cov)
        super().__init__(torch.ones(1), mean, cov[None])

    def entropy(self) -> float:
        """Differential entropy of the clean Gaussian in nats: d/2 log(2 pi e) + 1/2 log det C."""
        return 0.5 * self.dim * math.log(2 * math.pi * math.e) + 0.5 * float(self.lam.log().sum())


class EmpiricalDenoiser:
    """Exact denoiser of a finite data set {y_j} with equal weights:
    D(x, sigma) = sum_j softmax_j(-|x - y_j|^2 / (2 sigma^2)) y_j.

    ``points``: (N, *shape). Evaluated in float64 in chunks of rows so memory stays O(chunk x N).
    """

    def __init__(self, points, chunk_elems: int = 1 << 24):
        self.points = torch.as_tensor(points, dtype=torch.float64)
        self.Y = self.points.reshape(self.points.shape[0], -1)
        self.Y2 = (self.Y**2).sum(1)
        self.dim = self.Y.shape[1]
        self.chunk = max(1, chunk_elems // max(1, self.Y.shape[0]))

    def _logits(self, xf: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """-|x - y_j|^2 / (2 sigma^2) up to a per-row constant: (x.y_j - |y_j|^2 / 2) / sigma^2."""
        return (xf @ self.Y.T - 0.5 * self.Y2[None]) / s2

    def _rows(self, x, sigma, fn):
        xf, s2 = _flat(x), _sigma2(sigma, x)
        return torch.cat([fn(xf[i : i + self.chunk], s2[i : i + self.chunk]) for i in range(0, len(xf), self.chunk)])

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        out = self._rows(x, sigma, lambda xf, s2: torch.softmax(self._logits(xf, s2), 1) @ self.Y)
        return out.to(x.dtype).reshape(x.shape)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = per_sample(sigma, x)
        return (self(x, sigma) - x) / s**2

    @property
    def mean(self) -> torch.Tensor:
        return self.Y.mean(0)

    def flow_x0(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """E[x0 | x_t] on the flow path (see :func:`exact_flow_x0`)."""
        return exact_flow_x0(self, x_t, t)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log p_sigma(x) = log mean_j N(x; y_j, sigma^2 I), (B,), float64."""
        n, d = self.Y.shape

        def fn(xf, s2):
            d2 = ((xf**2).sum(1, keepdim=True) - 2 * xf @ self.Y.T + self.Y2[None]).clamp_min(0)
            log_n = -0.5 * d2 / s2 - 0.5 * d * (2 * math.pi * s2).log()
            return torch.logsumexp(log_n, 1) - math.log(n)

        return self._rows(x, sigma, fn)


def exact_flow_x0(denoiser, x_t: torch.Tensor, t) -> torch.Tensor:
    """E[x0 | x_t] of an exact denoiser on the flow path: D(x_t / (1 - t), t / (1 - t)) for t < 1, and the data
    mean at t = 1, where x_t is pure noise and says nothing of x0. float64 arithmetic, x_t's dtype out."""
    tt = per_sample(t, x_t).to(torch.float64)
    ones = tt.reshape(-1) >= 1
    safe = torch.where(tt >= 1, torch.zeros_like(tt), tt)  # (the rows at t = 1 are replaced below)
    x0 = denoiser(x_t.to(torch.float64) / (1 - safe), (safe / (1 - safe)).reshape(-1).expand(x_t.shape[0]))
    x0 = x0.reshape(x_t.shape[0], -1)
    x0[ones.expand(x_t.shape[0])] = denoiser.mean.reshape(1, -1).to(x0)
    return x0.to(x_t.dtype).reshape(x_t.shape)
