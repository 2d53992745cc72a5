"""``difflab info``: what a run is, without training or sampling it: its kind, step, resolved config, example
shape, parameter count, data, threads, parametrisation and schedule, and what it can be sampled with."""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
from pathlib import Path

from difflab.errors import require


def run_kind(path: Path) -> str:
    """What ``path`` is, told by its files as :meth:`difflab.runs.Run.load` tells them."""
    from difflab.imports.diffusers_folder import is_diffusers_folder
    from difflab.runs import is_exported
    from difflab.training.checkpoint import STATE, WEIGHTS

    if is_diffusers_folder(path):
        return "diffusers import"
    if is_exported(path):
        return "exported"
    if path.is_file():
        return "EDM snapshot" if path.suffix == ".pkl" else "state dict"
    if (path / STATE).exists() or (path / WEIGHTS).exists():
        return "checkpoint"
    return "training run"


def default_steps(T: int) -> dict[str, int]:
    """Each sequential sampler's default number of steps (ddpm: the run's schedule length T)."""
    from difflab.samplers import SEQUENTIAL

    return {name: inspect.signature(fn).parameters["steps"].default or T for name, fn in SEQUENTIAL.items()}


def threads_record(run) -> int | None:
    """The CPU threads the run trained with: its checkpoint's ``threads``, else the resolved ``train.threads`` of
    its config (0, the unresolved default, in runs saved before threads were recorded); None where not recorded."""
    if run.state.get("threads") is not None:
        return run.state["threads"]
    return run.config.train.threads or None


def progress(run, kind: str, path: Path) -> tuple[bool | None, str, Path | None]:
    """(finished, a status line, the run folder) of a training run or checkpoint; (None, ..., None) for imports."""
    from difflab.training.checkpoint import list_checkpoints

    step, steps = run.step, run.config.train.steps
    if kind not in ("training run", "checkpoint"):
        data = "" if run.config.data.name else " --data DATA"
        return None, (f"{kind}{f' at step {step}' if step else ''}: difflab train --init {shlex.quote(str(path))}"
                      f"{data} fine-tunes it"), None
    folder = path if kind == "training run" else path.parent.parent if path.parent.name == "checkpoints" else None
    if step >= steps:
        return True, "finished", folder
    if folder is None:
        return False, f"at step {step} of {steps} (a checkpoint outside its run folder)", None
    newest = list_checkpoints(folder)[-1:] if kind == "checkpoint" else []
    if newest and int(newest[0].name.removeprefix("step-")) > step:
        return False, f"at step {step} of {steps} (the run has a newer checkpoint: difflab info {folder})", folder
    return False, f"at step {step} of {steps}: difflab train --out {shlex.quote(str(folder))} --resume continues", \
        folder


def describe(path: Path) -> dict:
    """Everything ``difflab info`` reports about the run in ``path`` (its EMA weights are loaded on the CPU)."""
    from difflab.models import arch_for
    from difflab.runs import Run
    from difflab.training.checkpoint import checkpoint_dir

    require(path.exists(), f"no such run: {path} (give a run folder made by 'difflab train', a checkpoint folder, an "
                           "exported folder, a diffusers folder or a state-dict file with run.json beside it)")
    kind = run_kind(path)
    run = Run.load(path, ema=True)
    cfg = run.config
    finished, status, folder = progress(run, kind, path)
    K = run.num_classes
    samplers = default_steps(cfg.schedule.T)
    flow = run.precond == "flow"
    if not flow:  # (a flow sampler starts at pure noise, which only a flow-matching model can take)
        samplers = {k: v for k, v in samplers.items() if not k.startswith("flow-")}
    suggested = "flow-euler" if flow else "ddim" if run.precond in ("eps", "eps-continuous", "x0", "v") else "heun"
    command = f"difflab sample {shlex.quote(str(path))} --sampler {suggested} --steps {samplers[suggested]} --n 2000"
    if K:
        command += " --class all"
    threads = threads_record(run)
    s = cfg.schedule
    return {
        "run": str(path), "kind": kind,
        "checkpoint": str(checkpoint_dir(path, run.step)) if kind == "training run" else None,
        "step": run.step, "steps": cfg.train.steps, "finished": finished, "status": status,
        "data": cfg.data.name or None, "shape": list(run.shape),
        "parameters": sum(p.numel() for p in run.denoiser.parameters()),
        "arch": arch_for(cfg, run.shape), "objective": cfg.objective.name, "precond": run.precond,
        "schedule": f"flow matching, x_t = (1 - t) x0 + t n, sampler shift {s.shift:g}" if flow else
                    f"{s.kind}, T={s.T}, beta {s.beta_start:g}..{s.beta_end:g}",
        "conditional": K > 0, "num_classes": K,
        "threads": threads if threads is not None else "not recorded",
        "samplers": samplers, "parallel": [f"picard-{name}" for name in samplers],
        "class_options": (["--class K|all|random", "--guidance W"]
                          + (["--null-class N"] if cfg.model.arch == "diffusers" else [])) if K else [],
        "sample_command": command,
        "config": cfg.to_dict(),
    }


def flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"a": {"b": 1}}`` as ``[("a.b", 1)]`` (free-form tables such as model.unet stay one value)."""
    items = []
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            items += flatten(v, f"{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def show(info: dict) -> None:
    """The human layout: one fact a line, then the config as section.key = value."""
    K = info["num_classes"]
    steps = ", ".join(f"{n} ({s})" for n, s in info["samplers"].items())
    lines = [
        f"run: {info['run']} ({info['kind']})",
        *([f"checkpoint: {info['checkpoint']}"] if info["checkpoint"] else []),
        f"step: {info['step']} (train.steps {info['steps']})",
        f"status: {info['status']}",
        f"data: {info['data'] or 'none recorded (an imported model)'}",
        f"shape: {tuple(info['shape'])}",
        f"parameters: {info['parameters']:,}",
        f"network: {info['arch']}, precond {info['precond']}, objective {info['objective']}",
        f"schedule: {info['schedule']}",
        f"conditional: {f'yes, {K} classes' if K else 'no'}",
        f"threads: {info['threads']}",
        f"samplers (default steps): {steps}",
        "parallel: picard-<sampler> (e.g. picard-ddpm)",
        *([f"class options: {' '.join(info['class_options'])}"] if K else []),
        f"sample: {info['sample_command']}",
        "config:",
        *(f"  {k} = {json.dumps(v)}" for k, v in flatten(info["config"])),
    ]
    print("\n".join(lines))


def cmd_info(a: argparse.Namespace) -> dict | None:
    info = describe(Path(a.run))
    if a.json:
        return info
    show(info)
    return None


def add_parser(sub) -> None:
    """The ``info`` sub-command on the CLI's sub-parsers."""
    from difflab.cli_common import command_ends

    i = sub.add_parser("info", help="show a run: its config, step, parameters, data and what samples it")
    i.add_argument("run", help="run folder (its newest checkpoint), a checkpoint folder, an exported folder, a "
                               "diffusers folder, or a state-dict file with run.json beside it")
    command_ends(i, cmd_info, "the facts")
