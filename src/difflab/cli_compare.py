"""``difflab compare``: which objective helps on my data? Objectives x seeds (x a small grid) with an equal budget,
run as independent units by local processes or a SLURM job array (:mod:`difflab.studies.compare`)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """every unit (objective x grid point x seed) trains with the same budget, samples with each sampler that
suits the data (flat: DDPM-1000, DDIM-50, Heun-18; images: DDIM-50, Heun-18) and is scored against the data (flat:
MMD; labelled images: a classifier Frechet distance; other images: the FID), with few-step rows and training
curves. The report ranks the objectives per sampler with the seed spread and a paired t-test over seeds against the
best. Units are cached in --out: re-running the same command skips finished units and resumes a killed one from its
checkpoint; --report rebuilds the report from the finished units.
examples:
  difflab compare --data dino --objectives dsm,edm,stf,sa2,fm,fm-stf --seeds 3 --out runs/cmp --jobs 2
  difflab compare --data data.npy --objectives dsm,fm --grid train.lr=1e-3,3e-4 --budget-steps 5000 --out runs/g
  difflab compare --data digits --objectives dsm,stf,sa2 --seeds 2 --out runs/cmp-digits --jobs 2
  difflab compare --data cifar10:/shared/cifar-10-python.tar.gz --objectives dsm,edm,stf,sa2,fm --seeds 3 \\
      --set model.preset=cifar10 --budget-steps 200000 --features inception --device cuda --threads 0 \\
      --executor slurm --slurm-partition gpu --gpus-per-task 1 --time-min 1440 --out /shared/cmp-cifar
  difflab compare --out runs/cmp --report      # rebuild report.md from the finished units"""


def names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def options_from_args(a: argparse.Namespace):
    """The :class:`~difflab.studies.compare.CompareOptions` the parsed flags ask for."""
    from difflab.executors import ExecutorOptions
    from difflab.studies.compare import CompareOptions

    executor = ExecutorOptions(kind=a.executor, jobs=a.jobs, partition=a.slurm_partition,
                               gpus_per_task=a.gpus_per_task, cpus_per_task=a.cpus_per_task,
                               array_parallelism=a.array_parallelism, time_min=a.time_min, mem_gb=a.mem_gb,
                               account=a.slurm_account, qos=a.slurm_qos, constraint=a.slurm_constraint,
                               retries=a.retries)
    opts = CompareOptions(data=a.data, out=Path(a.out), seeds=a.seeds, overrides=list(a.set or []),
                          grid=list(a.grid or []), budget_steps=a.budget_steps, budget_seconds=a.budget_seconds,
                          samplers=names(a.samplers), n_samples=a.n_samples, n_ref=a.n_ref, features=a.features,
                          inception=a.inception, threads=a.threads, device=a.device, progress=not a.quiet,
                          executor=executor, procs_per_unit=a.procs_per_unit or max(1, a.gpus_per_task))
    if a.objectives:
        opts.objectives = names(a.objectives)
    return opts


def cmd_compare(a: argparse.Namespace) -> dict:
    from difflab.errors import require
    from difflab.paths import check_writable
    from difflab.studies.compare import compare
    from difflab.studies.compare_report import build_report

    out = Path(a.out)
    if not a.report:
        require(a.data is not None, "difflab compare needs --data SPEC (e.g. dino, data.npy, digits, folder:PATH), "
                                    "or --report to rebuild the report of --out")
        check_writable(out, "--out", folder=True)
    report = build_report(out) if a.report else compare(options_from_args(a))
    return {"report": str(report), "results": str(out / "results.json")}


def add_parser(sub) -> None:
    """The ``compare`` sub-command on the CLI's sub-parsers."""
    from difflab.cli_common import command_ends
    from difflab.executors import KINDS
    from difflab.studies.compare import DEFAULT_OBJECTIVES, known_objectives

    p = sub.add_parser("compare", help="which objective helps on my data: objectives x seeds, ranked, locally or "
                                       "on a SLURM cluster", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="data spec: a toy set (dino, moons, ...), a .npy/.npz/.csv file, digits, "
                                  "folder:PATH, images:PATH, cifar10:PATH, zip:PATH")
    p.add_argument("--out", required=True, help="shared output folder (plan, runs, unit results, report.md)")
    p.add_argument("--objectives", help=f"comma-separated, from: {', '.join(known_objectives())} (stf: EDM + STF, "
                                        f"saK: SA-K, fm-stf: stable velocity)   [{','.join(DEFAULT_OBJECTIVES)}]")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per objective   [3]")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="a config override shared by every run (repeatable), e.g. model.preset=small")
    p.add_argument("--grid", action="append", metavar="SECTION.KEY=V1,V2",
                   help="a small hyper-parameter grid (repeatable: the product), e.g. train.lr=1e-3,3e-4")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--budget-steps", type=int, help="training steps per run   [3000 flat data; 800 images]")
    g.add_argument("--budget-seconds", type=float, help="or an equal wall-clock budget per run (steps from a "
                                                        "100-step timing run of each objective)")
    p.add_argument("--samplers", help="comma-separated study samplers   [flat: ddpm,ddim,heun; images: ddim,heun]")
    p.add_argument("--n-samples", type=int, help="samples per sampler   [2000 flat; 500 images]")
    p.add_argument("--n-ref", type=int, help="reference points or images the samples are scored against (all the "
                                             "images when the set has fewer)   [8000 flat; 10000 images]")
    p.add_argument("--features", choices=("mmd", "classifier", "inception"),
                   help="the score: mmd (flat data), classifier (a classifier Frechet distance, labelled images) "
                        "or inception (the FID)   [by the data]")
    p.add_argument("--inception", help="Inception TorchScript file for --features inception   [$DIFFLAB_INCEPTION "
                                       "or difflab[fid]]")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of every unit (0: by the network); "
                                                          "the same for any --jobs, so the numbers are too   [1]")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N: where the units train and sample   [auto]")
    p.add_argument("--procs-per-unit", type=int, help="processes per unit under torchrun (a multi-GPU unit)   "
                                                      "[--gpus-per-task, or 1]")
    p.add_argument("--report", action="store_true", help="only rebuild report.md and results.json of --out from its "
                                                         "finished units")
    e = p.add_argument_group("executor (where the units run)")
    e.add_argument("--executor", choices=KINDS, default="local",
                   help="local: processes on this machine; slurm: one SLURM job array (submitit, pip install "
                        "'difflab[cluster]'); submitit-local / submitit-debug: submitit's own local executors, to "
                        "try the job array on one machine   [local]")
    e.add_argument("--jobs", type=int, default=1, help="local: units run at once   [1]")
    e.add_argument("--retries", type=int, default=1, help="resubmissions of a failed unit (it resumes from its "
                                                          "checkpoint)   [1]")
    e.add_argument("--slurm-partition", help="slurm: the partition")
    e.add_argument("--gpus-per-task", type=int, default=0, help="slurm: GPUs per unit (more than 1: torchrun inside "
                                                                "the task)   [0]")
    e.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per unit   [SLURM's default]")
    e.add_argument("--array-parallelism", type=int, default=64, help="slurm: array tasks running at once   [64]")
    e.add_argument("--time-min", type=int, default=240, help="slurm: time limit per task in minutes (a task that "
                                                             "hits it is requeued and resumes)   [240]")
    e.add_argument("--mem-gb", type=int, help="slurm: memory per task in GB   [SLURM's default]")
    e.add_argument("--slurm-account", help="slurm: the account to charge")
    e.add_argument("--slurm-qos", help="slurm: the quality of service")
    e.add_argument("--slurm-constraint", help="slurm: a node feature constraint, e.g. a100")
    command_ends(p, cmd_compare, "where the report is", quiet="no progress output")
