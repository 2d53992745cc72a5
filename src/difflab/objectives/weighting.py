"""Loss weightings shared by the sigma-weighted objectives (dsm, edm, vp, ve, fm, and stf on any of its bases).

Every one of those objectives is, in difflab's sigma-space terms (x = x0 + sigma n, D the denoiser), a weighted
regression ``lambda(sigma) |D(x, sigma) - x0|^2`` computed in the form its network trains: DDPM's eps-MSE is
lambda = SNR, a velocity network's |v - u|^2 is lambda = ((1 + sigma) / sigma)^2, EDM's is (sigma^2 + sd^2) /
(sigma sd)^2. The options here replace that lambda with another weight W(sigma) on |D - x0|^2, applied in the
objective's own form as the factor W / lambda on its loss, or add EDM2's learned uncertainty to whichever weight
is in force:

- ``weighting = "none"`` (the default): the objective's own lambda, its loss exactly as without these options.
- ``"min-snr"``: W = min(SNR, snr_gamma) (Hang et al. 2023; ``snr_gamma`` 5 by default), with diffusers' SNR =
  abar / (1 - abar) = 1 / sigma^2 (``compute_snr``; the flow path's (1 - t)^2 / t^2 is the same). In the eps form
  (dsm, vp: lambda = SNR) the factor is min(SNR, gamma) / SNR, diffusers' ``epsilon`` weight; a v-prediction
  network's |v_hat - v|^2 is (SNR + 1) |D - x0|^2, for which it is diffusers' ``v_prediction`` weight min(SNR,
  gamma) / (SNR + 1); a flow velocity's factor is min(SNR, gamma) / (1 + sqrt(SNR))^2; EDM's min(SNR, gamma) /
  lambda_EDM.
- ``"soft-min-snr"``: W = 1 / (sigma^2 + sd^2): k-diffusion's ``soft-min-snr`` weight (sigma sd)^2 / (sigma^2 +
  sd^2)^2 on its preconditioned target, whose error is |D - x0|^2 / c_out^2, c_out^2 = (sigma sd)^2 / (sigma^2 +
  sd^2); i.e. the harmonic soft minimum SNR_d / (SNR_d + 1) of SNR_d = (sd / sigma)^2 and 1, over sd^2. sd: the
  objective's ``sigma_data`` (edm: model.sigma_data), 1 for those without one (their SNR takes the data as unit
  variance, as diffusers' does), where it is the soft minimum of SNR = 1 / sigma^2 and 1.
- ``"v"``: W = SNR + 1 = 1 + 1 / sigma^2, the uniform MSE of a v-prediction network (Salimans and Ho 2022's
  "SNR + 1", diffusers' ``v_prediction`` without snr_gamma).

``learned_weighting = true`` is EDM2's uncertainty weighting (Karras et al. 2024, eqs. 14-21; ``EDM2Loss`` and the
``logvar`` head of ``networks_edm2.Precond``): a head u(sigma) trained with the network, and the per-example loss

    L = W(sigma) |D - x0|^2 / exp(u(sigma)) + d u(sigma),        d: the dimensions of one example

EDM2's per-element loss (w / e^u) (D - x0)^2 + u summed over the example's d elements, as difflab sums every
objective's loss over dimensions. At its optimum e^u = E[W |D - x0|^2] / d, the weighted per-element error at that
sigma, so every sigma contributes about equally. The head is EDM2's: Fourier features of c_noise = ln(sigma) / 4
(fixed random frequencies and phases, EDM2's MPFourier with 128 channels), then a linear layer to one scalar; it
differs in the layer, a plain linear layer with a bias, its weight and bias initialised to zero (u = 0 at the
start, so the first steps see the unlearned loss), where EDM2's is its magnitude-preserving, force-normalised one
without a bias, initialised at random. The trainer leaves the head out of gradient clipping (its gradient grows
with d). The logged loss includes the d u term and so can be negative.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.errors import DifflabError, require, suggest

WEIGHTINGS = ("none", "min-snr", "soft-min-snr", "v")
WEIGHTING_OPTIONS = ("weighting", "snr_gamma", "learned_weighting")  # what every sigma-weighted objective takes
DEFAULT_SNR_GAMMA = 5.0  # Hang et al.'s and diffusers' recommended gamma
LOGVAR_CHANNELS = 128  # EDM2's logvar_channels
WEIGHTING_HELP = ("weighting (none | min-snr | soft-min-snr | v), snr_gamma (5, for min-snr), learned_weighting "
                  "(false: EDM2's)")


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """diffusers' SNR = abar / (1 - abar) = 1 / sigma^2 (sigma-space)."""
    return 1 / sigma**2


def x0_weight(weighting: str, sigma: torch.Tensor, snr_gamma: float = DEFAULT_SNR_GAMMA,
              sigma_data: float = 1.0) -> torch.Tensor:
    """W(sigma) (B,), the weight of |D - x0|^2 under ``weighting`` (not "none": that is the objective's own)."""
    if weighting == "min-snr":
        return snr(sigma).clamp(max=snr_gamma)
    if weighting == "soft-min-snr":
        return 1 / (sigma**2 + sigma_data**2)
    if weighting == "v":
        return snr(sigma) + 1
    raise DifflabError(f"no x0 weight for weighting {weighting!r}")


class LogVarHead(nn.Module):
    """EDM2's uncertainty head u(sigma) (B,): sqrt(2) cos(2 pi (f c + p)) of c = ln(sigma) / 4 with fixed f ~ N(0, 1)
    and p ~ U(0, 1) per channel (buffers ``freqs`` = 2 pi f and ``phases`` = 2 pi p, drawn from a fixed seed), then a
    linear layer to one scalar, ``weight`` (1, channels) and ``bias`` (1,), zero-initialised (u = 0). Building it
    draws nothing from the global generator (a run's other draws stay as they were). Runs in float32 outside any
    autocast; returns sigma's dtype and device."""

    def __init__(self, channels: int = LOGVAR_CHANNELS, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.weight = nn.Parameter(torch.zeros(1, channels))
        self.bias = nn.Parameter(torch.zeros(1))

    def features(self, sigma: torch.Tensor) -> torch.Tensor:
        """The Fourier features (B, channels), float32, of c_noise = ln(sigma) / 4."""
        c = sigma.reshape(-1).to(device=self.freqs.device, dtype=torch.float32).log() / 4
        return math.sqrt(2) * torch.cos(c[:, None] * self.freqs[None] + self.phases[None])

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.freqs.device.type, enabled=False):
            u = nn.functional.linear(self.features(sigma), self.weight, self.bias).reshape(-1)
        return u.to(device=sigma.device, dtype=sigma.dtype)


class Reweighted:
    """The loss-weighting options of a sigma-weighted objective (a mixin: its constructor calls
    :meth:`init_weighting` with its ``weighting``, ``snr_gamma`` and ``learned_weighting`` keywords, and its
    ``regress`` passes its per-example loss through :meth:`reweight`)."""

    weighting = "none"
    snr_gamma: float | None = None
    logvar: LogVarHead | None = None
    weighting_options = WEIGHTING_OPTIONS

    def init_weighting(self, weighting: str = "none", snr_gamma: float | None = None,
                       learned_weighting: bool = False) -> None:
        if weighting not in WEIGHTINGS:
            raise DifflabError(f"unknown weighting {weighting!r}{suggest(str(weighting), WEIGHTINGS)}: use one of "
                               f"{', '.join(WEIGHTINGS)}")
        require(snr_gamma is None or weighting == "min-snr",
                f"snr_gamma applies to weighting = min-snr only (the weighting is {weighting!r})")
        require(snr_gamma is None or (isinstance(snr_gamma, (int, float)) and not isinstance(snr_gamma, bool)
                                      and 0 < snr_gamma < math.inf), f"snr_gamma must be > 0, got {snr_gamma!r}")
        require(isinstance(learned_weighting, bool), f"learned_weighting must be true or false, got "
                                                     f"{learned_weighting!r}")
        self.weighting = weighting
        self.snr_gamma = float(snr_gamma) if snr_gamma is not None else (
            DEFAULT_SNR_GAMMA if weighting == "min-snr" else None)
        self.logvar = LogVarHead() if learned_weighting else None

    @property
    def learned_weighting(self) -> bool:
        return self.logvar is not None

    def trainable(self) -> nn.Module | None:
        """The learned-weighting head, or None."""
        return self.logvar

    def x0_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """W(sigma) of the chosen weighting on |D - x0|^2 (see :func:`x0_weight`); the objective's sigma_data (1
        for an objective without one) for soft-min-snr."""
        return x0_weight(self.weighting, sigma, self.snr_gamma or DEFAULT_SNR_GAMMA,
                         getattr(self, "sigma_data", None) or 1.0)

    def reweight(self, loss: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor,
                 form: torch.Tensor | None = None) -> torch.Tensor:
        """The per-example loss (B,) under the options: ``loss`` is the objective's own, whose weight on |D - x0|^2
        is ``form`` (B,); with a weighting, times W / form (``form`` None: ``loss`` already carries its W); with the
        learned weighting, loss / e^u + d u. Unchanged with the defaults."""
        if self.weighting != "none" and form is not None:
            loss = loss * (self.x0_weight(sigma) / form)
        if self.logvar is None:
            return loss
        u = self.logvar(sigma).to(loss.dtype)
        return loss * torch.exp(-u) + math.prod(x.shape[1:]) * u
