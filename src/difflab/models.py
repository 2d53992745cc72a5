"""Build a denoiser (backbone + preconditioning) from a run configuration."""

from __future__ import annotations

from torch import nn

from difflab.config import RunConfig
from difflab.denoisers import EDMPrecond, FlowPrecond, Precond, VEPrecond, VPPrecond
from difflab.errors import require
from difflab.nets import MLP
from difflab.objectives import OBJECTIVES
from difflab.schedules import DDPMSchedule, VPSchedule

# preconditionings of a VP network on the DDPM schedule: eps (discrete t), eps-continuous, x0 and v (discrete t)
DDPM_PRECONDS = ("eps", "eps-continuous", "x0", "v")


def ddpm_schedule(cfg: RunConfig) -> DDPMSchedule:
    s = cfg.schedule
    return DDPMSchedule(s.T, s.kind, s.beta_start, s.beta_end)


def precond_name(cfg: RunConfig) -> str:
    """The configured preconditioning, or the objective's default for its options (eps for dsm, edm for edm, ...)."""
    if cfg.model.precond:
        return cfg.model.precond
    return OBJECTIVES[cfg.objective.name].precond_for(cfg.objective.options)


def num_classes(cfg: RunConfig) -> int:
    """Classes of a class-conditional network (difflab's U-Net num_classes, a UNet2DModel's num_class_embeds); 0
    for an unconditional one."""
    if cfg.model.arch == "diffusers":
        return int(cfg.model.diffusers.get("num_class_embeds") or 0)
    if cfg.model.arch == "unet":
        return int(cfg.model.unet.get("num_classes") or 0)
    return 0


def sigma_data(cfg: RunConfig, shape: tuple[int, ...]) -> float:
    """model.sigma_data, or its default for the data: 0.5 for images (C, H, W) in [-1, 1], 1.0 for flat data."""
    if cfg.model.sigma_data is not None:
        return cfg.model.sigma_data
    return 0.5 if len(shape) == 3 else 1.0


def arch_for(cfg: RunConfig, shape: tuple[int, ...]) -> str:
    """model.arch, with ``auto`` resolved by the data: the U-Net for images (C, H, W), the MLP otherwise."""
    if cfg.model.arch != "auto":
        return cfg.model.arch
    return "unet" if len(shape) == 3 else "mlp"


INPUT_FREQS, INPUT_FREQS_MAX_DIM = 64, 3  # the default sinusoidal input features, and for up to how many coordinates


def input_freqs_for(cfg: RunConfig, shape: tuple[int, ...]) -> int:
    """model.input_freqs, or its default for the data: 64 for at most 3 coordinates, 0 (raw coordinates) above."""
    if cfg.model.input_freqs is not None:
        return cfg.model.input_freqs
    return INPUT_FREQS if len(shape) == 1 and shape[0] <= INPUT_FREQS_MAX_DIM else 0


# train.batch_size and train.lr when the config leaves them None, by the network: (batch, lr)
TRAIN_DEFAULTS = {"mlp": (1024, 3e-3), "unet": (128, 1e-3), "diffusers": (128, 1e-3)}


def batch_size_for(cfg: RunConfig, shape: tuple[int, ...]) -> int:
    """train.batch_size, or its default for the network: 1,024 for the MLP, 128 for a U-Net."""
    t = cfg.train
    return t.batch_size if t.batch_size is not None else TRAIN_DEFAULTS[arch_for(cfg, shape)][0]


def lr_for(cfg: RunConfig, shape: tuple[int, ...]) -> float:
    """train.lr, or its default for the network: 3e-3 for the MLP, 1e-3 for a U-Net."""
    t = cfg.train
    return t.lr if t.lr is not None else TRAIN_DEFAULTS[arch_for(cfg, shape)][1]


def label_dropout_for(cfg: RunConfig, shape: tuple[int, ...]) -> float:
    """train.label_dropout, or its default: 0.1, and 0 for a diffusers UNet2DModel, whose class embedding has no
    "no class" label to drop a label to."""
    t = cfg.train
    return t.label_dropout if t.label_dropout is not None else 0.0 if arch_for(cfg, shape) == "diffusers" else 0.1


def resolve_defaults(cfg: RunConfig, shape: tuple[int, ...]) -> RunConfig:
    """cfg with its data-dependent defaults filled in for examples of ``shape`` (model.arch, model.input_freqs,
    train.batch_size, train.lr, train.label_dropout, train.threads, train.lr_ref_steps, train.phema_every), as a run
    saves them.
    Returns cfg, changed in place."""
    from difflab.threads import threads_for

    cfg.model.arch = arch_for(cfg, shape)
    cfg.train.threads = threads_for(cfg.train.threads, cfg.model.arch)
    cfg.model.input_freqs = input_freqs_for(cfg, shape)
    cfg.train.batch_size, cfg.train.lr = batch_size_for(cfg, shape), lr_for(cfg, shape)
    cfg.train.label_dropout = label_dropout_for(cfg, shape)
    if cfg.train.lr_schedule == "inv-sqrt":  # (saved, these two: --steps may extend the run)
        cfg.train.lr_ref_steps = lr_ref_steps_for(cfg)
    if cfg.train.phema:
        cfg.train.phema_every = phema_every_for(cfg)
    return cfg


def lr_ref_steps_for(cfg: RunConfig) -> int:
    """train.lr_ref_steps, or its default: a tenth of train.steps (at least 1)."""
    return cfg.train.lr_ref_steps or max(1, cfg.train.steps // 10)


def phema_every_for(cfg: RunConfig) -> int:
    """train.phema_every, or its default: train.steps // 32 (at least 1)."""
    return cfg.train.phema_every or max(1, cfg.train.steps // 32)


def build_network(cfg: RunConfig, shape: tuple[int, ...]) -> nn.Module:
    """The backbone ``F(x_in, c_noise)`` for examples of ``shape``: the MLP for (d,), the U-Net for (C, H, W)."""
    m = cfg.model
    arch = arch_for(cfg, shape)
    if arch == "unet":
        require(len(shape) == 3 and shape[1] == shape[2],
                f"the U-Net needs square images (C, H, W), got per-example shape {shape}: use model.arch = 'mlp' "
                "for flat data")
        from difflab.nets.unet import unet_from_preset

        return unet_from_preset(m.preset, shape[0], shape[1], **m.unet)
    if arch == "diffusers":
        require(len(shape) == 3, f"model.arch = 'diffusers' (a UNet2DModel) needs images (C, H, W), got per-example "
                                 f"shape {shape}")
        require(precond_name(cfg) in (*DDPM_PRECONDS, "flow"),
                f"a diffusers UNet2DModel is a discrete-time VP network or a flow-matching velocity network: "
                f"model.precond must be one of {', '.join(DDPM_PRECONDS)} or flow, not {precond_name(cfg)!r} "
                "(objectives that train it: those with a VP (eps) network, e.g. dsm, itd, cdl, sa, stf with base "
                "dsm, and fm)")
        from difflab.nets.diffusers_unet import DiffusersUNet, unet_config

        offset = 0 if precond_name(cfg) == "flow" else 1  # a flow network sees 1000 t, a DDPM one t - 1
        return DiffusersUNet.from_config(unet_config(m.diffusers, shape), offset=offset)
    require(arch == "mlp", f"unknown architecture {m.arch!r}: use 'auto', 'mlp', 'unet' or 'diffusers'")
    require(len(shape) == 1, f"the MLP needs flat examples of shape (d,), got per-example shape {shape}: "
                               "use model.arch = 'unet' for images, or reshape the data to (N, d)")
    return MLP(shape[0], m.width, m.depth, m.emb_dim, input_freqs_for(cfg, shape), m.input_scale)


def build_denoiser(cfg: RunConfig, shape: tuple[int, ...]) -> Precond:
    """The network for data of per-example ``shape`` wrapped in its preconditioning."""
    net = build_network(cfg, shape)
    name = precond_name(cfg)
    if name in DDPM_PRECONDS:  # a VP network on the run's DDPM schedule
        prediction = "eps" if name.startswith("eps") else name
        return VPPrecond(net, ddpm_schedule(cfg), discrete=name != "eps-continuous", prediction=prediction)
    if name == "vp":
        return VPPrecond(net, VPSchedule())
    if name == "ve":
        return VEPrecond(net)
    if name == "flow":
        return FlowPrecond(net)
    return EDMPrecond(net, sigma_data(cfg, shape))
