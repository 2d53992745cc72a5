"""Run configuration: dataclasses whose fields each declare their default, help, checks and flag once
(:func:`difflab.options.option`), read from TOML, overridden by ``section.key=value``, validated up front (types,
ranges, unknown keys with a did-you-mean) so that bad input fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import DifflabError, require, suggest
from difflab.options import check, check_type, option, options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _objective_names() -> tuple:
    from difflab.objectives import OBJECTIVES  # (late registrations count)

    return tuple(OBJECTIVES)


def _unet_presets() -> tuple:
    from difflab.nets.unet import UNET_PRESETS

    return tuple(UNET_PRESETS)


TRACKERS = ("tensorboard", "wandb")  # the names train.log takes (difflab.training.tracking)
DATA_HELP = ("data set: dino, moons, 8gaussians, checkerboard, circles, spirals, swissroll, gmm1d, a .npy/.npz/.csv "
             "file; images: digits, digits16, cifar10:PATH, cifar10-test:PATH, folder:PATH, images:FILE.npz, "
             "zip:EDM_DATASET.zip (options after '?': flip=1; folders and zips size=N, e.g. digits?flip=1)")


@dataclass
class DataConfig:
    name: str = option("dino", DATA_HELP, flag="--data", metavar="NAME|FILE|SPEC")
    n_train: int | None = option(None, "training points", gt=0, at_most=1 << 31,
                                 shown="all (toy sets: 100,000 drawn with seed 42; files: the whole file)")


@dataclass
class ModelConfig:
    arch: str = option("auto", "the network: auto is the U-Net for images (C, H, W) and the MLP for flat data; "
                       "mlp a time-conditioned residual MLP, unet difflab's DDPM++ U-Net, diffusers a diffusers "
                       "UNet2DModel (the diffusers extra; model.diffusers sets its config)",
                       choices=("auto", "mlp", "unet", "diffusers"), flag="--arch")
    width: int = option(128, "MLP hidden width", gt=0, at_most=1 << 16, flag=True)
    depth: int = option(3, "MLP residual blocks", gt=0, at_most=1024, flag=True)
    emb_dim: int = option(64, "sinusoidal noise-embedding size", gt=0, at_most=1 << 14)
    input_freqs: int | None = option(None, "MLP: sinusoidal features per input coordinate (0: raw coordinates)",
                                     ge=0, at_most=1024, saved_default=0,
                                     shown="64 for data of at most 3 coordinates (the CDL paper's 2-D MLP), 0 above; "
                                           "runs saved before this default read back with 0")
    input_scale: float = option(25.0, "MLP: the highest input frequency, radians per data unit")
    precond: str | None = option(None, "the network's parametrisation: eps (DDPM eps-net, integer t), "
                                 "eps-continuous, x0 and v (a VP network predicting the clean data or v, integer t: "
                                 "diffusers' sample and v_prediction), vp (EDM VP), ve, edm, flow (a flow-matching "
                                 "velocity network fed 1000 t)",
                                 choices=(None, "eps", "eps-continuous", "x0", "v", "vp", "ve", "edm", "flow"),
                                 flag=True, shown="the objective's", inherited=False)
    sigma_data: float | None = option(None, "EDM sigma_data", gt=0,
                                      shown="1.0 for standardised flat data, 0.5 for images in [-1, 1]")
    preset: str = option("small", "U-Net preset (cifar10: the papers' DDPM++, about 56M parameters)",
                         choices=_unet_presets, flag=True)
    unet: dict = option(help="U-Net keyword overrides, e.g. {dropout = 0.1, model_channels = 64}", factory=dict)
    diffusers: dict = option(help="arch = diffusers: UNet2DModel config keys over a small default, e.g. "
                                  "{block_out_channels = [32, 64]}", factory=dict)
    conditional: bool = option(False, "class-conditional on the data's labels (labelled images; the U-Net's "
                                      "num_classes is set from the data)", flag=True)


@dataclass
class ScheduleConfig:
    T: int = option(1000, "DDPM steps", ge=2, at_most=100_000)
    kind: str = option("linear", "the DDPM beta schedule: linear from beta_start to beta_end, cosine, or "
                       "scaled_linear (sqrt(beta) linear)", choices=("linear", "cosine", "scaled_linear"))
    beta_start: float = option(1e-4, "the first beta (linear, scaled_linear)", gt=0, lt=1)
    beta_end: float = option(0.02, "the last beta (linear, scaled_linear)", gt=0, lt=1)
    shift: float = option(1.0, "the default --shift of flow-euler and flow-heun (diffusers' FlowMatch scheduler "
                          "shift; exported with the run)", gt=0)


@dataclass
class ObjectiveConfig:
    name: str = option("dsm", "the training objective; 'difflab train --help' lists each with its options",
                       choices=_objective_names, flag="--objective")
    options: dict = option(help="the objective's keyword options, e.g. {antithetic = true} (dsm), "
                                "{n_cdl = 2, n_alpha = 16} (cdl), {base = \"edm\", reference_size = 4096} (stf), "
                                "{K = 2, lam = 1.0} (sa), {t_density = \"logit-normal\", ot = true} (fm)",
                           factory=dict)


@dataclass
class TrainConfig:
    steps: int = option(6000, "optimiser steps", gt=0, flag=True, runtime=True)
    batch_size: int | None = option(None, "examples per step (large batches are nearly free for the MLP on a CPU "
                                    "and cut the gradient noise; a U-Net's step costs about its batch)", gt=0,
                                    at_most=1 << 22, flag=True, shown="by the network: MLP 1024, U-Net 128")
    lr: float | None = option(None, "peak learning rate", gt=0, flag=True, shown="by the network: MLP 3e-3, U-Net 1e-3")
    lr_schedule: str = option("cosine", "after the warm-up: constant, cosine or linear decay to 0, or inv-sqrt (EDM2: "
                              "lr / sqrt(max(step / lr_ref_steps, 1)), for long runs)",
                              choices=("constant", "cosine", "linear", "inv-sqrt"), flag=True)
    lr_ref_steps: int | None = option(None, "inv-sqrt: the step from which the learning rate decays as 1 / sqrt(step) "
                                      "(EDM2's ref_batches, in steps)", gt=0, shown="a tenth of train.steps")
    warmup_steps: int = option(200, "linear learning-rate warm-up steps", ge=0)
    optimizer: str = option("adam", "the optimiser", choices=("adam", "adamw"))
    weight_decay: float = option(0.0, "weight decay", ge=0)
    grad_clip: float = option(1.0, "global gradient-norm clip (0: off)", ge=0)
    ema_decay: float = option(0.999, "EMA of the weights per step, warmed up as min(decay, (1 + step) / (10 + step))",
                              ge=0, lt=1, flag=True)
    ema_halflife_kimg: float | None = option(None, "EMA by half-life in thousands of images (EDM: 500); replaces "
                                             "ema_decay", gt=0)
    ema_rampup: float = option(0.05, "with a half-life: at most this fraction of the images seen so far (0: off)",
                               ge=0)
    phema: list[float] = option(help="post-hoc EMA (EDM2): the relative standard deviations of the power-function EMA "
                              "profiles tracked beside ema_decay, e.g. [0.05, 0.10]; their snapshots let "
                              "'difflab phema' rebuild an EMA of any length after training ([]: off)",
                         factory=list, gt=0, lt=0.28, metavar="STD[,STD]")
    phema_every: int | None = option(None, "post-hoc EMA: steps between snapshots of the tracked profiles", gt=0,
                                     shown="train.steps / 32")
    label_dropout: float | None = option(None, "class-conditional runs: each row's label dropped with this "
                                         "probability (the unconditional model of classifier-free guidance)",
                                         ge=0, le=1, flag=True, metavar="P",
                                         shown="0.1; 0 for a diffusers UNet2DModel (no 'no class' label)")
    grad_accum: int = option(1, "micro-batches per step (divides batch_size: the same step, less memory)", gt=0,
                             at_most=1 << 16, flag=True)
    precision: str = option("fp32", "autocast of the network's matrix products and convolutions (fp16 with dynamic "
                            "loss scaling, saved in checkpoints)", choices=("fp32", "bf16", "fp16"), flag=True)
    compile: bool = option(False, "torch.compile the backbone being trained (its first steps compile it; "
                           "checkpoints are unchanged)", flag=True)
    channels_last: bool = option(False, "the U-Net's convolutions in channels-last memory layout", flag=True)
    sample_every: int = option(0, "every N steps write a picture of sample_n EMA samples to samples/step-N.png "
                               "(0: off)", ge=0, flag=True)
    sample_n: int = option(64, "samples per picture (fixed seeds 0..n-1: pictures compare across steps)", gt=0,
                           at_most=4096)
    fid_every: int = option(0, "every N steps log the FID of fid_n EMA samples against fid_ref (0: off)", ge=0,
                            flag=True)
    fid_ref: str | None = option(None, "reference statistics (.npz of mu, sigma from 'difflab fid ref'); its "
                                 "features are used", flag=True, metavar="STATS.npz")
    fid_n: int = option(1000, "samples per periodic FID (fixed seeds 0..n-1)", gt=0, at_most=1 << 20)
    fid_inception: str | None = option(None, "Inception TorchScript file for the periodic FID",
                                       shown="$DIFFLAB_INCEPTION, else the fid extra's weights")
    seed: int = option(0, "run seed: initialisation, minibatches and noise", ge=0, at_most=(1 << 63) - 1, flag=True)
    log_every: int = option(100, "steps per log.jsonl record", gt=0)
    log: list[str] = option(help="trackers fed beside log.jsonl: tensorboard (RUN/tensorboard/), wandb (optional "
                                 "extras)", factory=list, choices=TRACKERS, flag=True, metavar="TRACKER[,TRACKER]",
                            runtime=True)
    ckpt_every: int = option(2000, "steps per checkpoint", gt=0)
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)", gt=0)
    on_nonfinite: str = option("stop", "what a NaN or inf loss does: stop naming the step, or skip the step",
                               choices=("stop", "skip"))
    threads: int = option(0, "torch CPU threads; 0: by the network, never by the load (1 for the MLP, the usable "
                          "cores for a U-Net; torchrun: this process's share), saved resolved", ge=0, at_most=4096,
                          flag=True, runtime=True)
    device: str = option("auto", "where the network trains (auto: this process's GPU if CUDA is available)",
                         pattern=(r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda, cuda:N"), flag=True, runtime=True)
    init: str | None = option(None, "fine-tune: start from this run's weights (its data, model and schedule apply "
                              "unless set), or an imported model (a diffusers folder, an exported folder, a state "
                              "dict with run.json)", flag=True, metavar="RUN")
    init_ema: bool = option(True, "fine-tune from the parent's EMA weights (false: its raw weights)")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """A saved run's config. Keys it lacks take the value runs had before the key existed (the option's
        ``saved_default``), not today's default, so an old run rebuilds the network it trained."""
        cfg = cls()
        for (sec, key), value in saved_defaults(cls).items():
            if isinstance(d.get(sec), dict) and key not in d[sec]:
                setattr(getattr(cfg, sec), key, value)
        apply(cfg, d)
        return cfg


def saved_defaults(cfg_cls=None) -> dict:
    """Defaults that changed: ``{(section, key): value}`` a saved config without the key was trained with."""
    return {(o.section, o.name): o.spec.saved_default for o in options(cfg_cls or RunConfig)
            if o.spec.has_saved_default}


def apply(cfg: RunConfig, d: dict) -> None:
    """Set values from a nested dict ``{section: {key: value}}`` onto cfg, validating names and types."""
    require(isinstance(d, dict), "a config must be a table of sections (data, model, schedule, objective, train)")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec, values in d.items():
        require(sec in sections, f"unknown config section {sec!r}{suggest(sec, sections)}: use {', '.join(sections)}")
        require(isinstance(values, dict), f"config section [{sec}] must be a table, got {values!r}")
        obj = getattr(cfg, sec)
        known = {o.name: o for o in options(type(cfg)) if o.section == sec}
        for key, value in values.items():
            if key not in known:
                raise DifflabError(
                    f"unknown config key {sec}.{key}{suggest(key, known)}: {sec} has {', '.join(known)}"
                )
            cfg.__dict__.setdefault("_given", set()).add((sec, key))  # (what a fine-tune does not inherit)
            if known[key].is_table:
                require(isinstance(value, dict), f"config {sec}.{key} must be a table")
                setattr(obj, key, {**getattr(obj, key), **value})
                continue
            setattr(obj, key, check_type(f"{sec}.{key}", value, known[key].hint))


INHERITED = ("data", "model", "schedule")  # the sections a fine-tune (train.init) takes from its parent run


def inherit(cfg: RunConfig, parent: dict) -> RunConfig:
    """A fine-tune's config: each data, model and schedule key that ``cfg`` leaves at its default (set by no file,
    override or ``from_dict``, and not changed in code) takes the value of the parent run's config ``parent``
    (a saved config dict); tables (model.unet) are merged, cfg's keys first. model.precond is not inherited.
    Returns cfg, changed in place."""
    cls = type(cfg)
    theirs, default, given = cls.from_dict(parent), cls(), cfg.__dict__.get("_given", set())
    for o in options(cls):
        if o.section not in INHERITED or not o.spec.inherited:
            continue
        sec, mine = getattr(cfg, o.section), getattr(getattr(cfg, o.section), o.name)
        value = getattr(getattr(theirs, o.section), o.name)
        if o.is_table:
            setattr(sec, o.name, {**value, **mine})
        elif (o.section, o.name) not in given and mine == getattr(getattr(default, o.section), o.name):
            setattr(sec, o.name, value)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """The checks each option declares (choices, ranges), then those across keys. Returns cfg."""
    for o in options(type(cfg)):
        check(o, getattr(getattr(cfg, o.section), o.name))
    from difflab.objectives import build_objective

    build_objective(cfg.objective.name, cfg.objective.options)  # unknown names and options fail here
    t = cfg.train
    require(not cfg.model.conditional or cfg.model.arch in ("auto", "unet"),
            f"config model.conditional needs difflab's U-Net (model.arch = 'unet' or 'auto' with image data), not "
            f"{cfg.model.arch!r}")
    require(t.batch_size is None or t.batch_size % t.grad_accum == 0,
            f"config train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})")
    require(cfg.model.arch not in ("mlp", "diffusers") or not cfg.model.unet,
            "config model.unet options apply to the U-Net only (model.arch = 'unet' or 'auto' with image data)")
    if cfg.model.unet:
        from difflab.nets.unet import UNET_OPTIONS

        for key in cfg.model.unet:
            require(key in UNET_OPTIONS, f"unknown config key model.unet.{key}{suggest(key, UNET_OPTIONS)}: the "
                                         f"U-Net's options are {', '.join(UNET_OPTIONS)}")
    require(cfg.model.arch == "diffusers" or not cfg.model.diffusers,
            "config model.diffusers options (UNet2DModel keys) apply to model.arch = 'diffusers' only")
    require(0 < cfg.schedule.beta_start < cfg.schedule.beta_end < 1,
            "config schedule needs 0 < beta_start < beta_end < 1")
    return cfg


def parse_override(text: str) -> dict:
    """``section.key=value`` (value in TOML syntax; bare words are strings) -> ``{section: {key: value}}``."""
    require("=" in text and "." in text.split("=", 1)[0],
            f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    path, raw = text.split("=", 1)
    sec, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    if "." in key:  # objective.options.name=value, model.unet.name=value
        sub, key2 = key.split(".", 1)
        return {sec: {sub: {key2: value}}}
    return {sec: {key: value}}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in v) + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise DifflabError(f"cannot write {v!r} as TOML")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_value(k)


def to_toml(cfg: RunConfig) -> str:
    """``cfg`` as a TOML file that :func:`load_config` reads back to the same config (keys left None, the
    default of every key that may be None, are left out)."""
    lines = []
    for sec, values in cfg.to_dict().items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Defaults, then a TOML file, then ``section.key=value`` overrides; validated. (A fine-tune's train.init
    parent fills in the rest when training starts: :func:`inherit`.)"""
    cfg = RunConfig()
    if path is not None:
        p = Path(path)
        require(p.is_file(), f"no such config file: {p} (give a TOML file, see 'difflab train --help')")
        try:
            d = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise DifflabError(f"config file {p} is not valid TOML: {e}") from None
        apply(cfg, d)
    for text in overrides:
        apply(cfg, parse_override(text))
    return validate(cfg)
