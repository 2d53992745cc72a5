"""What every study shares: an output folder of cached units, equal training budgets, sampling, versions, and
the rule that report.md is rendered from results.json (so every number in the report is one in the JSON).

A study is resumable: each unit (a training run, a sample set, a metric) is written atomically once complete, and a
re-run with the same ``--out`` skips every complete unit (a partly trained run resumes from its checkpoint).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab import __version__
from difflab.config import load_config
from difflab.errors import require
from difflab.runs import Run, load_samples, save_samples
from difflab.samplers import PicardOptions
from difflab.training import TrainingInterrupted, train
from difflab.training.checkpoint import list_checkpoints, load_checkpoint, write_json_atomic

# name -> (sequential chain, its options, Picard options or None); the studies' sampler protocol
SAMPLERS = {
    "ddpm": ("ddpm", {"steps": 1000, "variance": "beta"}, None),
    "ddim": ("ddim", {"steps": 50, "eta": 0.0}, None),
    "heun": ("heun", {"steps": 18}, None),
    "picard-ddpm": ("ddpm", {"steps": 1000, "variance": "beta_tilde"}, {"tol": 0.1}),
    # the same with x0_hat clipped to [-3, 3] (the standardised 2-D sets lie within |x| < 2.7): far-field control
    "picard-ddpm-clip": ("ddpm", {"steps": 1000, "variance": "beta_tilde", "clip": 3.0}, {"tol": 0.1}),
    # beyond ParaDiGMS (spec/parallel-acceleration.md): triangular Anderson acceleration, the extrapolated start
    "picard-ddpm-taa": ("ddpm", {"steps": 1000, "variance": "beta_tilde"},
                        {"tol": 0.1, "accel": "taa", "init": "prior"}),  # TAA alone
    "picard-ddpm-x0": ("ddpm", {"steps": 1000, "variance": "beta_tilde"}, {"tol": 0.1, "init": "extrapolate"}),
    "picard-ddpm-taa-x0": ("ddpm", {"steps": 1000, "variance": "beta_tilde"},
                           {"tol": 0.1, "accel": "taa", "init": "extrapolate"}),
}
STANDARD_SAMPLERS = ("ddpm", "ddim", "heun", "picard-ddpm")  # the studies' default set
_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "heun": "Heun"}


def sampler_label(sampler: str, steps: int) -> str:
    """E.g. 'DDPM-1000', 'Heun-18', 'parallel DDPM-1000', 'parallel DDPM-1000, TAA + extrapolated start' from a
    study sampler and its step count."""
    chain, options, parallel = SAMPLERS[sampler]
    label = f"{'parallel ' if parallel is not None else ''}{_NAMES[chain]}-{steps}"
    how = [w for k, v, w in (("accel", "taa", "TAA"), ("init", "extrapolate", "extrapolated start"))
           if (parallel or {}).get(k) == v]
    clip = options.get("clip")
    return label + (f", {' + '.join(how)}" if how else "") + (f", x0 clipped to {clip:g}" if clip is not None else "")


FINE_TUNES = {"cdl-ft": ("cdl", "dsm")}  # study objective -> (objective, the run it fine-tunes)
# study objective -> its config overrides (default: objective.name = the study objective)
OBJECTIVE_CONFIG = {"stf": ['objective.name="stf"', 'objective.options.base="edm"',
                            "objective.options.reference_size=4096"],
                    # SA-K with the spec's recommended lambdas
                    "sa2": ['objective.name="sa"', "objective.options.K=2", "objective.options.lam=1.0"],
                    "sa3": ['objective.name="sa"', "objective.options.K=3", "objective.options.lam=0.3"],
                    "sa4": ['objective.name="sa"', "objective.options.K=4", "objective.options.lam=0.2"],
                    # flow matching and the papers' ideas on it (spec/flow-matching.md)
                    "fm": ['objective.name="fm"'],
                    "fm-ot": ['objective.name="fm"', "objective.options.ot=true", "objective.options.ot_block=256"],
                    "fm-stf": ['objective.name="stf"', 'objective.options.base="fm"',
                               "objective.options.reference_size=4096"],
                    "fm-sa2": ['objective.name="sa"', 'objective.options.grid="flow"', "objective.options.K=2",
                               "objective.options.lam=1.0"]}
FLOW_OBJECTIVES = ("fm", "fm-ot", "fm-stf", "fm-sa2")
OBJECTIVE_LABELS = {"dsm": "DSM (DDPM eps)", "itd": "ITD", "cdl": "CDL (ITD + CDL)", "cdl-ft": "DSM + CDL fine-tune",
                    "edm": "EDM", "stf": "EDM + STF (n 4096)", "sa2": "SA-2 (lambda 1)", "sa3": "SA-3 (lambda 0.3)",
                    "sa4": "SA-4 (lambda 0.2)", "fm": "FM (rectified flow)",
                    "fm-ot": "FM + OT (OT-CFM, blocks of 256)",
                    "fm-stf": "FM + STF (stable velocity, n 4096)", "fm-sa2": "FM + SA-2 (flow grid)"}


@dataclass
class StudyOptions:
    """Options common to every study (the ``difflab study`` flags)."""

    out: Path
    quick: bool = False
    seeds: int = 1
    objectives: list[str] | None = None  # None: the study's default set
    samplers: list[str] | None = None  # None: the study's default set
    budget_steps: int | None = None  # training steps per run (equal for every objective)
    budget_seconds: float | None = None  # or an equal wall-clock budget, converted to steps by a timing run
    picard_window: int | None = None  # the parallel sampler's window (0: the whole chain); None: the study's
    progress: bool = True
    threads: int | None = None  # torch CPU threads of every run (None: by the network: 1 for the MLP, the usable
    # cores for a U-Net; difflab.threads); runtime, like device
    device: str | None = None  # where the networks train (None: auto)
    overrides: dict = field(default_factory=dict)  # study-specific settings (tests use tiny ones)

    def validate(self, known_objectives, default=None, default_samplers=None) -> None:
        """Check the options; an unset objective list becomes ``default`` (all known objectives if None), an unset
        sampler list ``default_samplers`` (the four standard samplers if None)."""
        if self.objectives is None:
            self.objectives = list(default or known_objectives)
        if self.samplers is None:
            self.samplers = list(default_samplers or STANDARD_SAMPLERS)
        require(self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        for o in self.objectives:
            require(o in known_objectives, f"unknown objective {o!r} for this study: use {', '.join(known_objectives)}")
        for s in self.samplers:
            require(s in SAMPLERS, f"unknown study sampler {s!r}: use {', '.join(SAMPLERS)}")
        require(self.budget_steps is None or self.budget_steps >= 1, "--budget-steps must be >= 1")
        require(self.picard_window is None or self.picard_window >= 0, "--picard-window must be >= 0 (0: no window)")
        require(self.budget_seconds is None or self.budget_seconds > 0, "--budget-seconds must be > 0")
        require(self.threads is None or self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        require(self.budget_steps is None or self.budget_seconds is None,
                "give one of --budget-steps and --budget-seconds")


def versions() -> dict:
    import matplotlib
    import scipy

    return {"difflab": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def mean_std(values) -> dict:
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": v}


class Study:
    """A study's output folder: ``runs/`` (training runs), ``samples/`` (npz), ``cache/`` (metric JSON),
    figures, ``results.json`` and ``report.md``."""

    def __init__(self, name: str, opts: StudyOptions, arch: str = "mlp"):
        from difflab.threads import set_threads

        self.name, self.opts = name, opts
        self.threads = set_threads(opts.threads, arch)  # ``arch``: the study's network; its runs resolve the same
        self.out = Path(opts.out)
        from difflab.paths import check_writable

        check_writable(self.out, "--out", folder=True)
        for sub in ("runs", "samples", "cache"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()

    def pin_settings(self, settings: dict) -> None:
        """Refuse to mix settings in one folder: cached units are only valid for the settings that made them."""
        path = self.out / "cache" / "settings.json"
        now = json.loads(json.dumps(_jsonable(settings)))
        before = json.loads(path.read_text()) if path.exists() else {}
        diff = sorted(k for k in set(before) & set(now) if before[k] != now[k])  # new keys are new features
        require(not diff, f"{self.out} holds a {self.name} study with other settings ({', '.join(diff)}): "
                          "use another --out, or delete the folder to start over")
        write_json_atomic(path, {**before, **now})

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, msg: str) -> None:
        """Announce a stage on stdout, e.g. '[dino   12.3s] sample dsm-s0-ddpm: ...' (silent with --quiet)."""
        if self.opts.progress:
            print(f"[{self.name} {time.perf_counter() - self.started:7.1f}s] {msg}", flush=True)

    def progress(self, total: int | None, desc: str, unit: str = "step"):
        """A progress reporter for a long stage (a bar on a terminal, plain lines in a log; off with --quiet)."""
        from difflab.progress import progress

        return progress(total, desc, unit=unit, enabled=self.opts.progress, leave=False)

    # ------------------------------------------------------------------------------------------ cached units

    def cached(self, key: str, fn, what: str | None = None):
        """The JSON result of unit ``key``, computed by ``fn()`` once and then read back; ``what`` is logged (with
        the key) when the unit is computed, to say what a long stage is doing."""
        path = self.out / "cache" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if what:
            self.log(f"{key}: {what}")
        value = fn()
        write_json_atomic(path, value)
        return value

    def budget(self, base_overrides: list[str], objective: str, default_steps: int) -> int:
        """Training steps for one run: --budget-steps, or --budget-seconds converted by a 100-step timing run
        (cached, so a resumed study keeps the same step counts)."""
        if self.opts.budget_steps is not None:
            return self.opts.budget_steps
        if self.opts.budget_seconds is None:
            return default_steps

        def calibrate():
            from difflab.training import Trainer

            cfg = load_config(overrides=[*base_overrides, "train.steps=1000000"])
            trainer = Trainer(cfg, self.out / "runs" / ".calibration")
            trainer.train_step()
            t0 = time.perf_counter()
            for _ in range(100):
                trainer.train_step()
            return {"steps_per_s": 100 / (time.perf_counter() - t0)}

        rate = self.cached(f"calibration-{objective}", calibrate)["steps_per_s"]
        return max(1, int(rate * self.opts.budget_seconds))

    def train_run(self, key: str, overrides: list[str]) -> Path:
        """Train run ``key`` unless complete; resume it when a checkpoint exists."""
        run = self.out / "runs" / key
        cfg = load_config(overrides=overrides)
        done = list_checkpoints(run)
        if done and load_checkpoint(run)[1]["step"] >= cfg.train.steps:  # (the newest intact checkpoint)
            return run
        self.log(f"train {key} ({cfg.train.steps} steps)")
        runtime = {"threads": self.opts.threads, "device": self.opts.device}
        try:
            if done:
                train(None, run, resume=True, progress=self.opts.progress, **runtime)
            else:
                train(cfg, run, overwrite=True, progress=self.opts.progress, **runtime)
        except TrainingInterrupted as e:  # the study, not the inner run, is what to re-run: it resumes the run
            raise TrainingInterrupted(e.signum, e.step, run, again=f"difflab study {self.name} --out {self.out} "
                                      "(the same options; finished work is kept)") from None
        return run

    def train_objective(self, data: str, obj: str, seed: int, s: dict) -> Path:
        """The run of study objective ``obj`` for ``seed``: from scratch with the equal budget, or (``cdl-ft``) a
        fine-tune of the same seed's DSM run for ``s["ft_steps"]`` steps."""
        extra = list(s.get("train_overrides", []))

        def snapshots(steps: int) -> list[str]:  # keep evenly spaced checkpoints for the progress curves
            k = s.get("snapshots", 0)
            return [f"train.ckpt_every={max(1, steps // k)}", "train.keep_checkpoints=100000"] if k else []

        if obj in FINE_TUNES:
            target, base = FINE_TUNES[obj]
            base_run = self.train_objective(data, base, seed, s)
            return self.train_run(f"{obj}-s{seed}", [f'data.name="{data}"', f'objective.name="{target}"',
                                                     f"train.seed={seed}", f'train.init="{base_run}"',
                                                     f"train.steps={s['ft_steps']}", f"train.lr={s['ft_lr']}",
                                                     *snapshots(s["ft_steps"]), *extra])
        config = {**OBJECTIVE_CONFIG, **s.get("objective_config", {})}
        base = [f'data.name="{data}"', *config.get(obj, [f'objective.name="{obj}"']), f"train.seed={seed}"]
        steps = self.budget(base, obj, s["steps"])
        return self.train_run(f"{obj}-s{seed}", [*base, f"train.steps={steps}", *snapshots(steps), *extra])

    def sample(self, key: str, run: Path, sampler: str, n: int, seed: int = 0, chain_overrides: dict | None = None,
               parallel_overrides: dict | None = None, callback_mmd=None) -> tuple[torch.Tensor, dict]:
        """Samples of ``run`` with a study sampler, cached as ``samples/key.npz`` with their stats.

        ``callback_mmd(x) -> float`` (Picard only) records the metric of the end points after every sweep.
        """
        path = self.out / "samples" / f"{key}.npz"
        if path.exists():
            return load_samples(path)
        name, options, parallel = SAMPLERS[sampler]
        options = {**options, **(chain_overrides or {})}
        if parallel is not None:
            parallel = {**parallel, **(parallel_overrides or {})}
        if parallel is None:
            how = f"{name}-{options['steps']}"
        else:
            picard = PicardOptions.of(parallel)
            how = (f"parallel {name}-{options['steps']}, Picard tol {picard.tol:g}, "
                   f"window {picard.window or 'the whole chain'}")
        self.log(f"sample {key}: {n:,} samples, {how}")
        x, result = sample_with_curve(Run.load(run), name if parallel is None else f"picard-{name}", n, seed,
                                      parallel, callback_mmd, progress=self.opts.progress, metric_name="MMD",
                                      **options)
        save_samples(path, x, result)
        return x, result

    def twin(self, key: str, run: Path, sampler: str, n: int, seed: int = 0,
             chain_overrides: dict | None = None) -> torch.Tensor:
        """The sequential twin of a parallel study sampler's samples: the same chain and noise, step by step (cached
        as ``samples/key.npz``); the reference its pathwise distance is measured against."""
        path = self.out / "samples" / f"{key}.npz"
        if path.exists():
            return load_samples(path)[0]
        name, options, _ = SAMPLERS[sampler]
        options = {**options, **(chain_overrides or {})}
        self.log(f"sample {key}: {n:,} samples, sequential {name}-{options['steps']} (the parallel rows' twin)")
        x, result = sample_with_curve(Run.load(run), name, n, seed, None, progress=self.opts.progress, **options)
        save_samples(path, x, result)
        return x


def run_nll(run_dir: Path, x: torch.Tensor, n_alpha: int) -> dict:
    """-log p of x (N, *shape) under a run's EMA denoiser (nats, bits/dim) by the ITD estimator, with the
    Gaussian reference of the run's own training data."""
    from difflab.metrics.nll import itd_nll, nll_summary
    from difflab.objectives.itd import ITDLoss

    run = Run.load(run_dir)
    itd = ITDLoss().fit(run.training_data())
    return nll_summary(itd_nll(run.denoiser, x, itd, n_alpha=n_alpha), dim=x[0].numel())


def loss_curve(run_dir: Path) -> tuple[list, list]:
    """(steps, losses) of a run's log.jsonl (its loss records; periodic FID records are skipped)."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def sample_with_curve(run: Run, sampler: str, n: int, seed: int, parallel: dict | None = None, metric=None,
                      progress: bool = False, metric_name: str = "metric", **chain_options
                      ) -> tuple[torch.Tensor, dict]:
    """All n samples of a run in one block (so a parallel call's sweeps are the study's) and their stats record;
    with ``metric(x) -> float`` and a parallel sampler (picard-...), the metric of the end points after every
    sweep (the "metric per Picard iteration" curve, the record's ``curve``). ``progress``: report the sampling
    (steps, or sweeps and converged steps) and the curve's metric on stderr."""
    from difflab.progress import progress as progress_bar

    ends = []
    record = (lambda it, x, X: ends.append(x.clone())) if (metric and parallel is not None) else None
    x, stats = run.sample(n, seed, sampler, parallel=parallel, batch_size=n, callback=record, progress=progress,
                          local=True, **chain_options)
    curve = []
    with progress_bar(len(ends), f"{metric_name} per Picard sweep", unit="sweep", enabled=progress and bool(ends),
                      leave=False) as bar:
        for e in ends:
            curve.append(metric(e))
            bar.update(1)
    return x, {**stats.to_dict(), "curve": curve}


def write_outputs(study: Study, results: dict, render) -> Path:
    """results.json, then report.md rendered from it (the only source of the report's numbers)."""
    results = {"study": study.name, "options": _jsonable(asdict(study.opts)), "versions": versions(), **results}
    study.log(f"write results.json and report.md in {study.out}")
    write_json_atomic(study.out / "results.json", results, sort_keys=False)  # keep the rows' order
    report = study.out / "report.md"
    report.write_text(render(json.loads((study.out / "results.json").read_text())))
    return report


def _jsonable(d):
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    if isinstance(d, Path):
        return str(d)
    if isinstance(d, float) and not math.isfinite(d):
        return str(d)
    return d


def sci(x, digits: int = 2) -> str:
    """Scientific notation, as the report prints MMD values."""
    return "-" if x is None else f"{x:.{digits}e}"


def pm(stat: dict, f=None) -> str:
    """'mean +- std' of a :func:`mean_std` record (just the mean for a single value)."""
    f = f or sci
    return f"{f(stat['mean'])} +- {f(stat['std'])}" if stat["n"] > 1 else f(stat["mean"])


def fmt(x, digits: int = 3) -> str:
    """Numbers as the report prints them (scientific for small magnitudes)."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0 or 1e-2 <= abs(x) < 1e5:
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.{digits - 1}e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
