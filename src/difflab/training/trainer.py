"""The training loop: optimiser, LR schedule, gradient clipping, EMA, JSONL log, checkpoints and exact resume.

A run folder holds ``config.json`` (the resolved configuration), ``log.jsonl`` (one record per ``log_every``
steps) and ``checkpoints/``. Resuming restores the weights, the EMA, the optimiser moments and every random
generator, so N steps in one go and N/2 + resume + N/2 give bit-identical weights on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab import __version__
from difflab.conditioning import LABELS, NULL, bind, cond_rows
from difflab.config import RunConfig
from difflab.denoisers import Precond
from difflab.devices import to_device
from difflab.errors import DifflabError, Interrupted, require, short
from difflab.models import build_denoiser, ddpm_schedule, lr_ref_steps_for, num_classes, sigma_data
from difflab.objectives import build_objective
from difflab.objectives.draws import slice_draws
from difflab.seeds import generator
from difflab.threads import set_threads
from difflab.training import distributed
from difflab.training.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    pack_optimizer,
    prefixed,
    save_checkpoint,
    unpack_optimizer,
    unprefixed,
    write_json_atomic,
)
from difflab.training.phema import PowerEMA, prune_snapshots, snapshot_due
from difflab.training.plan import TrainingPlan, prepare_training
from difflab.training.tracking import check_trackers, open_trackers

RUN_FILES = ("config.json", "log.jsonl", "checkpoints", "phema")  # phema: post-hoc EMA snapshots (training.phema)
RUN_OUTPUTS = ("samples", "samples.npz")  # previews and 'difflab sample' output: a run's, but kept by --overwrite
TRACKER_FILES = ("tensorboard", "wandb", "wandb_id.txt")  # what train.log's trackers write into the run folder


def lr_at(cfg: RunConfig, step: int) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant, cosine or linear decay to 0, or EDM2's
    inverse square root, lr / sqrt(max(step / lr_ref_steps, 1))."""
    t = cfg.train
    warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else 1.0
    if t.lr_schedule == "constant":
        return t.lr * warm
    if t.lr_schedule == "inv-sqrt":
        return t.lr * warm / math.sqrt(max(step / lr_ref_steps_for(cfg), 1.0))  # (saved resolved by the run)
    frac = min(1.0, max(0.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)))
    decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.lr_schedule == "cosine" else 1.0 - frac
    return t.lr * warm * decay


def ema_decay_at(cfg: RunConfig, step: int) -> float:
    """The EMA decay after (0-based) ``step``: ``ema_decay`` warmed up as min(decay, (1 + step) / (10 + step)), or
    with ``ema_halflife_kimg`` the decay whose half-life is that many thousand images, capped by ``ema_rampup``
    times the images seen so far (EDM's rule)."""
    t = cfg.train
    if t.ema_halflife_kimg is None:
        return min(t.ema_decay, (1 + step) / (10 + step))
    half = t.ema_halflife_kimg * 1000
    if t.ema_rampup > 0:
        half = min(half, (step + 1) * t.batch_size * t.ema_rampup)
    return 0.5 ** (t.batch_size / max(half, 1e-8))


def _chunks(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into at most ``parts`` contiguous, non-empty, nearly equal ranges."""
    parts = max(1, min(parts, hi - lo))
    edges = [lo + (hi - lo) * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter at once."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


@dataclass
class TrainResult:
    """What :func:`train` reports. ``loss``: the mean loss of the last log interval, over its ``loss_steps``
    finite steps (the last record of log.jsonl); nan if this call trained no step."""

    run_dir: str
    step: int
    loss: float
    loss_steps: int
    wall_time_s: float
    steps_per_s: float
    skipped_steps: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to mix runs: an existing run needs ``resume`` or ``overwrite``. Returns whether a run is there.

    A run is a folder with a checkpoint. One that stopped before its first checkpoint (a NaN at step 1, a kill)
    left only its config and log: it is no run, and the next ``train`` with that ``--out`` starts afresh there
    (:func:`prepare_run_dir` clears it)."""
    run_dir = Path(run_dir)
    require(not (resume and overwrite), "choose one of --resume and --overwrite")
    if run_dir.exists() and not run_dir.is_dir():
        raise DifflabError(f"run folder {run_dir} is a file: choose another --out")
    has_run = bool(list_checkpoints(run_dir))
    if resume:
        require(has_run, f"nothing to resume in {run_dir}: it holds no checkpoint"
                + (" (a run that stopped before its first one: the same command without --resume starts it afresh)"
                   if stopped_early(run_dir) else ""))
    elif has_run and not overwrite:
        raise DifflabError(f"{run_dir} already holds a run: pass --resume to continue it or --overwrite to replace it")
    elif not has_run and run_dir.is_dir():  # a run goes into a new or empty folder, never among unrelated files
        from difflab.paths import PROBE_PREFIX  # (another process's write check may be there for a moment)

        other = sorted(p.name for p in run_dir.iterdir() if p.name not in (*RUN_OUTPUTS, *RUN_FILES, *TRACKER_FILES)
                       and not p.name.startswith(PROBE_PREFIX)
                       and not (p.name.startswith(".") and p.name.endswith(".tmp")))  # left by a killed process
        if other:
            shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
            again = " (--overwrite replaces runs only)" if overwrite else ""
            raise DifflabError(f"{run_dir} is not empty ({shown}) and holds no run{again}: choose a new or empty "
                               "folder for --out")
    return has_run


def stopped_early(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds what a run leaves before its first checkpoint (config, log, tracker files) and no
    checkpoint."""
    run_dir = Path(run_dir)
    return (not list_checkpoints(run_dir) and run_dir.is_dir()
            and any((run_dir / f).exists() for f in (*RUN_FILES, *TRACKER_FILES)))


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """:func:`check_run_dir`, then make the folder (``overwrite``, or a run that stopped before its first
    checkpoint, removes only the run's own files)."""
    run_dir = Path(run_dir)
    for stale in [*run_dir.glob("checkpoints/.tmp-*"), *run_dir.glob(".*.tmp")]:  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    early = stopped_early(run_dir)
    if (check_run_dir(run_dir, resume, overwrite) or early) and not resume:
        if early:
            print(f"note: {run_dir} held a run that stopped before its first checkpoint; starting afresh there",
                  file=sys.stderr)
        for f in (*RUN_FILES, *TRACKER_FILES):
            p = run_dir / f
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


class Trainer:
    """Owns the model, its EMA, the optimiser and the generators of one run. ``run()`` trains to ``train.steps``."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, initialise: bool = True,
                 plan: TrainingPlan | None = None):
        # checked once (a fine-tune's parent read once, for its settings and its weights; a resumed config is
        # complete already): the plan, unless the caller made it
        plan = plan or prepare_training(cfg, resumed=not initialise)
        self.cfg = cfg = plan.cfg
        self.run_dir = Path(run_dir)
        t = cfg.train
        self.device = plan.device
        self.rank, self.world = distributed.init_from_env(self.device)
        self.dataset = plan.dataset
        # Random flips (an image set's flip option) are drawn afresh for every minibatch row and reference
        # below, so the training set itself is kept unflipped.
        self.flip = bool(getattr(self.dataset, "flip", False))
        if self.flip:
            self.dataset.flip = False
        self.x_train = self.dataset.train_data(cfg.data.n_train).to(torch.float32)
        self.shape = tuple(self.x_train.shape[1:])
        self.threads = set_threads(t.threads, cfg.model.arch)  # (resolved: a fixed count by network, saved)
        require(t.batch_size >= self.world,
                f"train.batch_size ({t.batch_size}) must be at least the number of processes ({self.world})")
        torch.manual_seed(t.seed)
        # The network and the objectives' arithmetic live on self.device. The data and every random draw stay on
        # the CPU (its generators) and are copied there once per step, so every device sees the same numbers.
        self.y_train = self._labels(cfg)  # (N,) int64 class labels of a class-conditional run, else None
        self.model: Precond = build_denoiser(cfg, self.shape).to(self.device)
        if t.channels_last:  # the U-Net's 4-D weights (and so its activations) in channels-last layout
            self.model.net.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()  # the EMA is only ever evaluated
        self.phema = PowerEMA(self.model, t.phema) if t.phema else None  # post-hoc EMA profiles (training.phema)
        if t.compile:  # in place: the state dict keeps its names (checkpoints do not change); the EMA stays eager
            self.model.net.compile()
        self.objective = build_objective(cfg.objective.name, cfg.objective.options, ddpm_schedule(cfg),
                                         sigma_data(cfg, self.shape), data=self.x_train)
        # An objective's own trainable state (EDM2's learned weighting head; most have none) lives beside the
        # network and is trained by its optimiser: the trained parameters are the network's, then the objective's.
        self.objective.to(self.device)
        self.params = [*self.model.parameters(), *self.objective.parameters()]
        opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        try:  # fused: one kernel for all parameters (about 1.5 ms a step less for the MLP here)
            self.opt = opt_cls(self.params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        except RuntimeError:  # torch < 2.4 has no fused CPU Adam
            self.opt = opt_cls(self.params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
        # fp16 autocast needs loss scaling (bf16 has float32's range and does not); disabled it passes through
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.data_gen, self.obj_gen = generator(t.seed, 0), generator(t.seed, 1)
        self.step = 0
        self.skipped = 0
        self.fid = None
        if t.fid_every and self.rank == 0:  # checked now, so that a wrong path fails before any training
            from difflab.training.fid_monitor import FIDMonitor

            self.fid = FIDMonitor(t.fid_ref, t.fid_n, t.fid_inception, shape=self.shape, device=self.device)
        if plan.parent is not None:  # (a resumed run restores its own weights instead)
            self.initialise_from(t.init, t.init_ema, plan.parent)

    def _labels(self, cfg: RunConfig) -> torch.Tensor | None:
        """The training set's labels for a class-conditional network (model.conditional sets the U-Net's
        num_classes from the data), aligned with ``x_train``; None for an unconditional one."""
        if cfg.model.conditional and not num_classes(cfg):
            require(cfg.model.arch == "unet", "config model.conditional needs difflab's U-Net (image data)")
            cfg.model.unet["num_classes"] = int(getattr(self.dataset, "num_classes", 0))
        K = num_classes(cfg)
        if K == 0:
            return None
        labels = getattr(self.dataset, "labels", None)
        require(labels is not None, f"data set {cfg.data.name!r} has no class labels, but the network is "
                                    f"class-conditional ({K} classes): train on labelled images (e.g. --data digits, "
                                    "a folder with one subfolder per class) or drop --conditional")
        if cfg.data.n_train is not None:  # the rows train_data drew
            labels = self.dataset.sample_with_labels(cfg.data.n_train, 42)[1]
        require(int(labels.max()) < K, f"data set {cfg.data.name!r} has labels up to {int(labels.max())}, but the "
                                       f"network has {K} classes")
        require(cfg.model.arch != "diffusers" or cfg.train.label_dropout == 0,
                "a diffusers UNet2DModel's class embedding has no unconditional label to drop labels to: train it "
                "with --label-dropout 0")
        return labels

    def initialise_from(self, run: str | Path, ema: bool = True, parent=None) -> None:
        """Fine-tuning: copy another run's network weights (its EMA by default) into the model and its EMA; the
        run may be a model trained elsewhere (anything :meth:`Run.load` reads; ``parent``: it, already loaded)."""
        from difflab.runs import Run

        parent = parent or Run.load(run, ema=ema)
        require(parent.shape == self.shape,
                f"--init run {run} was trained on examples of shape {parent.shape}, this data has {self.shape}")
        weights = parent.denoiser.state_dict()
        load_weights(self.model, weights, run)
        load_weights(self.ema, weights, run)

    # ------------------------------------------------------------------------------------------ state

    def state_tensors(self, opt_tensors: dict | None = None) -> dict[str, torch.Tensor]:
        opt_tensors = pack_optimizer(self.opt)[0] if opt_tensors is None else opt_tensors
        return {
            **prefixed("model.", self.model.state_dict()),
            **prefixed("ema.", self.ema.state_dict()),
            **(self.phema.state_tensors(self.model) if self.phema else {}),  # phema.<i>.<name>
            **prefixed("objective.", self.objective.state_dict()),  # (none for most objectives)
            **opt_tensors,
            "rng.data": self.data_gen.get_state(),
            "rng.objective": self.obj_gen.get_state(),
            "rng.torch": torch.get_rng_state(),
            **({"rng.cuda": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}),
        }

    def save(self) -> Path:
        """Write a checkpoint (the first process writes; the others wait for it)."""
        path = checkpoint_dir(self.run_dir, self.step)
        if self.rank == 0:
            self._write_checkpoint()
        distributed.barrier()
        return path

    def _write_checkpoint(self) -> Path:
        opt_tensors, opt_meta = pack_optimizer(self.opt)
        state = {
            "config": self.cfg.to_dict(),
            "shape": list(self.shape),
            "optimizer": opt_meta,
            "skipped_steps": self.skipped,
            "grad_scaler": self.scaler.state_dict(),
            "difflab_version": __version__,
            "threads": self.threads,  # torch CPU threads since the run (re)started
        }
        return save_checkpoint(self.run_dir, self.step, self.state_tensors(opt_tensors), state,
                               self.cfg.train.keep_checkpoints)

    def restore(self, path: Path | None = None) -> None:
        tensors, state = load_checkpoint(path or self.run_dir)
        load_weights(self.model, unprefixed("model.", tensors), path or self.run_dir)
        load_weights(self.ema, unprefixed("ema.", tensors), path or self.run_dir)
        if self.phema:
            self.phema.load_state_tensors(tensors, path or self.run_dir)
        self.objective.load_state_dict(unprefixed("objective.", tensors), f"checkpoint {path or self.run_dir}")
        missing = [k for k in ("rng.data", "rng.objective", "rng.torch") if k not in tensors]
        require("optimizer" in state and not missing,
                f"checkpoint {path or self.run_dir} cannot be resumed: it has no "
                f"{'optimizer state' if 'optimizer' not in state else ', '.join(missing)} (it holds weights only: "
                "start a new run from it with --init)")
        try:
            unpack_optimizer(self.opt, tensors, state["optimizer"])
            self.data_gen.set_state(tensors["rng.data"])
            self.obj_gen.set_state(tensors["rng.objective"])
            torch.set_rng_state(tensors["rng.torch"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            detail = short(e, 120)
            raise DifflabError(f"checkpoint {path or self.run_dir} holds an optimiser or generator state this run "
                               f"cannot use ({type(e).__name__}: {detail}): resume with the config it was trained "
                               "with") from None
        if self.device.type == "cuda" and "rng.cuda" in tensors:  # dropout on the GPU draws from its generator
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped_steps", 0))
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])

    # ------------------------------------------------------------------------------------------ loop

    def train_step(self) -> tuple[float, torch.Tensor | float]:
        """One optimiser step; returns (loss, grad norm: a 0-dim tensor on the device, read only when logged).
        Non-finite losses stop or skip per the config."""
        lr = lr_at(self.cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        x0, cond, refs = self._minibatch()
        draws = self.objective.draw(x0, self.obj_gen)
        losses = self._accumulate(x0, cond, draws, refs)
        total = 0.0
        for loss in losses:  # the step's one wait for the device: its loss, read after all its work is queued
            total += loss.item()
        result = self._update(distributed.all_reduce_sum(total))
        if self.phema:  # after every step, a skipped one too (the time axis is steps; the weights stayed put)
            self.phema.update(self.model, self.step)
        return result

    def _minibatch(self) -> tuple[torch.Tensor, dict, dict]:
        """The step's global minibatch x0 (B, *shape) on the CPU; its row-aligned condition on the device
        (``{"class_labels": y0}`` (B,) for a class-conditional run, each label dropped to NULL (-1) with probability
        train.label_dropout; {} otherwise); and the objective's reference keywords on the device (none, or STF's
        ``reference`` (n, *shape), whose head is x0, and ``reference_labels`` (n,))."""
        t = self.cfg.train
        # Every process draws the same global minibatch and objective randomness, then computes its own rows.
        # STF: a reference batch whose head is the minibatch; reference_size is per process (as in the reference
        # code) and the processes' references are pooled, which costs nothing here: all draw the same indices.
        n_ref = self.objective.reference_size * self.world
        idx = torch.randint(0, len(self.x_train), (max(t.batch_size, n_ref),), generator=self.data_gen)
        batch = self.x_train[idx]
        if self.flip:  # each row (minibatch and references alike) mirrored left-right with probability 1/2
            mirror = torch.rand(len(idx), generator=self.data_gen) < 0.5
            batch = torch.where(mirror.reshape(-1, *[1] * (batch.dim() - 1)), batch.flip(-1), batch)
        refs = {"reference": batch.to(self.device)} if n_ref else {}  # only objectives with a reference_size
        cond = {}
        if self.y_train is not None:  # class labels, each dropped (-1: unconditional) w.p. train.label_dropout
            y_ref = self.y_train[idx]
            y0 = y_ref[: t.batch_size]
            if t.label_dropout > 0:
                y0 = torch.where(torch.rand(len(y0), generator=self.data_gen) < t.label_dropout, NULL, y0)
            cond[LABELS] = y0.to(self.device)
            if n_ref:  # (STF: the references' own labels weigh them per class)
                refs["reference_labels"] = y_ref.to(self.device)
        return batch[: t.batch_size], cond, refs

    def _accumulate(self, x0: torch.Tensor, cond: dict, draws: dict, refs: dict) -> list[torch.Tensor]:
        """Backward passes over this process's rows of the minibatch x0 (B, *shape), with their rows of ``cond``
        bound to the model and of the ``draws`` (on the CPU, sliced here); returns each micro-batch's share of the
        global batch mean loss (0-dim, on the device). Gradient accumulation: the rows are cut into train.grad_accum
        micro-batches after every draw, so the step is the same as one pass over the whole batch (up to the order
        of float sums); gradients accumulate in .grad."""
        t, dev = self.cfg.train, self.device
        lo, hi = distributed.rows_of(self.rank, self.world, t.batch_size)
        x0 = x0.to(dev)
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for a, b in _chunks(lo, hi, t.grad_accum):
            with self._autocast():
                D = bind(self.model, cond_rows(cond, slice(a, b)))
                local = self.objective.loss(D, x0[a:b], to_device(slice_draws(draws, a, b), dev), **refs)
            loss = local.float().sum() / t.batch_size  # this micro-batch's share of the global batch mean
            losses.append(loss.detach())
            self.scaler.scale(loss * self.world).backward()  # the all-reduce in _update averages the processes'
            # gradients; fp16 scales the loss so that small gradients survive (a no-op otherwise). A non-finite
            # loss leaves non-finite gradients, which _update never lets the optimiser see.
        return losses

    def _update(self, value: float) -> tuple[float, torch.Tensor | float]:
        """The optimiser and EMA step after a step whose loss (summed over processes) is ``value``; a non-finite one
        stops training (train.on_nonfinite = stop) or is skipped. Returns (value, grad norm or nan)."""
        t = self.cfg.train
        if not math.isfinite(value):
            if t.on_nonfinite == "stop":
                last = list_checkpoints(self.run_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else \
                    "no checkpoint was written, so the same command starts afresh in this folder"
                raise DifflabError(f"loss is {value} at step {self.step}; {kept}. Lower train.lr, or set "
                                   "train.on_nonfinite=skip to skip such steps")
            self.skipped += 1
            self.step += 1
            return value, float("nan")
        distributed.all_reduce_mean_([p.grad for p in self.params if p.grad is not None])  # (the objective's too)
        self.scaler.unscale_(self.opt)  # fp16: true gradients before clipping; every process sees the same ones
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.opt)  # fp16: skips the step when a gradient overflowed, and lowers the scale
        self.scaler.update()
        ema_update(self.ema, self.model, ema_decay_at(self.cfg, self.step))
        self.step += 1
        return value, grad_norm

    def live_run(self):
        """The EMA network now, as a :class:`~difflab.runs.Run` (what the previews and the periodic FID sample)."""
        from difflab.runs import Run

        return Run.of(self.ema, self.cfg, self.shape, self.step, self.run_dir)

    def write_preview(self) -> Path | None:
        """A picture of ``train.sample_n`` EMA samples (fixed seeds) in samples/step-N.png (see ``previews``)."""
        from difflab.training.previews import write_preview

        path = self.run_dir / "samples" / f"step-{self.step:08d}.png"
        try:
            return write_preview(self.live_run(), self.cfg.train.sample_n, path, data=self.x_train)
        except DifflabError as e:  # e.g. non-finite samples early in training: a preview never stops the run
            print(f"warning: no preview at step {self.step}: {e}", file=sys.stderr)
            return None

    def _autocast(self):
        """bf16 or fp16 autocast of the network's matrix products and convolutions (train.precision), else a no-op."""
        if self.cfg.train.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def run(self, until: int | None = None, progress: bool = True) -> TrainResult:
        """Train from the current step to ``until`` (default: train.steps), logging and checkpointing.

        ``progress``: a tqdm bar on a terminal, plain lines otherwise (see :mod:`difflab.progress`)."""
        from difflab.progress import progress as progress_bar

        t = self.cfg.train
        end = t.steps if until is None else min(until, t.steps)
        main = self.rank == 0  # only the first process writes the config, the log and the checkpoints
        check_trackers(t.log)  # (every process: all fail alike, before anything is written)
        if main:
            write_json_atomic(self.run_dir / "config.json", self.cfg.to_dict())
            _truncate_log(self.run_dir / "log.jsonl", self.step)
            prune_snapshots(self.run_dir, self.step)  # post-hoc EMA snapshots past the checkpoint resumed from
        log = open(self.run_dir / "log.jsonl", "a") if main else None
        trackers = open_trackers(t.log if main else (), self.run_dir, self.cfg, self.step)  # fed what log gets
        bar = progress_bar(end, "train", unit="step", enabled=progress and main, initial=self.step)
        start_step, interval = self.step, _Interval(self.step)
        stop = _StopRequest()
        try:
            while self.step < end:
                if stop.signal is not None:  # SIGTERM / SIGINT: finish the step, checkpoint, and leave cleanly
                    self.save()
                    raise TrainingInterrupted(stop.signal, self.step, self.run_dir)
                step_loss, grad_norm = self.train_step()
                interval.add(step_loss)
                if self.step % t.log_every == 0 or self.step == end:
                    interval.close()
                    if main:
                        rec = interval.record(self.step, lr_at(self.cfg, self.step - 1), grad_norm)
                        _write_record(log, trackers, rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}")
                bar.update(1)  # after the loss is set: a progress line shows this step's loss
                self._periodic(end, main, log, trackers, bar)
            if self.step > start_step or not list_checkpoints(self.run_dir):
                self.save()
        finally:
            stop.restore()
            bar.close()
            if log is not None:
                log.close()
            trackers.close()
        wall = time.perf_counter() - interval.t_start
        return TrainResult(str(self.run_dir), self.step, interval.loss, interval.loss_steps, wall,
                           (self.step - start_step) / max(wall, 1e-9), self.skipped)

    def _periodic(self, end: int, main: bool, log, trackers, bar) -> None:
        """What falls due after a step: a checkpoint (train.ckpt_every, not at the end: run saves it), a preview
        (train.sample_every, the first process) and the periodic FID (train.fid_every), logged and shown."""
        t = self.cfg.train
        if self.phema and snapshot_due(self.cfg, self.step) and main:  # (before a checkpoint at the same step)
            self.phema.write_snapshots(self.run_dir, self.step, self.model, self.cfg.to_dict(), self.shape)
        if self.step % t.ckpt_every == 0 and self.step < end:
            self.save()
        if t.sample_every and self.step % t.sample_every == 0 and main:
            preview = self.write_preview()
            if preview is not None:
                trackers.image(self.step, "preview", preview)
        if self.fid is not None and self.step % t.fid_every == 0:
            rec = {"step": self.step, **self.fid(self.live_run())}
            _write_record(log, trackers, rec)
            bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in rec.items() if k != "step"))


class _Interval:
    """The loss of the current log interval: the sum and count of its finite steps' losses, and when (step, time)
    it began; ``loss`` and ``loss_steps``: the mean and count at the last record (nan and 0 before one)."""

    def __init__(self, step: int):
        self.t_start = time.perf_counter()
        self.t, self.step, self.acc, self.n = self.t_start, step, 0.0, 0
        self.loss, self.loss_steps = float("nan"), 0

    def add(self, loss: float) -> None:
        if math.isfinite(loss):
            self.acc, self.n = self.acc + loss, self.n + 1

    def close(self) -> None:
        """Set ``loss`` and ``loss_steps`` to the interval's."""
        self.loss, self.loss_steps = (self.acc / self.n if self.n else float("nan")), self.n

    def record(self, step: int, lr: float, grad_norm) -> dict:
        """The log record of the closed interval ending at ``step``, and a new interval from there.

        loss: the mean over the loss_steps finite steps since the last record (fewer than log_every in the first
        record after a resume from a step between records, or after skipped steps)."""
        now = time.perf_counter()
        rec = {"step": step, "loss": self.loss, "loss_steps": self.loss_steps, "lr": lr,
               "grad_norm": float(grad_norm), "steps_per_s": (step - self.step) / max(now - self.t, 1e-9),
               "time_s": now - self.t_start}
        self.t, self.step, self.acc, self.n = now, step, 0.0, 0
        return rec


def _write_record(log, trackers, rec: dict) -> None:
    """One JSON line of log.jsonl (flushed), and the same scalars to the trackers."""
    log.write(json.dumps(rec) + "\n")
    log.flush()
    trackers.scalars(rec["step"], rec)


class AlreadyTrained(DifflabError):
    """Raised by a resume that has no step to train (the run is at or past its train.steps or ``until``)."""

    def __init__(self, run_dir: Path, step: int, steps: int):
        self.step, self.steps = step, steps
        super().__init__(f"{run_dir} is already at step {step} of {steps}; nothing was changed. Pass --steps M (more "
                         f"than {step}) to train further")


class TrainingInterrupted(Interrupted):
    """Raised after a SIGTERM or SIGINT stopped training at a checkpoint."""

    def __init__(self, signum: int, step: int, run_dir: Path, again: str | None = None):
        import signal

        self.signum, self.step = signum, step
        again = again or f"difflab train --out {run_dir} --resume"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written: continue with "
                         f"'{again}'")


class _StopRequest:
    """Turns SIGTERM and SIGINT into a flag the training loop checks between steps (main thread only)."""

    def __init__(self):
        import signal
        import threading

        self.signal = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def restore(self) -> None:
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (written after the checkpoint a resume starts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: RunConfig | None, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
          until: int | None = None, steps: int | None = None, progress: bool = True, threads: int | None = None,
          device: str | None = None, log: list[str] | None = None) -> TrainResult:
    """Train a new run in ``run_dir`` from ``cfg``, or resume it (``cfg`` ignored: the run's saved config is used).

    ``steps`` overrides train.steps (e.g. to extend a resumed run); ``until`` stops early with a checkpoint,
    as if interrupted there. ``threads``, ``device`` and ``log`` (the trackers, [] for none) are runtime settings
    (train.threads, train.device, train.log) that may differ from the saved ones when resuming: the run resumes
    exactly on any of them.
    """
    run_dir = Path(run_dir)
    if resume:
        check_run_dir(run_dir, resume=True, overwrite=False)
        saved = load_checkpoint(run_dir)[1]
        cfg = RunConfig.from_dict(saved["config"])
    require(cfg is not None, "train() needs a config for a new run")
    if steps is not None:
        cfg.train.steps = steps
    if resume and saved["step"] >= min(cfg.train.steps, until or cfg.train.steps):  # nothing to do: touch nothing
        raise AlreadyTrained(run_dir, saved["step"], cfg.train.steps)
    if threads is not None:
        cfg.train.threads = threads
    if device is not None:
        cfg.train.device = device
    if log is not None:
        cfg.train.log = list(log)
    from difflab.paths import check_writable

    check_writable(run_dir, "run folder", folder=True)  # every process checks, so all fail alike, before any work
    check_run_dir(run_dir, resume, overwrite)
    trainer = Trainer(cfg, run_dir, initialise=not resume)  # checks everything before anything is written
    distributed.barrier()
    if trainer.rank == 0:
        prepare_run_dir(run_dir, resume, overwrite)
    distributed.barrier()
    if resume:
        trainer.restore()
    return trainer.run(until=until, progress=progress)
