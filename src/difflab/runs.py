"""A trained run in one object: its denoiser, config, schedule and data, and sampling from it.

``Run.load(path)`` reads a run folder (its newest intact checkpoint) or one checkpoint folder. Every sampler a
run builds follows the run's own DDPM schedule, so nothing outside this module passes a schedule by hand:

    run = Run.load("runs/dsm")                                   # EMA weights, eval mode
    x, stats = run.sample(2000, seed=0, sampler="ddim", steps=50)
    x, stats = run.sample(2000, seed=0, sampler="picard-ddpm", parallel={"tol": 0.1}, out="runs/dsm/p.npz")
    x, stats = run.sample(2000, seed=0, sampler="heun", guide_with="runs/dsm@1200", guidance=1.0)  # autoguidance

The trainer wraps its live EMA network the same way (:meth:`Run.of`) for the previews and the periodic FID.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.autoguidance import AutoGuided, check_guide
from difflab.conditioning import LABELS, Guided, check_rows
from difflab.config import RunConfig, validate
from difflab.denoisers import Precond
from difflab.errors import DifflabError, require
from difflab.models import build_denoiser, ddpm_schedule, num_classes, precond_name
from difflab.samplers import Chain, SampleStats, make_chain, sample_by_batches, sample_chain
from difflab.schedules import DDPMSchedule
from difflab.seeds import derive_seed

PARALLEL_PREFIX = "picard-"  # 'picard-ddpm' is DDPM solved by parallel Picard iteration
SCHEDULED = ("ddpm", "ddim", "dpmpp-2m")  # the samplers on the run's DDPM schedule (the others: EDM's sigma grid)
LABEL_STREAM = 1  # the subkey of sample k's class label, derive_seed(seed, k, LABEL_STREAM)


@dataclass
class Run:
    """A denoiser with the config it was trained with.

    Fields:
        denoiser: the preconditioned network (EMA weights when loaded), in eval mode.
        config: the run's resolved :class:`RunConfig`.
        shape: per-example shape, e.g. (2,) or (1, 8, 8).
        step: the optimiser step of the weights.
        path: the run (or checkpoint) folder; None for a live network.
        state: the checkpoint's state record (config, shape, step, ...); empty for a live network.
    """

    denoiser: Precond
    config: RunConfig
    shape: tuple[int, ...]
    step: int = 0
    path: Path | None = None
    state: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path, ema: bool = True, device: str | torch.device = "cpu",
             config: RunConfig | None = None, shape: tuple[int, ...] | None = None, step: int | None = None) -> Run:
        """The run in ``path``, with its EMA weights (``ema=False``: the raw weights) on ``device`` (where
        :meth:`sample` also runs the samplers' arithmetic; the noise is drawn on the CPU). ``path`` is a difflab run
        folder (its newest intact checkpoint) or checkpoint folder, a weights + config folder (``difflab export
        --format safetensors``), or a model trained elsewhere, told by its files: a diffusers pipeline or UNet2DModel
        folder (:mod:`difflab.imports.diffusers_folder`; step 0, no data set), an EDM network snapshot (.pkl,
        :mod:`difflab.imports.edm_snapshot`: a restricted unpickler, never the file's code), or a state-dict file of a
        difflab network (.safetensors, .pt, .pth, .bin; :mod:`difflab.imports.state_dict`), whose ``config`` and
        per-example ``shape`` are given or read from a ``run.json`` beside it ({"config": ..., "shape": [...]}, as
        ``difflab export`` writes).

        ``step``, or ``path`` written ``RUN@STEP`` (``runs/dsm@1200``): the run folder's checkpoint of that step
        (``RUN/checkpoints/step-00001200``), if the run kept it (train.keep_checkpoints keeps the newest ones, one
        every train.ckpt_every steps); a path that exists as written is never split at its '@'."""
        from difflab.imports.diffusers_folder import is_diffusers_folder, load_diffusers_model
        from difflab.training.checkpoint import load_checkpoint, load_weights, unprefixed

        path, at = split_step(path)
        require(step is None or at is None or step == at, f"{path}@{at} names step {at}, but step={step} was given")
        if step is not None or at is not None:
            path = checkpoint_of(path, at if step is None else step)

        if is_diffusers_folder(path):
            return cls.of_parts(path, *load_diffusers_model(path)).to(device)
        if is_exported(path):
            return load_exported(path, device)
        if Path(path).is_file() and Path(path).suffix == ".pkl":  # EDM / STF network-snapshot-*.pkl
            from difflab.imports.edm_snapshot import load_edm_model

            return cls.of_parts(path, *load_edm_model(path)).to(device)
        if Path(path).is_file():
            return load_state_dict_file(path, config, shape).to(device)
        tensors, state = load_checkpoint(Path(path))
        require("config" in state and "shape" in state,
                f"checkpoint {path} is corrupt: its state has no config or shape")
        cfg = validate(RunConfig.from_dict(state["config"]))
        shape = tuple(state["shape"])
        model = build_denoiser(cfg, shape)
        load_weights(model, unprefixed("ema." if ema else "model.", tensors), path)
        return cls(model.to(device).eval().requires_grad_(False), cfg, shape, int(state.get("step", 0)), Path(path),
                   state)

    @classmethod
    def of_parts(cls, path, denoiser: Precond, config: RunConfig, shape: tuple[int, ...], state: dict) -> Run:
        """A run from what an importer (:mod:`difflab.imports`) returns: the denoiser, config, shape and state."""
        return cls(denoiser, config, tuple(shape), int(state.get("step", 0)), Path(path), state)

    @classmethod
    def of(cls, denoiser: Precond, config: RunConfig, shape: tuple[int, ...], step: int = 0,
           path: Path | None = None) -> Run:
        """A live network (e.g. the trainer's EMA) as a run, without a checkpoint."""
        return cls(denoiser, config, tuple(shape), step, path)

    def to(self, device: str | torch.device) -> Run:
        """The run with its network on ``device`` (in place); :meth:`sample` then steps the chains there too."""
        self.denoiser.to(device)
        return self

    # ------------------------------------------------------------------------------------------ facts

    @property
    def schedule(self) -> DDPMSchedule:
        """The DDPM schedule the run was trained on (its DDPM and DDIM samplers follow it)."""
        return ddpm_schedule(self.config)

    @property
    def precond(self) -> str:
        """The network's preconditioning: eps, eps-continuous, x0, v, vp, ve, edm or flow."""
        return precond_name(self.config)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (its samples need class labels); 0 if unconditional."""
        return num_classes(self.config)

    def labels(self, spec, n: int, seed: int = 0, start: int = 0) -> torch.Tensor | None:
        """Class labels (n,) int64 of samples ``start .. start + n - 1`` from ``spec``: a class index for all (an
        int, or its digits as text: the CLI's --class), ``"all"`` (sample k of class k mod K), ``"random"``
        (sample k's label drawn from (seed, k), so it too is the same whatever the batch), or a tensor of n labels;
        None for an unconditional network (which refuses labels, as a conditional one refuses none)."""
        K = self.num_classes
        if spec is None:
            require(K == 0, f"this model is class-conditional ({K} classes): give class labels (--class K, "
                            "0 <= K < {K}, or --class random)".replace("{K}", str(K)))
            return None
        require(K > 0, "class labels given, but this model is not class-conditional")
        if isinstance(spec, str) and not spec.isdigit():
            require(spec in ("all", "random"), f"class labels (--class) must be a class index (0..{K - 1}), 'all' "
                                               f"or 'random', got {spec!r}")
            if spec == "all":  # sample k of class k mod K: every class equally often, in any batch
                return torch.arange(start, start + n) % K
            return torch.tensor([derive_seed(seed, k, LABEL_STREAM) % K for k in range(start, start + n)])
        spec = int(spec) if isinstance(spec, str) else spec
        labels = torch.as_tensor(spec, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:  # one class for every sample (--class K)
            require(0 <= int(labels) < K, f"class (--class) must be a class index in 0..{K - 1} (this model has "
                                          f"{K} classes), 'all' or 'random', got {spec!r}")
            return labels.expand(n)
        require(labels.shape == (n,) and bool(((labels >= 0) & (labels < K)).all()),
                f"class labels must be {n} values (one per sample) in 0..{K - 1}, got {spec!r}")
        return labels

    @property
    def data(self) -> str:
        """The data spec the run was trained on, e.g. 'dino' or 'digits?flip=1'."""
        return self.config.data.name

    def training_data(self) -> torch.Tensor:
        """The run's training set (N, *shape), as the trainer drew it."""
        from difflab.data import get_dataset

        return get_dataset(self.data).train_data(self.config.data.n_train)

    # ------------------------------------------------------------------------------------------ sampling

    @property
    def default_sampler(self) -> str:
        """What ``difflab sample`` uses unless told: flow-euler for a flow-matching model, DDIM (50 steps: minutes,
        not an hour, on a CPU) for images, DDPM for flat data."""
        return "flow-euler" if self.precond == "flow" else "ddim" if len(self.shape) == 3 else "ddpm"

    def chain(self, name: str, guidance: float = 0.0, null_class: int | None = None, guide: Run | None = None,
              **options) -> Chain:
        """The sequential sampler ``name`` (ddpm, ddim, heun, euler, dpmpp-2m, dpmpp-2m-edm, flow-euler, flow-heun)
        over this run's denoiser, with the run's own DDPM schedule for ddpm, ddim and dpmpp-2m and, unless given, the
        run's ``schedule.shift`` (an imported diffusers FlowMatch scheduler's shift) for flow-euler and flow-heun;
        ``options`` are the sampler's (steps, eta, variance, shift, ...).
        ``guidance`` w > 0: over the classifier-free guided denoiser (see :meth:`guided`); with a ``guide`` (a run
        on this run's device), over the autoguided one instead (:meth:`autoguided`; any w >= 0)."""
        require("schedule" not in options, "a run's samplers follow the run's own schedule: do not pass one")
        if name in SCHEDULED:
            options["schedule"] = self.schedule
        if name in ("flow-euler", "flow-heun") and options.get("shift") is None:
            options["shift"] = self.config.schedule.shift
        if guide is not None:
            require(null_class is None, "--null-class is classifier-free guidance's unconditional label; autoguidance "
                                        "(--guide-with) gives the guide the same class labels: leave it out")
            return make_chain(name, self.autoguided(guide, guidance, name), **options)
        return make_chain(name, self.guided(guidance, null_class) if guidance else self.denoiser, **options)

    def autoguided(self, guide: Run, w: float, sampler: str | None = None) -> AutoGuided:
        """This run's denoiser guided by the worse model ``guide`` (a run of the same data: a smaller or shorter-trained
        one, or an early checkpoint, ``Run.load("RUN@STEP")``) with weight w: (1 + w) D(x) - w D_guide(x), both
        with the same condition (class labels included), :class:`~difflab.autoguidance.AutoGuided`. A guide that
        cannot be combined is refused (:func:`~difflab.autoguidance.check_guide`; ``sampler``: the chain's)."""
        check_guide(self, guide, sampler)
        return AutoGuided(self.denoiser, guide.denoiser, w)

    def guide_run(self, guide: Run | str | Path) -> Run:
        """``guide`` as a run on this run's device: a :class:`Run` (moved there, in place), or what :meth:`load`
        reads (a run folder, ``RUN@STEP``, an imported model), with its EMA weights."""
        from difflab.devices import device_of

        device = device_of(self.denoiser)
        return guide.to(device) if isinstance(guide, Run) else Run.load(guide, device=device)

    def guided(self, w: float, null_class: int | None = None) -> Guided:
        """This class-conditional network with classifier-free guidance of weight w. The unconditional label is
        difflab's U-Net's zero label vector; a diffusers model names its own with ``null_class`` (0..K-1)."""
        K = self.num_classes
        require(K > 0, "--guidance needs a guide (--guide-with RUN: autoguidance) or a class-conditional model "
                       "(--class K: classifier-free guidance); this one is unconditional")
        if null_class is None:
            require(self.config.model.arch != "diffusers",
                    "--guidance with a diffusers model needs --null-class N: the class index it was trained to read "
                    "as 'no class' (a UNet2DModel's class embedding has no zero label)")
            return Guided(self.denoiser, w)
        require(0 <= null_class < K, f"--null-class must be a class index in 0..{K - 1}, got {null_class}")
        return Guided(self.denoiser, w, null_class)

    def sample(self, n: int, seed: int = 0, sampler: str = "ddpm", *, parallel=None, batch_size: int = 4096,
               start: int = 0, dtype: torch.dtype | str | None = None, out: str | Path | None = None,
               progress: bool = False,
               callback: Callable | None = None, local: bool = False, class_labels=None, guidance: float = 0.0,
               null_class: int | None = None, cond: Mapping[str, torch.Tensor] | None = None,
               guide_with: Run | str | Path | None = None, **chain_options) -> tuple[torch.Tensor, SampleStats]:
        """Samples ``start .. start + n - 1`` of ``seed`` (n, *shape) on the CPU, and their :class:`SampleStats`.

        The sampler runs on the network's device with its state in ``dtype``: float32, float64, or ``"auto"`` / None
        (the default) for the device's default (float64 on the CPU, float32 on a GPU).

        ``sampler``: ddpm | ddim | heun | euler | dpmpp-2m | dpmpp-2m-edm | flow-euler | flow-heun, or
        picard-<one of them> (parallel Picard
        iteration over the same steps, with the options ``parallel``: a dict or
        :class:`~difflab.samplers.PicardOptions`; default tol 0.1).
        ``chain_options``: the sampler's options (steps, eta, variance, clip, ...).
        Under torchrun, a sequential sampler deals the batches of a one-process call out to the processes (so
        every sample is computed exactly as in one process); a parallel one splits each sweep's rows instead.
        Every process returns all samples; ``local=True`` samples in this process alone (e.g. only the first
        process previews). ``out``: also write them, with the stats, to this ``.npz`` atomically (the first
        process writes). ``callback``: per step ``callback(j, x)`` or per sweep ``callback(sweep, x_end, X)``.
        ``class_labels``: for a class-conditional network, a class index, ``"all"``, ``"random"`` or n labels
        (:meth:`labels`), passed to the samplers as the condition ``{"class_labels": labels}``; ``guidance``: the
        classifier-free guidance weight w (0: none; :meth:`guided`). ``cond``: any other row-aligned condition the
        network takes as keywords (name -> tensor (n, ...), row k for sample ``start + k``), passed beside the labels.
        ``guide_with``: autoguidance by this worse model of the same data (a :class:`Run`, or a run folder,
        ``RUN@STEP`` or imported model :meth:`load` reads, moved to this run's device) with weight ``guidance``
        (0: the guide is not evaluated, the samples are the unguided ones bit for bit; :meth:`autoguided`); it gets
        the same condition, and classifier-free guidance is then not applied. The stats record ``guide`` (its
        path), ``guide_step`` and ``guidance``.
        """
        from difflab.training import distributed

        is_parallel = sampler.startswith(PARALLEL_PREFIX)
        require(is_parallel or parallel is None,
                f"Picard options apply to the parallel samplers only (picard-{sampler}), not to {sampler!r}")
        if out is not None:
            require(Path(out).suffix == ".npz", f"samples are written as .npz, got {out}")
        labels = self.labels(class_labels, n, seed, start)
        cond = {**(cond or {}), **({} if labels is None else {LABELS: labels})} or None
        if cond is not None:
            check_rows(cond, n, "sample")
        guide = None if guide_with is None else self.guide_run(guide_with)
        chain = self.chain(sampler.removeprefix(PARALLEL_PREFIX), guidance, null_class, guide, **chain_options)
        if is_parallel and parallel is None:
            parallel = {}
        rank, world = (0, 1) if local else distributed.world()
        if world > 1 and not is_parallel:
            require(callback is None, "a per-step callback needs all samples in one process: pass local=True")
            x, stats = sample_by_batches(chain, n, seed, self.shape, batch_size, start, dtype, cond)
        else:
            x, stats = sample_chain(chain, n, seed, self.shape, batch_size=batch_size, start=start, dtype=dtype,
                                    progress=progress and rank == 0, parallel=parallel, callback=callback,
                                    cond=cond, **({"group": False} if local and is_parallel else {}))
        self._describe(stats, chain, class_labels if labels is not None else None, guidance, guide,
                       chain_options.get("shift"))
        if out is not None and rank == 0:
            save_samples(out, x, self.record(stats, seed, out, world))
        return x, stats

    def _describe(self, stats: SampleStats, chain: Chain, class_labels, guidance: float, guide: Run | None,
                  shift: float | None) -> None:
        """What the stats say of a call beyond the chain: its labels and guidance, the guide, a flow grid's shift
        and the CPU threads it ran with (they can change the numbers)."""
        if class_labels is not None:
            spec = int(class_labels) if isinstance(class_labels, str) and class_labels.isdigit() else class_labels
            stats.extra["class_labels"] = spec if isinstance(spec, (int, str)) else "given"
            stats.extra["guidance"] = float(guidance)
        if guide is not None:
            stats.extra.update(guide=None if guide.path is None else str(guide.path), guide_step=guide.step,
                               guidance=float(guidance))
        if chain.name.startswith("flow-"):  # the grid's shift (the run's schedule.shift unless given)
            stats.extra["shift"] = float(shift or self.config.schedule.shift)
        stats.extra["threads"] = torch.get_num_threads()

    def record(self, stats: SampleStats, seed: int, out: str | Path | None = None, processes: int = 1) -> dict:
        """What a sample file stores beside the samples: the stats, the seed and where they came from."""
        rec = {**stats.to_dict(), "seed": seed, "run": None if self.path is None else str(self.path),
               "checkpoint_step": self.step, "processes": processes}
        return rec if out is None else {**rec, "out": str(out)}


STEP_MARK = "@"  # RUN@STEP: a checkpoint of a run


def split_step(path: str | Path) -> tuple[Path, int | None]:
    """``RUN@STEP`` as (RUN, STEP); any other path (one that exists as written, '@' in its name or not) as (path,
    None)."""
    text = str(path)
    head, mark, tail = text.rpartition(STEP_MARK)
    if not mark or not head or Path(text).exists():
        return Path(text), None
    require(tail.isdigit(), f"{text}: the step after '{STEP_MARK}' must be a checkpoint's step number (RUN@STEP, e.g. "
                            f"{head}@1000), got {tail!r}")
    return Path(head), int(tail)


def checkpoint_of(run_dir: str | Path, step: int) -> Path:
    """The checkpoint folder of ``step`` in a difflab run folder; refused in one line, naming the kept steps, when
    the run did not keep it."""
    from difflab.training.checkpoint import STATE, checkpoint_dir, list_checkpoints

    run_dir = Path(run_dir)
    require(isinstance(step, int) and step >= 0, f"a checkpoint step must be a whole number >= 0, got {step!r}")
    require(run_dir.exists(), f"no such run: {run_dir} (RUN{STEP_MARK}STEP names a checkpoint of a run folder made "
                              "by 'difflab train')")
    require(run_dir.is_dir(), f"{run_dir} is a file: {STEP_MARK}{step} names a checkpoint of a run folder made by "
                              "'difflab train'")
    require(not (run_dir / STATE).exists(), f"{run_dir} is a checkpoint folder already: give its run folder with "
                                            f"{STEP_MARK}{step}, or the checkpoint folder alone")
    ckpt = checkpoint_dir(run_dir, step)
    if ckpt.is_dir():
        return ckpt
    kept = [int(p.name.removeprefix("step-")) for p in list_checkpoints(run_dir)]
    require(bool(kept), f"{run_dir} holds no checkpoint (expected {run_dir}/checkpoints/step-*/): is it a run "
                        "folder made by 'difflab train'?")
    raise DifflabError(f"{run_dir} has no checkpoint of step {step}: it keeps steps {', '.join(map(str, kept))} (a run "
                       "keeps its newest train.keep_checkpoints checkpoints, one every train.ckpt_every steps; to keep "
                       "an early one train with --set train.ckpt_every=N --set train.keep_checkpoints=M)")


def load_state_dict_file(path: str | Path, config: RunConfig | None, shape) -> Run:
    """A state-dict file as a run: its config and shape given, or from the ``run.json`` beside it."""
    from difflab.exports import RUN_FILE
    from difflab.imports.state_dict import load_state_dict_model

    p = Path(path)
    if config is None or shape is None:
        meta_path = p.with_name(RUN_FILE)
        require(meta_path.is_file(), f"{p} is a file: a state dict needs the config and example shape it was trained "
                                     f"with, from a {RUN_FILE} beside it ({{\"config\": ..., \"shape\": [...]}}) or "
                                     "given to Run.load(path, config=..., shape=...)")
        meta = json.loads(meta_path.read_text())
        config, shape = RunConfig.from_dict(meta["config"]), tuple(meta["shape"])
    return Run.of_parts(p, *load_state_dict_model(p, config, tuple(shape)))


def is_exported(path: str | Path) -> bool:
    """A folder ``difflab export --format safetensors`` wrote (run.json + model.safetensors)."""
    from difflab.exports import RUN_FILE, WEIGHTS_FILE

    return (Path(path) / RUN_FILE).is_file() and (Path(path) / WEIGHTS_FILE).is_file()


def load_exported(path: str | Path, device="cpu") -> Run:
    """The run of an exported weights + config folder (its EMA weights, the step it was exported at)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from difflab.errors import DifflabError, short
    from difflab.exports import RUN_FILE, WEIGHTS_FILE
    from difflab.training.checkpoint import load_weights

    p = Path(path)
    try:
        meta = json.loads((p / RUN_FILE).read_text())
        cfg, shape, step = validate(RunConfig.from_dict(meta["config"])), tuple(meta["shape"]), int(meta["step"])
        tensors = load_file(str(p / WEIGHTS_FILE))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise DifflabError(f"cannot read the exported run {p} ({short(e)}): export it again") from None
    model = build_denoiser(cfg, shape)
    load_weights(model, tensors, p)
    return Run(model.to(device).eval().requires_grad_(False), cfg, shape, step, p, {**meta, "imported": "safetensors"})


def save_samples(path: str | Path, x: torch.Tensor, stats: dict) -> Path:
    """Write samples (N, *shape) and a JSON stats record to ``path`` (.npz: keys 'samples' and 'stats')
    atomically (:func:`difflab.atomic.atomic_file`): a crash leaves the old file or none, never a partial one."""
    from difflab.atomic import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, samples=x.numpy(), stats=np.array(json.dumps(stats)))
    return path


def load_samples(path: str | Path) -> tuple[torch.Tensor, dict]:
    """The samples and the stats record of a file :func:`save_samples` wrote."""
    with np.load(path, allow_pickle=False) as f:
        return torch.from_numpy(f["samples"]), json.loads(str(f["stats"]))
