"""A study's output folder of cached units, and the rule that report.md is rendered from results.json (so every
number in the report is one in the JSON).

A study is resumable: each unit (a training run, a sample set, a metric) is written atomically once complete, and a
re-run with the same ``--out`` skips every complete unit (a partly trained run resumes from its checkpoint).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from difflab import __version__
from difflab.config import load_config
from difflab.errors import require
from difflab.runs import Run, load_samples, save_samples
from difflab.samplers import PicardOptions
from difflab.studies.common import FINE_TUNES, OBJECTIVE_CONFIG, SAMPLERS, StudyOptions
from difflab.studies.measures import sample_with_curve
from difflab.training import TrainingInterrupted, train
from difflab.training.checkpoint import list_checkpoints, load_checkpoint, write_json_atomic


class Study:
    """A study's output folder: ``runs/`` (training runs), ``samples/`` (npz), ``cache/`` (metric JSON),
    figures, ``results.json`` and ``report.md``."""

    def __init__(self, name: str, opts: StudyOptions, arch: str = "mlp"):
        from difflab.threads import set_threads

        self.name, self.opts = name, opts
        self.again = f"difflab study {name} --out {opts.out} (the same options; finished work is kept)"  # (to resume)
        self.threads = set_threads(opts.threads, arch)  # ``arch``: the study's network; its runs resolve the same
        self.out = Path(opts.out)
        from difflab.paths import check_writable

        check_writable(self.out, "--out", folder=True)
        for sub in ("runs", "samples", "cache"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        from difflab.training.distributed import resolve_device

        # where runs sample: the CPU unless --device is given (training follows --device, or auto, either way)
        self.sample_device = torch.device("cpu") if opts.device is None else resolve_device(opts.device)

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

    def load(self, run: Path) -> Run:
        """A trained run (its EMA weights) on the device the study samples on."""
        return Run.load(run, device=self.sample_device)

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
            raise TrainingInterrupted(e.signum, e.step, run, again=self.again) from None
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
        x, result = sample_with_curve(self.load(run), name if parallel is None else f"picard-{name}", n, seed,
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
        x, result = sample_with_curve(self.load(run), name, n, seed, None, progress=self.opts.progress, **options)
        save_samples(path, x, result)
        return x


def write_outputs(study: Study, results: dict, render) -> Path:
    """results.json, then report.md rendered from it (the only source of the report's numbers)."""
    results = {"study": study.name, "options": _jsonable(asdict(study.opts)), "versions": versions(), **results}
    study.log(f"write results.json and report.md in {study.out}")
    return write_report(study.out, results, render)


def write_report(out: Path, results: dict, render) -> Path:
    """``out/results.json``, then ``out/report.md`` rendered from the file just written (so the report shows what
    the JSON holds), each replaced atomically; returns report.md's path."""
    from difflab.atomic import write_bytes_atomic

    write_json_atomic(out / "results.json", results, sort_keys=False)  # keep the rows' order
    return write_bytes_atomic(out / "report.md", render(json.loads((out / "results.json").read_text())).encode())


def versions() -> dict:
    """The versions of difflab and what it runs on (recorded in results.json)."""
    import matplotlib
    import scipy

    return {"difflab": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "matplotlib": matplotlib.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


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


class Units:
    """What a study's per-run units add up to, filled objective by objective, seed by seed: ``rows`` (a list, one
    per result row) and any table by name, a dict made on first use (``u.nll[key] = value``)."""

    def __init__(self):
        self.rows: list = []

    def __getattr__(self, name: str) -> dict:
        if name.startswith("__"):  # (copy, pickle and friends probe dunders: not tables)
            raise AttributeError(name)
        table = self.__dict__[name] = {}
        return table
