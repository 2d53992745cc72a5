"""Autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of itself").

A model is guided by a worse model of the same data, its *guide*: a smaller or shorter-trained one (an early
checkpoint of the same run, say). With weight w,

    D_w(x, sigma) = (1 + w) D_main(x, sigma) - w D_guide(x, sigma) = D_main + w (D_main - D_guide).

The two models make errors of the same kind, the guide more of them, so stepping away from the guide undoes part of
the main model's (it pulls samples out of the blurred regions between the modes, where an under-fit model puts
too much mass) without the loss of variety of classifier-free guidance.

Convention: w = 0 is the main model alone. EDM2's ``guidance`` is 1 + w (their guided denoiser is
``gnet(x).lerp(net(x), guidance)``, guidance 1 meaning none); difflab's W is theirs minus 1, as its classifier-free
guidance weight is diffusers' ``guidance_scale`` minus 1 (:class:`~difflab.conditioning.Guided`).

Both models get the same row-aligned condition (class labels included): autoguidance of a class-conditional model
is by a class-conditional guide of the same classes, given the same labels (EDM2's), not classifier-free guidance
on top. :func:`check_guide` refuses a guide that cannot be combined with the main model.
"""

from __future__ import annotations

import math
import warnings

import torch

from difflab.denoisers import flow_velocity, flow_x0
from difflab.errors import require

FLOW_SAMPLERS = ("flow-euler", "flow-heun")  # samplers that start at t = 1 (pure noise) of the flow path


class AutoGuided(torch.nn.Module):
    """``main`` guided by ``guide`` with weight ``w`` (>= 0): called like the main denoiser, ``D_w(x, sigma,
    **cond)``, and both models are called with the same condition. :meth:`flow_x0` and :meth:`velocity` guide the
    flow-path estimates the same way (each model's own where it has one), so every sampler, the flow samplers and
    Picard included, runs over it. At w = 0 the guide is not evaluated: the main model's numbers, bit for bit.
    Its device is the main network's (its first parameter's); the guide should live there too."""

    def __init__(self, main, guide, w: float):
        super().__init__()
        require(math.isfinite(w) and w >= 0, f"autoguidance weight must be >= 0 (0: no guidance), got {w}")
        self.main, self.guide, self.w = main, guide, float(w)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self._mix(lambda D: D(x, sigma, **cond))

    def flow_x0(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """The guided clean estimate on the flow path x_t = (1 - t) x0 + t n (t = 1 included for flow models)."""
        return self._mix(lambda D: flow_x0(D, x_t, t, **cond))

    def velocity(self, x_t: torch.Tensor, t, **cond) -> torch.Tensor:
        """The guided flow velocity (1 + w) v_main - w v_guide (the same guidance: x0 = x_t - t v is linear in v)."""
        return self._mix(lambda D: flow_velocity(D, x_t, t, **cond))

    def _mix(self, estimate) -> torch.Tensor:
        """main + w (main - guide) of ``estimate(denoiser)``."""
        d = estimate(self.main)
        if self.w == 0:
            return d
        return d + self.w * (d - estimate(self.guide))


def check_guide(main, guide, sampler: str | None = None) -> None:
    """Refuse a guide (a :class:`~difflab.runs.Run`) that cannot guide ``main`` (another): examples of another shape,
    other class labels (the guide is given the main model's), or, for a flow sampler (``sampler``: flow-euler,
    flow-heun, or their picard- forms), a guide that is not a flow-matching model (only one answers at t = 1, where
    those start). Any two sigma-space denoisers combine (eps, x0, v, vp, ve, edm, flow: each is a D(x, sigma)). A
    guide trained on other data is allowed with a warning (imported models name no data set)."""
    require(tuple(guide.shape) == tuple(main.shape),
            f"the guide's examples have shape {tuple(guide.shape)}, the main model's {tuple(main.shape)}: autoguidance "
            "needs a model of the same data")
    K, Kg = main.num_classes, guide.num_classes
    require(Kg or not K, f"the main model is class-conditional ({K} classes) but the guide is not: autoguidance "
                         f"gives the guide the same class labels, so guide with a class-conditional model of the same "
                         f"{K} classes (or use --guidance without a guide: classifier-free guidance)")
    require(K or not Kg, f"the guide is class-conditional ({Kg} classes) but the main model is not: there are no "
                         "class labels to give it")
    require(K == Kg, f"the guide has {Kg} classes, the main model {K}: autoguidance gives both the same labels")
    name = (sampler or "").removeprefix("picard-")
    require(name not in FLOW_SAMPLERS or guide.precond == "flow",
            f"{name} starts from pure noise (t = 1), where only a flow-matching model answers, but the guide's "
            f"parametrisation is {guide.precond}: guide with a flow-matching model, or sample with ddim, heun or "
            "dpmpp-2m")
    data, data_g = main.data.split("?")[0], guide.data.split("?")[0]
    if data and data_g and data != data_g:
        warnings.warn(f"the guide was trained on {guide.data!r}, the main model on {main.data!r}: autoguidance "
                      "expects a worse model of the same data", stacklevel=2)

