"""Cost of a CDL training step against a DSM step at equal batch size on the Dino MLP, side by side in one run.

Variants timed (repeats alternate, medians reported as ratios to DSM):
  dsm            the DDPM eps loss
  itd            the standard term CDL is added to
  cdl            difflab's defaults: 8 CDL examples x 32 log-SNR draws, both estimates in one batched pass
                 sharing alpha and eps
  cdl-reference  the reference code's settings: 2 CDL examples x B log-SNR draws, independent noise

    python benchmarks/cdl_cost.py [--batch 1024] [--steps 30] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from difflab.config import load_config
from difflab.training import Trainer

VARIANTS = {
    "dsm": ('objective.name="dsm"',),
    "itd": ('objective.name="itd"',),
    "cdl": ('objective.name="cdl"',),
    "cdl-reference": ('objective.name="cdl"', "objective.options.n_cdl=2", "objective.options.n_alpha={B}",
                      "objective.options.common_noise=false"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    trainers = {}
    for name, over in VARIANTS.items():
        cfg = load_config(overrides=[*(o.format(B=a.batch) for o in over), f"train.batch_size={a.batch}",
                                     "train.steps=1000000"])
        trainers[name] = Trainer(cfg, "/tmp/difflab-bench-unused")
        for _ in range(3):
            trainers[name].train_step()  # warm-up
    times = {k: [] for k in trainers}
    for _ in range(a.repeats):
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                tr.train_step()
            times[name].append((time.perf_counter() - t0) / a.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"batch": a.batch, "threads": torch.get_num_threads(), "ms_per_step": {k: v * 1e3 for k, v in med.items()},
              "ratio_to_dsm": {k: v / med["dsm"] for k, v in med.items()}}
    if a.json:
        print(json.dumps(result))
        return
    print(f"batch {a.batch}, torch threads {result['threads']}: time per training step and ratio to DSM")
    for k in trainers:
        print(f"  {k:14s} {result['ms_per_step'][k]:8.2f} ms   {result['ratio_to_dsm'][k]:5.2f}x")


if __name__ == "__main__":
    main()
