"""``difflab compare``: which objective helps on *this* data? Objectives x grid points x seeds, each an independent
unit run by an executor (local processes, or one SLURM job array through submitit).

A **unit** is one training run (objective, grid point, seed) with an equal budget, then its samples from each
sampler that suits the data, their score (:mod:`~difflab.studies.judges`), the few-step rows and the training
curve; it ends by writing ``OUT/units/KEY.json`` atomically. Everything a unit does is cached in ``OUT`` as a study's
units are (:class:`~difflab.studies.cache.Study`), so a killed unit resumes from its checkpoint and a finished one is
skipped. The parent process validates every unit's config, writes ``OUT/plan.json``, prepares the judge and the
real-vs-real floor, hands the unfinished units to the executor, and builds the report
(:mod:`~difflab.studies.compare_report`) when all are done.

Every unit runs at the same fixed thread count (1 by default: the units are the parallelism), so its numbers do not
depend on ``--jobs``, the executor or what else runs on the machine.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import require, suggest
from difflab.executors import ExecutorOptions
from difflab.studies.common import FINE_TUNES, OBJECTIVE_CONFIG, SAMPLERS, StudyOptions
from difflab.studies.compare_report import build_report, read_plan, unit_path

DEFAULT_OBJECTIVES = ("dsm", "edm", "stf", "sa2", "fm", "fm-stf")
# per kind of data: the equal budget, how many samples and reference points, the samplers, what the units train
FLAT = {"steps": 3000, "n_samples": 2000, "n_ref": 8000, "floor_draws": 5, "snapshots": 5, "curve_steps": 50,
        "nfe_counts": [5, 10, 20], "samplers": ["ddpm", "ddim", "heun"], "train_overrides": []}
IMAGES = {"steps": 800, "n_samples": 500, "n_ref": 10000, "floor_draws": 5, "snapshots": 4, "curve_steps": 20,
          "nfe_counts": [5, 10, 20], "samplers": ["ddim", "heun"],
          "train_overrides": ['model.preset="tiny"', "train.batch_size=128", "train.lr=1e-3", "train.log_every=50"]}
RUNTIME = ("progress", "device", "procs_per_unit")  # settings that change no number (not pinned to the folder)


@dataclass
class CompareOptions:
    """The options of ``difflab compare`` (its flags)."""

    data: str  # a data spec difflab reads (dino, a .npy file, digits, folder:PATH, cifar10:PATH, ...)
    out: Path  # the shared output folder (plan, runs, samples, unit results, report)
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    seeds: int = 3
    overrides: list[str] = field(default_factory=list)  # --set section.key=value, for every run
    grid: list[str] = field(default_factory=list)  # --grid section.key=v1,v2 (the product over keys)
    budget_steps: int | None = None  # training steps per run (default: 3,000 flat, 800 images)
    budget_seconds: float | None = None  # or an equal wall-clock budget, converted to steps by a timing run
    samplers: list[str] | None = None  # None: ddpm,ddim,heun (flat), ddim,heun (images)
    n_samples: int | None = None  # samples per sampler (default 2,000 flat, 500 images)
    n_ref: int | None = None  # reference points / images scored against (default 8,000 flat, 10,000 images)
    features: str | None = None  # mmd | classifier | inception (default: by the data)
    inception: str | None = None  # the Inception TorchScript file (features inception)
    threads: int = 1  # torch CPU threads of every unit (0: by the network, as difflab train)
    device: str | None = None  # where the units train, sample and score (None: auto, a GPU when there is one)
    procs_per_unit: int = 1  # processes per unit under torchrun (a multi-GPU unit: its GPUs)
    progress: bool = True
    executor: ExecutorOptions = field(default_factory=ExecutorOptions)
    settings: dict = field(default_factory=dict)  # any default setting above, replaced (tests use tiny ones)

    def validate(self) -> None:
        require(self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        require(bool(self.objectives), "--objectives is empty: name at least one, e.g. dsm,edm")
        for o in self.objectives:
            require(o not in FINE_TUNES, f"objective {o!r} fine-tunes another run; compare trains every objective "
                                         "from scratch (use difflab study dino for cdl-ft)")
            require(o in known_objectives(), f"unknown objective {o!r}{suggest(o, known_objectives())}: use "
                                             f"{', '.join(known_objectives())}")
        require(len(set(self.objectives)) == len(self.objectives), "--objectives names an objective twice")
        for sm in self.samplers or ():
            require(sm in SAMPLERS, f"unknown sampler {sm!r}{suggest(sm, SAMPLERS)}: use {', '.join(SAMPLERS)}")
        require(self.budget_steps is None or self.budget_steps >= 1, "--budget-steps must be >= 1")
        require(self.budget_seconds is None or self.budget_seconds > 0, "--budget-seconds must be > 0")
        require(self.budget_steps is None or self.budget_seconds is None,
                "give one of --budget-steps and --budget-seconds")
        require(self.n_samples is None or self.n_samples >= 2, "--n-samples must be >= 2")
        require(self.n_ref is None or self.n_ref >= 2, "--n-ref must be >= 2")
        require(self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        require(self.procs_per_unit >= 1, f"--procs-per-unit must be >= 1, got {self.procs_per_unit}")
        if self.executor.folder is None:
            self.executor.folder = Path(self.out) / "jobs"  # submitit's logs and pickles, beside the units
        self.executor.validate()


def known_objectives() -> list[str]:
    """The study objectives (stf = EDM + STF, sa2 = SA-2, fm-stf, ...) and every objective.name."""
    from difflab.objectives import OBJECTIVES

    return list(dict.fromkeys([*OBJECTIVE_CONFIG, *OBJECTIVES]))


def parse_grid(entries: list[str]) -> list[dict]:
    """``["train.lr=1e-3,3e-4", "train.batch_size=64,128"]`` -> the product as [{key: value text}, ...] ([{}]
    without a grid)."""
    axes = []
    for e in entries:
        key, eq, values = e.partition("=")
        key = key.strip()
        require(bool(eq) and "." in key and values.strip(),
                f"--grid {e!r} must look like section.key=v1,v2, e.g. train.lr=1e-3,3e-4")
        vals = [v.strip() for v in values.split(",")]
        require(all(vals), f"--grid {e!r} has an empty value")
        require(key not in (k for k, _ in axes), f"--grid names {key} twice: give its values in one --grid")
        axes.append((key, vals))
    return [dict(zip((k for k, _ in axes), combo, strict=True)) for combo in itertools.product(*(v for _, v in axes))]


def settings(opts: CompareOptions, ds) -> dict:
    """Every setting a unit needs (what is pinned to the folder, runtime settings aside)."""
    from difflab.studies.judges import default_features

    images = len(ds.shape) == 3
    s = {**(IMAGES if images else FLAT), "data": opts.data, "images": images, "arch": "unet" if images else "mlp",
         "features": opts.features or default_features(ds), "inception": opts.inception, "threads": opts.threads,
         "device": opts.device or "auto", "procs_per_unit": opts.procs_per_unit, "progress": opts.progress,
         "overrides": list(opts.overrides), "budget_seconds": opts.budget_seconds}
    if opts.samplers:
        s["samplers"] = list(opts.samplers)
    if opts.n_samples:
        s["n_samples"] = opts.n_samples
    if opts.n_ref:
        s["n_ref"] = opts.n_ref
    if opts.budget_steps:
        s["steps"] = opts.budget_steps
    return {**s, **opts.settings}


def variants(opts: CompareOptions) -> list[dict]:
    """One per (objective, grid point): {"name", "objective", "grid", "label"}, in the order given."""
    from difflab.studies.labels import OBJECTIVE_LABELS

    out = []
    for obj in opts.objectives:
        for point in parse_grid(opts.grid):
            grid = ",".join(f"{k}={v}" for k, v in point.items())  # the name says the values: stable as a grid grows
            out.append({"name": obj + ("-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", grid) if grid else ""),
                        "objective": obj, "grid": point,
                        "label": OBJECTIVE_LABELS.get(obj, obj) + (f" [{grid.replace(',', ', ')}]" if grid else "")})
    return out


OWNED = ("data.name", "train.steps", "train.seed")  # what compare sets itself (--data, the budget, --seeds)


def unit_overrides(s: dict, v: dict, seed: int, steps: int) -> list[str]:
    """A unit's config overrides: the data, the data kind's defaults, the objective, the seed, the budget and
    ``s["snapshots"]`` evenly spaced kept checkpoints (the training curve), then the user's --set and the grid
    point (later ones win)."""
    every = max(1, steps // max(1, s["snapshots"]))
    return [f'data.name="{s["data"]}"', *s["train_overrides"],
            *OBJECTIVE_CONFIG.get(v["objective"], [f'objective.name="{v["objective"]}"']), f"train.seed={seed}",
            f"train.steps={steps}", f"train.ckpt_every={every}", "train.keep_checkpoints=100000",
            *s["overrides"], *(f"{k}={val}" for k, val in v["grid"].items())]


def _check_owned(entries: list[str], flag: str) -> None:
    for e in entries:
        key = e.split("=", 1)[0].strip()
        require(key not in OWNED, f"{flag} {e!r}: compare sets {key} itself; use --data, --budget-steps or --seeds")


def _study(out: Path, s: dict, name: str = "compare"):
    from difflab.studies.cache import Study

    study = Study(name, StudyOptions(out=out, progress=s["progress"], threads=s["threads"], device=s["device"],
                                     budget_seconds=s["budget_seconds"]), arch=s["arch"])
    study.again = "the same difflab compare command (finished units are kept; this one resumes from its checkpoint)"
    return study


def plan(opts: CompareOptions) -> tuple[dict, object]:
    """Validate everything (options, data, every unit's config, the judge's needs) before any work; returns the
    plan (settings, variants, units) and the data set."""
    from difflab.config import load_config
    from difflab.data import get_dataset
    from difflab.studies.judges import check_features

    opts.validate()
    _check_owned(opts.overrides, "--set")
    _check_owned(opts.grid, "--grid")
    ds = get_dataset(opts.data)
    s = settings(opts, ds)
    check_features(ds, s["features"], s["inception"])
    vs = variants(opts)
    units = []
    for v in vs:
        for seed in range(opts.seeds):
            overrides = unit_overrides(s, v, seed, s["steps"])
            load_config(overrides=overrides)  # a bad --set or --grid fails here, named
            units.append({"key": f"{v['name']}-s{seed}", "variant": v["name"], "seed": seed,
                          "overrides": overrides})
    return {"settings": s, "variants": vs, "units": units, "seeds": opts.seeds}, ds


def compare(opts: CompareOptions) -> Path:
    """Run (or finish) a comparison and build its report; returns the path of report.md."""
    from difflab.executors import run_units
    from difflab.extras import require_module
    from difflab.studies.judges import prepare_judge
    from difflab.training.checkpoint import write_json_atomic

    p, ds = plan(opts)
    if opts.executor.kind != "local":  # a missing submitit is named before any work
        require_module("submitit", f"--executor {opts.executor.kind}")
    s = p["settings"]
    study = _study(Path(opts.out), s)
    study.pin_settings({k: v for k, v in s.items() if k not in RUNTIME})
    prepare_judge(study.out, ds, s, log=study.log)
    if opts.budget_seconds:  # an equal wall-clock budget: converted to steps once here, so every unit agrees
        vs = {v["name"]: v for v in p["variants"]}
        for u in p["units"]:
            steps = study.budget(u["overrides"], u["variant"], s["steps"])
            u["overrides"] = unit_overrides(s, vs[u["variant"]], u["seed"], steps)
    write_json_atomic(study.out / "plan.json", p, sort_keys=False)
    (study.out / "units").mkdir(exist_ok=True)
    todo = [u["key"] for u in p["units"] if not unit_path(study.out, u["key"]).exists()]
    done = len(p["units"]) - len(todo)
    study.log(f"{len(p['units'])} units ({len(p['variants'])} variants x {opts.seeds} seeds): {done} finished, "
              f"{len(todo)} to run with --executor {opts.executor.kind}"
              + (f" --jobs {opts.executor.jobs}" if opts.executor.kind == "local" else ""))
    if todo:
        alone = opts.executor.kind == "local" and opts.executor.jobs == 1  # else progress bars would interleave
        run_units(CompareUnit(str(study.out), progress=opts.progress and alone), todo, todo, opts.executor,
                  log=study.log)
    return build_report(study.out, log=study.log)


class CompareUnit:
    """One unit of the comparison in ``out``, by key: a picklable callable for any executor (it reads plan.json);
    ``progress``: the unit's own stage lines and bars (off when units run side by side)."""

    def __init__(self, out: str, progress: bool = True):
        self.out, self.progress = out, progress

    def __call__(self, key: str) -> dict:
        return run_unit(Path(self.out), key, self.progress)

    def __repr__(self) -> str:
        return f"CompareUnit({self.out!r})"


def run_unit(out: Path, key: str, progress: bool = True) -> dict:
    """Train, sample and score unit ``key`` of the comparison in ``out`` (resuming whatever it left); write and
    return its result."""
    from difflab.runs import Run
    from difflab.studies.few_steps import few_steps
    from difflab.studies.judges import load_judge
    from difflab.studies.labels import sampler_label
    from difflab.studies.measures import loss_curve
    from difflab.training.checkpoint import write_json_atomic

    p = read_plan(out)
    path = unit_path(out, key)
    if path.exists():
        return json.loads(path.read_text())
    (u,) = [u for u in p["units"] if u["key"] == key]
    s = {**p["settings"], "progress": progress and p["settings"]["progress"]}
    study = _study(out, s, name=f"compare {key}")
    judge = load_judge(out, s)
    run = (study.train_run(key, u["overrides"]) if s["procs_per_unit"] == 1
           else _train_torchrun(study, key, u["overrides"], s))
    rows = {}
    for sampler in s["samplers"]:
        x, st = study.sample(f"{key}-{sampler}", run, sampler, s["n_samples"], seed=0)
        value = study.cached(f"score-{key}-{sampler}", lambda x=x: {"value": judge(x)},
                             what=f"{judge.label} of {len(x):,} samples")["value"]
        rows[sampler] = {"value": value, "label": sampler_label(sampler, st["steps"]),
                         **{k: st.get(k) for k in ("nfe_per_sample", "wall_time_s")}}
    few = study.cached(f"fewsteps-{key}", lambda: few_steps(study.load(run), judge, s, study),
                       what=f"{judge.label} at {', '.join(map(str, s['nfe_counts']))} network calls")
    curve = study.cached(f"curve-{key}", lambda: training_curve(run, judge, s, study.sample_device),
                         what=f"{judge.label} during training (DDIM-{s['curve_steps']} at every kept checkpoint)")
    steps, loss = loss_curve(run)
    result = {"key": key, "variant": u["variant"], "seed": u["seed"], "steps": Run.load(run).step,
              "threads": study.threads, "samplers": rows, "few_steps": few, "curve": curve,
              "loss": {"step": steps, "loss": loss}}
    write_json_atomic(path, result, sort_keys=False)
    return result


def training_curve(run_dir: Path, judge, s: dict, device="cpu") -> dict:
    """The judge's score of DDIM samples (``s["curve_steps"]`` steps) from every kept checkpoint of a run, sampled
    on ``device``."""
    from difflab.runs import Run
    from difflab.training.checkpoint import list_checkpoints

    steps, values = [], []
    for ck in list_checkpoints(run_dir):
        run = Run.load(ck, device=device)
        x, _ = run.sample(s["n_samples"], 0, "ddim", steps=s["curve_steps"], local=True)
        steps.append(run.step)
        values.append(float(judge(x)))
    return {"step": steps, "value": values}


def _train_torchrun(study, key: str, overrides: list[str], s: dict) -> Path:
    """Train (or resume) a unit's run with ``s["procs_per_unit"]`` processes under torchrun (one per GPU of the
    task on a GPU node; gloo on a CPU), through ``difflab train``."""
    from difflab.config import load_config
    from difflab.training.checkpoint import list_checkpoints, load_checkpoint

    run = study.out / "runs" / key
    done = list_checkpoints(run)
    if done and load_checkpoint(run)[1]["step"] >= load_config(overrides=overrides).train.steps:
        return run
    how = ["--resume"] if done else ["--overwrite", *(a for o in overrides for a in ("--set", o))]
    runtime = [*(["--threads", str(s["threads"])] if s["threads"] else []),
               *(["--device", s["device"]] if s["device"] else [])]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={s['procs_per_unit']}",
           "-m", "difflab.cli", "train", "--out", str(run), *how, *runtime, "--quiet"]
    study.log(f"train {key} under torchrun ({s['procs_per_unit']} processes)")
    subprocess.run(cmd, check=True)
    return run

