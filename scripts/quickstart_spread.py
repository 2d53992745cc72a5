"""How far a fresh run of the README's quick start may land: its three commands (train on the Dino, sample
DDPM-1000, MMD) for several training seeds at the default threads, and for seed 0 at other thread counts.

    python scripts/quickstart_spread.py [--objectives dsm,itd,cdl] [--seeds 0,1,2] [--threads 2] [--out runs/spread]
                                        [--json FILE]

Each run is exactly the README's commands with ``--seed S`` (and ``--threads T`` on the thread-count rows), so
the figures are what a user re-measures. Finished runs and sample files in ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from difflab.cli import main as difflab


def measure(out: Path, objective: str, seed: int, threads: list[str]) -> float:
    run = out / f"{objective}-s{seed}{'-t' + threads[1] if threads else ''}"
    if not _finished(run):
        assert difflab(["train", "--data", "dino", "--objective", objective, "--seed", str(seed), "--out", str(run),
                        "--overwrite", "--quiet", *threads]) == 0
    samples = run / "samples.npz"
    if not samples.exists():
        assert difflab(["sample", str(run), "--sampler", "ddpm", "--steps", "1000", "--n", "2000", "--seed", "0",
                        "--out", str(samples), "--quiet", *threads]) == 0
    from difflab.data import get_dataset
    from difflab.data.files import load_array
    from difflab.metrics import mmd

    return float(mmd(load_array(samples, key="samples"), get_dataset("dino").eval_data(None, 1), 0.03))


def _cpu() -> str:
    """The CPU's model name (Linux), else the machine type."""
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        return names[0] if names else platform.machine()
    except OSError:
        return platform.machine()


def _finished(run: Path) -> bool:
    from difflab.training.checkpoint import list_checkpoints, load_checkpoint

    return bool(list_checkpoints(run)) and load_checkpoint(run)[1]["step"] >= 6000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", default="dsm", help="comma-separated: dsm, itd, cdl (the rows of docs/safety.md)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", default="2", help="other thread counts for seed 0 (comma-separated; '' for none)")
    p.add_argument("--out", default="runs/spread")
    p.add_argument("--json", default="docs/quickstart_spread.json",
                   help="the result file; the rows of objectives not measured in this call are kept")
    a = p.parse_args()
    out = Path(a.out)
    old = json.loads(Path(a.json).read_text()) if Path(a.json).exists() else {}
    res = {**old, "command": "difflab train --data dino --objective OBJECTIVE --seed S; difflab sample --sampler ddpm "
                      "--steps 1000 --n 2000 --seed 0; difflab eval --metric mmd",
           "machine": {"cpu": _cpu(), "cores": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                       "torch": torch.__version__}}
    for obj in a.objectives.split(","):
        seeds = {int(s): measure(out, obj, int(s), []) for s in a.seeds.split(",")}
        others = {int(t): measure(out, obj, 0, ["--threads", t]) for t in a.threads.split(",") if t}
        v = list(seeds.values())
        res[obj] = {"mmd_by_seed": {str(k): x for k, x in seeds.items()}, "mean": statistics.mean(v),
                    "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                    "seed0_by_threads": {"default (1)": seeds.get(0), **{str(k): x for k, x in others.items()}}}
    Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
