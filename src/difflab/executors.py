"""Run independent units of work, ``fn(unit)`` for each unit, on an existing engine: the standard library's process
pool (``kind="local"``), or submitit (``"slurm"``: one SLURM job array, one task per unit; ``"submitit-local"`` and
``"submitit-debug"``: the same array on this machine, in subprocesses or in this process).

Units must be idempotent (a unit resumes from its own checkpoints when run again): a failed unit (an exception, a
killed process) runs again up to ``retries`` times, and SLURM requeues a pre-empted or timed-out task
(:class:`Requeueable`). ``fn`` and the units are pickled: ``fn`` a module-level function of a module the workers
can import (both engines pickle functions by reference), each unit a small value (a dict naming it, a number).
submitit is optional (the ``cluster`` extra) and imported only for its kinds."""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError, Interrupted, require, suggest
from difflab.extras import require_module

KINDS = ("local", "slurm", "submitit-local", "submitit-debug")


@dataclass
class ExecutorOptions:
    """Where and how :func:`run_units` runs its units. ``kind``: one of :data:`KINDS`; ``jobs``: local worker
    processes (1: one unit after another in this process); ``folder``: submitit's logs and pickles (e.g. OUT/jobs;
    created; on SLURM a folder every node sees). The rest is per SLURM task (one unit): ``partition`` (None: the
    cluster's default), ``gpus_per_task``, ``cpus_per_task``, ``array_parallelism`` (tasks running at once),
    ``time_min`` (time limit in minutes, then the task is requeued; submitit-local's too), ``mem_gb``,
    ``account``/``qos``/``constraint``, ``sbatch`` (more options, e.g. ``{"mail-type": "END"}``). ``retries``: times
    a failed unit runs again. (submitit-local starts every unit at once and shows each the same first
    ``gpus_per_task`` GPUs.)"""

    kind: str = "local"
    jobs: int = 1
    folder: Path | None = None
    partition: str | None = None
    gpus_per_task: int = 0
    cpus_per_task: int | None = None
    array_parallelism: int = 64
    time_min: int = 240
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    sbatch: dict = field(default_factory=dict)
    retries: int = 1

    def validate(self) -> ExecutorOptions:
        """Raise a one-line :class:`DifflabError` naming the first bad value and its fix; returns self."""
        require(self.kind in KINDS, f"executor {self.kind!r} is not one of {', '.join(KINDS)}"
                                    f"{suggest(self.kind, KINDS)}")
        for name, low, fix in (("jobs", 1, "1 runs the units one after another in this process"),
                               ("retries", 0, "0 runs each unit once"), ("time_min", 1, "a time limit in minutes"),
                               ("gpus_per_task", 0, "0 for none"), ("array_parallelism", 1, "tasks running at once")):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                    f"{name}={value!r}: give a whole number of at least {low} ({fix})")
        require(self.cpus_per_task is None or (isinstance(self.cpus_per_task, int) and self.cpus_per_task >= 1),
                f"cpus_per_task={self.cpus_per_task!r}: give at least 1, or None for the cluster's default")
        require(self.mem_gb is None or (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0),
                f"mem_gb={self.mem_gb!r}: give a positive number of GB, or None for the cluster's default")
        require(isinstance(self.sbatch, dict) and all(isinstance(k, str) for k in self.sbatch),
                f"sbatch={self.sbatch!r}: give a dict of sbatch options, e.g. {{'mail-type': 'END'}}")
        require(self.kind == "local" or self.folder is not None,
                f"--executor {self.kind} needs a folder for submitit's logs and pickles (e.g. OUT/jobs)")
        return self


class UnitsFailed(DifflabError):
    """Units still failing after their retries: ``failed`` (their labels) and ``results`` (every unit's, in order;
    None for a failed one)."""

    def __init__(self, message: str, failed: list[str], results: list) -> None:
        super().__init__(message)
        self.failed, self.results = failed, results


class Requeueable:
    """``fn`` as a submitit task that SLURM requeues when pre-empted or timed out: submitit calls ``checkpoint``
    with the task's arguments and resubmits the call it returns, the same one (a unit resumes from its own
    checkpoints)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def checkpoint(self, *args: Any):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args)


def slurm_parameters(opts: ExecutorOptions) -> dict:
    """``opts`` as keyword arguments of submitit's ``SlurmExecutor.update_parameters``: one task per unit (a
    multi-GPU unit starts torchrun itself), on one node."""
    mem = None if opts.mem_gb is None else (f"{int(opts.mem_gb)}GB" if opts.mem_gb == int(opts.mem_gb)
                                            else f"{int(opts.mem_gb * 1024)}MB")  # a bare number would be MB
    params = {"job_name": "difflab", "nodes": 1, "ntasks_per_node": 1, "time": opts.time_min,
              "array_parallelism": opts.array_parallelism, "gpus_per_task": opts.gpus_per_task or None,
              "cpus_per_task": opts.cpus_per_task, "partition": opts.partition, "mem": mem, "account": opts.account,
              "qos": opts.qos, "constraint": opts.constraint, "additional_parameters": dict(opts.sbatch) or None}
    return {k: v for k, v in params.items() if v is not None}


def _print(message: str) -> None:
    print(message, flush=True)


def _last_line(text: str, limit: int = 200) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else "(no message)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _reason(err: BaseException) -> str:
    """The last line of an exception's traceback (``ValueError: ...``)."""
    return _last_line("".join(traceback.format_exception_only(type(err), err)))


class _Progress:
    """Every unit's result, tries and failure, told to ``log`` as they come."""

    def __init__(self, labels: list[str], retries: int, log: Callable[[str], None]) -> None:
        self.labels, self.retries, self.log = labels, retries, log
        self.results: list = [None] * len(labels)
        self.tries, self.failures, self.finished = [0] * len(labels), {}, 0

    def done(self, i: int, result: Any) -> None:
        self.results[i], self.finished = result, self.finished + 1
        self.log(f"unit {self.finished}/{len(self.labels)} done: {self.labels[i]}")

    def failed(self, i: int, reason: str, logs: str = "") -> bool:
        """Count a failed try of unit ``i``; True when it is to run again."""
        self.tries[i] += 1
        if self.tries[i] <= self.retries:
            self.log(f"unit {self.labels[i]} failed ({reason}): resubmitting it, try {self.tries[i] + 1} of "
                     f"{self.retries + 1}")
            return True
        self.finished += 1
        self.failures[i] = reason + logs
        self.log(f"unit {self.finished}/{len(self.labels)} failed: {self.labels[i]}: {reason}{logs}")
        return False

    def outcome(self) -> list:
        if not self.failures:
            return self.results
        failed = [self.labels[i] for i in sorted(self.failures)]
        tries = f"{self.retries + 1} tries each" if self.retries else "1 try"
        raise UnitsFailed(f"{len(failed)} of {len(self.labels)} units failed ({tries}): "
                          + "; ".join(f"{self.labels[i]}: {self.failures[i]}" for i in sorted(self.failures)),
                          failed, self.results)


def run_units(fn: Callable[[Any], Any], units: list, labels: list[str], opts: ExecutorOptions,
              log: Callable[[str], None] = _print) -> list:
    """``[fn(unit) for unit in units]`` on the engine ``opts`` names, each failed unit run again up to
    ``opts.retries`` times; ``labels``: one name per unit for ``log`` and errors. Returns the results in the units'
    order, or raises one :class:`UnitsFailed` (a DifflabError) naming every unit still failing, with the last line
    of its error (and its submitit logs), once every other unit has finished (their results on the error)."""
    opts.validate()
    require(len(labels) == len(units), f"{len(units)} units but {len(labels)} labels: give one label per unit")
    submitit = None if opts.kind == "local" else require_module("submitit", f"--executor {opts.kind}")
    progress = _Progress(list(labels), opts.retries, log)
    if not units:
        return []
    if submitit is not None:
        _run_submitit(submitit, fn, units, opts, progress)
    elif opts.jobs == 1:
        log(f"running {len(units)} units one after another in this process")
        for i, unit in enumerate(units):
            while True:
                try:
                    result = fn(unit)
                except Interrupted:  # stopped on purpose (SIGTERM, Ctrl-C): ends the run, never retried
                    raise
                except Exception as e:
                    if progress.failed(i, _reason(e)):
                        continue
                else:
                    progress.done(i, result)
                break
    else:
        _run_pool(fn, units, opts.jobs, progress)
    return progress.outcome()


def _run_pool(fn: Callable, units: list, jobs: int, progress: _Progress) -> None:
    """At most ``jobs`` units at once in a pool of ``jobs`` spawned processes. A worker that dies (killed, e.g. by
    the OOM killer) breaks the pool: a fresh one runs the units it lost. One lost unit ran alone: its try counts.
    Several: we cannot tell which died, so they run again one at a time, without counting, until each is settled."""
    jobs = min(jobs, len(units))
    progress.log(f"running {len(units)} units in {jobs} local processes")
    todo, running, suspects, pool = deque(range(len(units))), {}, set(), None
    try:
        while todo or running:
            pool, broken = pool or ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")), False
            try:
                while todo and len(running) < (1 if suspects else jobs):
                    running[pool.submit(fn, units[todo[0]])] = todo[0]
                    todo.popleft()
            except BrokenProcessPool:  # it broke after the last wait
                broken = True
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            if broken or any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                done = wait(running).done  # a broken pool fails every future it holds
                pool.shutdown()
                pool = None
            lost = []
            for f in done:
                i, err = running.pop(f), f.exception()
                if isinstance(err, BrokenProcessPool):
                    lost.append(i)
                    continue
                suspects.discard(i)
                if isinstance(err, Interrupted):
                    raise err
                if err is None:
                    progress.done(i, f.result())
                elif progress.failed(i, _reason(err)):
                    todo.append(i)
            if len(lost) == 1:
                suspects.discard(lost[0])
                if progress.failed(lost[0], "its process died or was killed"):
                    todo.appendleft(lost[0])
            elif lost:
                progress.log(f"a worker process died (killed?) while {len(lost)} units ran: running them again one "
                             f"at a time ({', '.join(progress.labels[i] for i in lost)})")
                suspects.update(lost)
                todo.extendleft(sorted(lost, reverse=True))
    except BaseException:  # Ctrl-C, SIGTERM, an interrupted unit: stop the others at their next checkpoint
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()  # SIGTERM: a training unit checkpoints and stops, any other stage just ends
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def _run_submitit(submitit, fn: Callable, units: list, opts: ExecutorOptions, progress: _Progress) -> None:
    """One job array of ``Requeueable(fn)``, one task per unit; a failed unit is resubmitted as a job of its own."""
    folder = Path(opts.folder)
    folder.mkdir(parents=True, exist_ok=True)
    if opts.kind == "slurm":
        try:
            executor = submitit.SlurmExecutor(folder)
        except RuntimeError as e:  # no srun on this machine
            raise DifflabError(f"--executor slurm: {_last_line(str(e))} (run it where sbatch and srun work, or "
                               "try --executor submitit-local)") from None
        executor.update_parameters(**slurm_parameters(opts))
    elif opts.kind == "submitit-local":  # CUDA_VISIBLE_DEVICES=0..gpus_per_task-1 in every task, none for 0
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=opts.time_min, gpus_per_node=opts.gpus_per_task, tasks_per_node=1)
    else:
        executor = submitit.DebugExecutor(folder)
    debug, task = opts.kind == "submitit-debug", Requeueable(fn)

    def started(jobs: list) -> list:
        for job in jobs:  # a local task's result is in place before its process ends: no 15 s wait for a slow disk
            if opts.kind == "submitit-local":
                job._results_timeout_s = 0
        ids = list(dict.fromkeys(job.job_id.split("_")[0] for job in jobs))
        progress.log(f"submitted {len(jobs)} unit(s) to {opts.kind}: job {', '.join(ids[:3])}"
                     f"{', ...' if len(ids) > 3 else ''}; logs in {folder}")
        return jobs

    pending = list(zip(started(executor.map_array(task, units)), range(len(units)), strict=True))
    try:
        _wait_jobs(executor, task, units, pending, opts, progress, started)
    except BaseException:  # Ctrl-C, SIGTERM: cancel the tasks, so a re-run never trains a unit twice at once
        if not debug:
            for job, _ in pending:
                job.cancel(check=False)
            progress.log(f"cancelled {len(pending)} unfinished task(s); the same command resumes them")
        raise


def _wait_jobs(executor, task, units: list, pending: list, opts: ExecutorOptions, progress: _Progress,
               started: Callable) -> None:
    """Collect the jobs of ``pending`` ([(job, unit index)], emptied as they end), resubmitting failed units."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    debug = opts.kind == "submitit-debug"
    while pending:
        # DebugJob.done() runs the unit and, on an exception, opens pdb: there exception() runs it, pdb-free
        for job, i in [(job, i) for job, i in pending if debug or job.done()]:
            pending.remove((job, i))
            err = job.exception()
            if err is None:
                progress.done(i, job.result())
                continue
            if isinstance(err, Interrupted):  # submitit-debug: stopped on purpose, never retried (as locally)
                raise err
            if isinstance(err, FailedJobError):  # the task's traceback between two rules (else the whole message)
                reason = _last_line(str(err).split("-" * 22 + "\n")[1 if "-" * 22 + "\n" in str(err) else 0])
            elif isinstance(err, UncompletedJobError):
                reason = f"no result: its process died or was killed; submitit state {job.state}"
            else:  # submitit-debug: the unit's own exception
                reason = _reason(err)
            logs = f" (logs {job.paths.stdout}, {job.paths.stderr})" if job.paths.stdout.exists() else ""
            if progress.failed(i, reason, logs):
                pending.append((started([executor.submit(task, units[i])])[0], i))
        if pending:
            time.sleep(1.0 if opts.kind == "slurm" else 0.1)
