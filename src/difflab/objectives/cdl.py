"""CDL: the contrastive diffusion loss (Wu et al. 2024): a denoiser is secretly a noise classifier
(spec/objectives.md section 4).

Let p_zeta be the data pushed through the VP channel at log-SNR zeta. The optimal eps-predictor of p_zeta at
log-SNR alpha is r eps_hat(x_alpha, alpha') with sigmoid(alpha') = sigmoid(alpha) sigmoid(zeta) and
r = sqrt(sigmoid(-alpha) / sigmoid(-alpha')), so the ITD integral gives, for any denoiser,

    log p(x) - log p_zeta(x) = 1/2 Integral [ mse_zeta(x, alpha) - mse(x, alpha) ] d alpha,

the logit of the Bayes classifier "clean vs noised to zeta". CDL trains the denoiser with that classifier's
binary cross-entropy (on clean points and on points noised to zeta), added to the standard (ITD) term.

Beyond the reference code: both estimates share their alpha and eps draws (common random numbers, which cancel
most of the estimator noise in the difference) and run in one batched forward pass; the number of alpha draws and
of CDL examples per batch are options, so a CDL step costs a small multiple of a plain one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from difflab.denoisers import eps_hat
from difflab.errors import require
from difflab.objectives.itd import ITDLoss, TruncatedLogistic, default_loc_scale

LOG_SNR_RANGE = (-30.0, 30.0)  # quadrature range: the integrand decays like e^-|alpha| outside


def remap(alpha: torch.Tensor, zeta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha', r): sigmoid(alpha') = sigmoid(alpha) sigmoid(zeta), r = sqrt(sigmoid(-alpha) / sigmoid(-alpha')).

    Computed without cancellation: 1 - sigmoid(alpha') = sigmoid(-alpha) + sigmoid(alpha) sigmoid(-zeta)."""
    log_a = F.logsigmoid(alpha) + F.logsigmoid(zeta)  # log sigmoid(alpha')
    log_1ma = torch.logaddexp(F.logsigmoid(-alpha), F.logsigmoid(alpha) + F.logsigmoid(-zeta))
    return log_a - log_1ma, (0.5 * (F.logsigmoid(-alpha) - log_1ma)).exp()


def noise_to(x: torch.Tensor, zeta: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """The VP channel at log-SNR zeta: sqrt(sigmoid(zeta)) x + sqrt(sigmoid(-zeta)) eta (zeta per row)."""
    shape = (-1, *([1] * (x.ndim - 1)))
    return torch.sigmoid(zeta).sqrt().reshape(shape) * x + torch.sigmoid(-zeta).sqrt().reshape(shape) * eta


def _vp_eps_hat(D, x_vp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """eps_hat of a VP sample at log-SNR alpha (per row), through the sigma-space denoiser."""
    shape = (-1, *([1] * (x_vp.ndim - 1)))
    return eps_hat(D, x_vp * torch.sigmoid(alpha).rsqrt().reshape(shape), (-0.5 * alpha).exp())


def mse_pair(D, x: torch.Tensor, zeta: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
             eps_zeta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mse(x, alpha), mse_zeta(x, alpha)) per row, evaluated in ONE batched denoiser call.

    x: (R, *shape) points; zeta, alpha: (R,); eps: (R, *shape) the noise of both estimates (common random
    numbers) unless ``eps_zeta`` gives the zeta branch its own.
    """
    ez = eps if eps_zeta is None else eps_zeta
    shape = (-1, *([1] * (x.ndim - 1)))
    a_sig = torch.sigmoid(alpha).sqrt().reshape(shape)
    s_sig = torch.sigmoid(-alpha).sqrt().reshape(shape)
    alpha_p, r = remap(alpha, zeta)
    x_alpha = a_sig * x + s_sig * eps
    xz_alpha = a_sig * x + s_sig * ez
    both = _vp_eps_hat(D, torch.cat([x_alpha, xz_alpha]), torch.cat([alpha, alpha_p]))
    e_hat, ez_hat = both[: len(x)], r.reshape(shape) * both[len(x):]
    mse = ((eps - e_hat) ** 2).reshape(len(x), -1).sum(1)
    mse_z = ((ez - ez_hat) ** 2).reshape(len(x), -1).sum(1)
    return mse, mse_z


def _quadrature_nodes(n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Legendre nodes and weights on LOG_SNR_RANGE."""
    u, w = np.polynomial.legendre.leggauss(n)
    lo, hi = LOG_SNR_RANGE
    return (torch.from_numpy(lo + (hi - lo) * (u + 1) / 2).to(dtype),
            torch.from_numpy(w * (hi - lo) / 2).to(dtype))


def _hermite_eps(d: int, n: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss-Hermite nodes (n^d, d) and weights (n^d,) for E over eps ~ N(0, I_d)."""
    z, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    grids = np.meshgrid(*([z] * d), indexing="ij")
    wgrids = np.meshgrid(*([w] * d), indexing="ij")
    nodes = np.stack([g.reshape(-1) for g in grids], 1)
    weights = np.prod(np.stack([g.reshape(-1) for g in wgrids], 1), 1)
    return torch.from_numpy(nodes).to(dtype), torch.from_numpy(weights).to(dtype)


def log_density_ratio(D, x: torch.Tensor, zeta, n_alpha: int = 64, generator: torch.Generator | None = None,
                      quadrature: bool = False, loc: float | None = None, scale: float | None = None,
                      n_eps: int | None = None, common_noise: bool = True) -> torch.Tensor:
    """Estimate log p(x) - log p_zeta(x) per point for denoiser D; x (B, *shape), zeta scalar or (B,).

    Monte-Carlo (default): ``n_alpha`` log-SNR draws per point from the logistic(loc, scale) truncated at
    +-3 scale with importance weights (the reference's estimator), one eps each, shared by both estimates when
    ``common_noise``. loc/scale default to the spec's (loc 0, scale 3 for d <= 2; data-free otherwise: pass them).
    ``quadrature=True``: deterministic Gauss-Legendre over alpha in [-30, 30] (n_alpha nodes) and Gauss-Hermite
    over eps (``n_eps`` nodes per dimension, default 160 / 32 / 12 for d = 1 / 2 / 3; a tensor product, so only
    for d <= 3) for exact evaluation: within 1e-4 nats of closed forms on the tests' mixtures.
    Returns (B,) float in x's dtype.
    """
    B = x.shape[0]
    d = x[0].numel()
    zeta = torch.as_tensor(zeta, dtype=x.dtype).reshape(-1).expand(B)
    if quadrature:
        require(d <= 3, f"quadrature over eps is a tensor product: it needs d <= 3, got d = {d}; use Monte-Carlo")
        alpha, wa = _quadrature_nodes(n_alpha, x.dtype)
        eps, we = _hermite_eps(d, n_eps or {1: 160, 2: 32, 3: 12}[d], x.dtype)
        A, E = len(alpha), len(eps)
        xs = x.repeat_interleave(A * E, 0)  # rows ordered (point, alpha, eps)
        al = alpha.repeat_interleave(E).repeat(B)
        ep = eps.reshape(E, *x.shape[1:]).repeat(B * A, *([1] * (x.ndim - 1)))
        out = []
        for i in range(0, len(xs), 1 << 16):
            mse, mse_z = mse_pair(D, xs[i:i + (1 << 16)], zeta.repeat_interleave(A * E)[i:i + (1 << 16)],
                                  al[i:i + (1 << 16)], ep[i:i + (1 << 16)])
            out.append(mse_z - mse)
        diff = torch.cat(out).reshape(B, A, E)
        return 0.5 * ((diff * we).sum(2) * wa).sum(1)
    if loc is None or scale is None:
        dl, ds = default_loc_scale(torch.ones(d, dtype=torch.float64))
        loc, scale = (dl if loc is None else loc), (ds if scale is None else scale)
    dist = TruncatedLogistic(loc, scale)
    alpha, eps, eps_z = draw_ratio_noise(x, n_alpha, dist, generator, common_noise)
    return ratio_from_draws(D, x, zeta, alpha, eps, eps_z, dist)


def draw_ratio_noise(x: torch.Tensor, n_alpha: int, dist, generator=None, common_noise: bool = True):
    """The Monte-Carlo draws of :func:`log_density_ratio`: alpha (B, n_alpha), eps (B, n_alpha, *shape) and the
    zeta branch's own eps (None with common random numbers)."""
    B = x.shape[0]
    alpha = dist.sample(B * n_alpha, generator, x.dtype).reshape(B, n_alpha)
    eps = torch.randn((B, n_alpha, *x.shape[1:]), generator=generator, dtype=x.dtype)
    eps_z = None if common_noise else torch.randn(eps.shape, generator=generator, dtype=x.dtype)
    return alpha, eps, eps_z


def ratio_from_draws(D, x, zeta, alpha, eps, eps_z, dist) -> torch.Tensor:
    """The importance-sampled estimate 1/2 mean_k w(alpha_k) (mse_zeta - mse) from given draws, (B,)."""
    B, n_alpha = alpha.shape
    flat = (B * n_alpha, *x.shape[1:])
    mse, mse_z = mse_pair(D, x.repeat_interleave(n_alpha, 0), zeta.repeat_interleave(n_alpha), alpha.reshape(-1),
                          eps.reshape(flat), None if eps_z is None else eps_z.reshape(flat))
    return (0.5 * dist.weight(alpha.reshape(-1)) * (mse_z - mse)).reshape(B, n_alpha).mean(1)


def log_density(D, x: torch.Tensor, itd: ITDLoss, n_alpha: int = 128, quadrature: bool = True,
                seed: int = 0) -> torch.Tensor:
    """log p(x) by the ITD estimator (the negative of :meth:`ITDLoss.nll`), (B,) nats."""
    return -itd.nll(D, x, n_alpha=n_alpha, quadrature=quadrature, seed=seed)


class CDLLoss:
    """L = std_weight * L_ITD + cdl_weight * (sum of CDL terms) / B (the reference's combination).

    Args:
        std_weight, cdl_weight: weights of the standard (ITD) term and of the CDL terms (1, 1).
        n_cdl: examples per batch that get a CDL term (the reference: 2). Each is, with probability 1/2, noised to
            its own zeta (label -1), else kept clean (label +1).
        n_alpha: log-SNR draws per CDL estimate (the reference: the batch size).
        common_noise: share alpha and eps between the two density estimates (common random numbers).
        zeta_loc, zeta_scale, zeta_min, zeta_max: the zeta distribution, a logistic truncated to [min, max];
            None: the integration's (loc, scale, +-3 scale) for d <= 2 data, logistic(10.5, 1.5) on [6, 15]
            for images (d > 2), as the spec says.
        loc, scale, covariance: the ITD integration (see :class:`ITDLoss`), from data statistics by default.
    """

    default_precond = "eps-continuous"
    needs_data = True

    def __init__(self, std_weight: float = 1.0, cdl_weight: float = 1.0, n_cdl: int = 8, n_alpha: int = 32,
                 common_noise: bool = True, zeta_loc: float | None = None, zeta_scale: float | None = None,
                 zeta_min: float | None = None, zeta_max: float | None = None, loc: float | None = None,
                 scale: float | None = None, covariance: str = "auto"):
        require(std_weight >= 0 and cdl_weight >= 0, "CDL weights must be >= 0")
        require(isinstance(n_cdl, int) and n_cdl >= 0, f"n_cdl must be an integer >= 0, got {n_cdl!r}")
        require(isinstance(n_alpha, int) and n_alpha >= 1, f"n_alpha must be an integer >= 1, got {n_alpha!r}")
        require(zeta_scale is None or zeta_scale > 0, "zeta_scale must be > 0")
        self.std_weight, self.cdl_weight, self.n_cdl, self.n_alpha = std_weight, cdl_weight, n_cdl, n_alpha
        self.common_noise = common_noise
        self._zeta = (zeta_loc, zeta_scale, zeta_min, zeta_max)
        self.itd = ITDLoss(loc=loc, scale=scale, covariance=covariance)
        self.lam = None

    def fit(self, x: torch.Tensor) -> CDLLoss:
        self.itd.fit(x)
        self.lam = self.itd.lam
        d = x[0].numel()
        loc, scale, lo, hi = self._zeta
        if d <= 2:
            dl, ds, dlo, dhi = self.itd.loc, self.itd.scale, self.itd.loc - 3 * self.itd.scale, \
                self.itd.loc + 3 * self.itd.scale
        else:
            dl, ds, dlo, dhi = 10.5, 1.5, 6.0, 15.0
        self.zeta_loc = dl if loc is None else loc
        self.zeta_scale = ds if scale is None else scale
        self.zeta_min = dlo if lo is None else lo
        self.zeta_max = dhi if hi is None else hi
        require(self.zeta_min < self.zeta_max, "need zeta_min < zeta_max")
        self.zeta_dist = TruncatedLogistic(self.zeta_loc, self.zeta_scale, self.zeta_min, self.zeta_max)
        return self

    def sample_zeta(self, n: int, generator=None, dtype=torch.float64) -> torch.Tensor:
        """Truncated logistic(zeta_loc, zeta_scale) on [zeta_min, zeta_max] by inverse CDF."""
        return self.zeta_dist.sample(n, generator, dtype)

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The ITD term's draws and, for ``n_cdl`` random rows (the ``cdl_`` group), zeta, the clean/noised label,
        the channel noise and the estimator's alpha and eps draws."""
        require(self.lam is not None, "the CDL reference statistics are not set: call fit(x_train)")
        draws = self.itd.draw(x0, generator)
        k = min(self.n_cdl, x0.shape[0]) if self.cdl_weight else 0
        rows = torch.randperm(x0.shape[0], generator=generator)[:k]
        alpha, eps, eps_z = draw_ratio_noise(x0[rows], self.n_alpha, self.itd.alpha_dist, generator,
                                             self.common_noise)
        draws.update({"cdl_rows": rows, "cdl_zeta": self.sample_zeta(k, generator, x0.dtype),
                      "cdl_noised": torch.rand(k, generator=generator) < 0.5,
                      "cdl_eta": torch.randn((k, *x0.shape[1:]), generator=generator, dtype=x0.dtype),
                      "cdl_alpha": alpha, "cdl_eps": eps})
        if eps_z is not None:
            draws["cdl_eps_z"] = eps_z
        return draws

    def cdl_terms(self, D, x: torch.Tensor, draws: dict) -> torch.Tensor:
        """The binary cross-entropy softplus(-y logit) of the implied classifier for the CDL rows x (k, ...): each is
        noised to its zeta (label -1) or kept clean (label +1)."""
        noised = draws["cdl_noised"]
        x_noised = noise_to(x, draws["cdl_zeta"], draws["cdl_eta"])
        x_in = torch.where(noised.reshape(-1, *([1] * (x.ndim - 1))), x_noised, x)
        y = torch.where(noised, -1.0, 1.0).to(x.dtype)
        logit = ratio_from_draws(D, x_in, draws["cdl_zeta"], draws["cdl_alpha"], draws["cdl_eps"],
                                 draws.get("cdl_eps_z"), self.itd.alpha_dist)
        return F.softplus(-y * logit)

    def loss(self, D, x0: torch.Tensor, draws: dict, reference=None) -> torch.Tensor:
        loss = self.std_weight * self.itd.loss(D, x0, draws)
        rows = draws["cdl_rows"]
        if len(rows):
            extra = torch.zeros_like(loss)
            extra[rows] = self.cdl_terms(D, x0[rows], draws)
            loss = loss + self.cdl_weight * extra  # the batch mean gives cdl_weight * (sum of CDL terms) / B
        return loss

    def __call__(self, D, x0: torch.Tensor, generator: torch.Generator | None = None, reference=None) -> torch.Tensor:
        return self.loss(D, x0, self.draw(x0, generator))


def noise_classification(D, x: torch.Tensor, zetas, n_alpha: int = 64, seed: int = 0, loc: float | None = None,
                         scale: float | None = None) -> list[dict]:
    """Accuracy and cross-entropy of the implied classifier "clean vs noised to zeta" on held-out data x (N, ...),
    per zeta: half the evaluation is x itself (label +1), half is x noised to zeta (label -1)."""
    g = torch.Generator().manual_seed(seed)
    x = x.to(torch.float64)
    out = []
    for z in zetas:
        zt = torch.full((x.shape[0],), float(z), dtype=x.dtype)
        noisy = noise_to(x, zt, torch.randn(x.shape, generator=g, dtype=x.dtype))
        logits = torch.cat([log_density_ratio(D, x, zt, n_alpha, g, loc=loc, scale=scale),
                            log_density_ratio(D, noisy, zt, n_alpha, g, loc=loc, scale=scale)])
        y = torch.cat([torch.ones(len(x)), -torch.ones(len(x))]).to(x.dtype)
        out.append({"zeta": float(z), "accuracy": float(((logits > 0).to(x.dtype) * 2 - 1 == y).double().mean()),
                    "cross_entropy": float(F.softplus(-y * logits).mean() / math.log(2))})
    return out
