"""Build a denoiser (backbone + preconditioning) from a run configuration."""

from __future__ import annotations

from difflab.config import RunConfig
from difflab.denoisers import EDMPrecond, Precond, VEPrecond, VPPrecond
from difflab.errors import require
from difflab.nets import MLP
from difflab.objectives import OBJECTIVES
from difflab.schedules import DDPMSchedule, VPSchedule


def ddpm_schedule(cfg: RunConfig) -> DDPMSchedule:
    s = cfg.schedule
    return DDPMSchedule(s.T, s.kind, s.beta_start, s.beta_end)


def precond_name(cfg: RunConfig) -> str:
    """The configured preconditioning, or the objective's default (eps for dsm, edm for edm, ...)."""
    name, options = cfg.objective.name, cfg.objective.options
    if cfg.model.precond:
        return cfg.model.precond
    if name == "stf":  # STF keeps its base objective's network form
        name = options.get("base", "edm")
    if name == "sa" and options.get("grid") == "edm":  # continuous-time SA trains a sigma-space (EDM) network
        return "edm"
    return OBJECTIVES[name].default_precond


def build_denoiser(cfg: RunConfig, shape: tuple[int, ...]) -> Precond:
    """The network for data of per-example ``shape`` wrapped in its preconditioning."""
    m = cfg.model
    require(m.arch == "mlp", f"unknown architecture {m.arch!r}: use 'mlp'")
    require(len(shape) == 1, f"the MLP needs flat examples of shape (d,), got per-example shape {shape}: "
                               "reshape the data to (N, d)")
    net = MLP(shape[0], m.width, m.depth, m.emb_dim, m.input_freqs, m.input_scale)
    name = precond_name(cfg)
    if name == "eps":
        return VPPrecond(net, ddpm_schedule(cfg), discrete=True)
    if name == "eps-continuous":
        return VPPrecond(net, ddpm_schedule(cfg), discrete=False)
    if name == "vp":
        return VPPrecond(net, VPSchedule())
    if name == "ve":
        return VEPrecond(net)
    return EDMPrecond(net, m.sigma_data)
