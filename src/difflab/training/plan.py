"""What a run will train, checked once before anything is written: :func:`prepare_training` serves ``train()``
(through the Trainer) and ``difflab train --dry-run`` / ``--print-config`` alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.config import RunConfig, inherit, validate
from difflab.data import get_dataset
from difflab.errors import require
from difflab.memory import check_training_memory
from difflab.models import precond_name, resolve_defaults
from difflab.training import distributed
from difflab.training.tracking import check_trackers


@dataclass
class TrainingPlan:
    """A run's resolved config and what it was checked against.

    Fields: ``cfg`` (validated; a fine-tune's parent settings inherited, the defaults for the data and network
    filled in, as the run's config.json will hold them), ``dataset``, ``shape`` (one example's), ``device``,
    ``parent`` (a fine-tune's parent :class:`difflab.runs.Run`, read once, else None) and ``memory`` (the estimate,
    :func:`difflab.memory.check_training_memory`)."""

    cfg: RunConfig
    dataset: object
    shape: tuple[int, ...]
    device: torch.device
    parent: object | None
    memory: dict


def with_parent(cfg: RunConfig, parent=None) -> RunConfig:
    """A fine-tune (train.init) takes its parent run's data, model and schedule wherever ``cfg`` leaves them at
    their defaults (:func:`difflab.config.inherit`), so the same network is built; a diffusers network also keeps
    its parametrisation (model.precond), as does a flow-matching (velocity) network, whose fine-tune objective is fm
    unless one is named. Other configs pass through.
    ``parent``: the init run, if already loaded."""
    if not cfg.train.init:
        return cfg
    from difflab.runs import Run

    parent = (parent or Run.load(cfg.train.init)).config
    if ("objective", "name") not in cfg.__dict__.get("_given", set()) and precond_name(parent) == "flow":
        cfg.objective.name = "fm"  # a flow-matching model fine-tunes with flow matching unless told otherwise
    cfg = inherit(cfg, parent.to_dict())
    if cfg.model.precond is None and (cfg.model.arch == "diffusers" or precond_name(parent) == "flow"):
        # what a diffusers network predicts is part of it (its scheduler's prediction_type), and a velocity network
        # stays one: every objective keeps their parametrisation
        cfg.model.precond = precond_name(parent)
    require(bool(cfg.data.name), f"--init {cfg.train.init} is a model imported without a data set: name the data "
                                 "to fine-tune it on with --data (e.g. --data digits)")
    return cfg


def prepare_training(cfg: RunConfig, resumed: bool = False, world: int | None = None,
                     memory: bool = True) -> TrainingPlan:
    """Check ``cfg`` once and resolve it (in place): a fine-tune's parent read and inherited (not for a
    ``resumed`` run, whose saved config is complete), the data set opened, the defaults for the data and network
    filled in, every option validated, the trackers' extras found, a diffusers network's whole config written
    out, and the memory estimated against the device (``world`` processes; None: torchrun's WORLD_SIZE;
    ``memory`` False: not estimated, for a config that is only printed). Bad input fails here, in one line."""
    parent = None
    if cfg.train.init and not resumed:
        from difflab.runs import Run

        parent = Run.load(cfg.train.init, ema=cfg.train.init_ema)
        cfg = with_parent(cfg, parent)
    dataset = get_dataset(cfg.data.name)
    shape = tuple(dataset.shape)
    validate(resolve_defaults(cfg, shape))  # the saved config names the network, its batch size and lr
    check_trackers(cfg.train.log)  # a missing extra fails here too
    if cfg.model.arch == "diffusers":  # the whole UNet2DModel config, so that the saved run rebuilds it
        from difflab.nets.diffusers_unet import unet_config

        cfg.model.diffusers = unet_config(cfg.model.diffusers, shape)
    device = distributed.resolve_device(cfg.train.device)
    # a network too large for the device's memory is refused before it exists (the estimate builds it on meta)
    estimate = check_training_memory(cfg, shape, device, world) if memory else {}
    return TrainingPlan(cfg, dataset, shape, device, parent, estimate)
