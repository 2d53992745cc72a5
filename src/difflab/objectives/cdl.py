"""CDL: the contrastive diffusion loss (Wu et al. 2024; spec/objectives.md section 4).

A denoiser implies the Bayes classifier "clean vs noised to log-SNR zeta": its logit is the density ratio
log p(x) - log p_zeta(x) that :mod:`difflab.objectives.density_ratio` estimates. CDL trains the denoiser with that
classifier's binary cross-entropy (on clean points and on points noised to zeta), added to the standard (ITD) term.

Beyond the reference code: the number of alpha draws and of CDL examples per batch are options, so a CDL step costs
a small multiple of a plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from difflab.conditioning import relabel
from difflab.errors import require
from difflab.objectives.base import Objective
from difflab.objectives.density_ratio import draw_ratio_noise, noise_to, ratio_from_draws
from difflab.objectives.itd import ITDLoss, TruncatedLogistic


class CDLLoss(Objective):
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

    precond = "eps-continuous"
    needs_data = True
    help = ("ITD + the contrastive diffusion loss: std_weight (1), cdl_weight (1), n_cdl (8: CDL examples per batch), "
            "n_alpha (32: log-SNR draws per density estimate), common_noise (true: both estimates share alpha and "
            "eps), zeta_loc, zeta_scale, zeta_min, zeta_max (the noise levels to classify; default: the "
            "integration's range for 2-D data, logistic(10.5, 1.5) on [6, 15] for images), loc, scale, covariance "
            "(as itd)")

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

    @property
    def fitted(self) -> bool:
        """Whether the ITD reference and the zeta distribution are set."""
        return self.lam is not None

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

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:
        loss = self.std_weight * self.itd.loss(D, x0, draws)
        rows = draws["cdl_rows"]
        if len(rows):
            extra = torch.zeros_like(loss)
            extra[rows] = self.cdl_terms(relabel(D, lambda y: y[rows]), x0[rows], draws)
            loss = loss + self.cdl_weight * extra  # the batch mean gives cdl_weight * (sum of CDL terms) / B
        return loss
