"""Sampler state in float32 against float64, side by side in one run: what ``--state-dtype auto`` rests on.

The networks run in float32 either way; the state dtype sets the sampler's own arithmetic (the steps' affine
combinations, Picard's buffers, cumulative sums and TAA's history) and a cast at each network call. Sequential
DDPM and Picard DDPM (TAA with the extrapolated start) on a freshly initialised Dino MLP (2-D, 4,096 samples) and
a small U-Net on 8x8 images (64 samples), each timing repeated and interleaved; the ratio is float64 time /
float32 time (above 1: float32 is faster).

    python benchmarks/state_dtype.py [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from difflab.config import load_config
from difflab.models import build_denoiser
from difflab.samplers import make_chain, sample_chain

CASES = {  # name: (overrides, shape, samples, steps)
    "mlp": (["model.width=128", "model.depth=3"], (2,), 4096, 200),
    "unet": (['model.arch="unet"', 'model.preset="small"'], (1, 8, 8), 64, 50),
}
SAMPLERS = {"sequential": None, "picard-taa-x0": {"accel": "taa", "init": "extrapolate", "tol": 0.1}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for case, (over, shape, n, steps) in CASES.items():
        D = build_denoiser(load_config(overrides=[*over, 'objective.name="dsm"']), shape).eval()
        chain = make_chain("ddpm", D, steps=steps)
        for sampler, parallel in SAMPLERS.items():
            times = {"float32": [], "float64": []}
            for dtype in times:  # untimed first calls
                sample_chain(chain, min(n, 8), 0, shape, dtype=dtype, parallel=parallel)
            for r in range(a.repeats):
                for dtype in times:
                    t0 = time.perf_counter()
                    sample_chain(chain, n, r, shape, dtype=dtype, parallel=parallel)
                    times[dtype].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"case": case, "sampler": sampler, "samples": n, "steps": steps,
                         "float32_s": med["float32"], "float64_s": med["float64"],
                         "ratio_f64_to_f32": med["float64"] / med["float32"]})
    if a.json:
        print(json.dumps({"threads": a.threads, "rows": rows}))
        return
    print(f"sampler state dtype on the CPU ({a.threads} threads; medians of {a.repeats}; ratio = float64 / float32)")
    for r in rows:
        print(f"  {r['case']:5s} {r['sampler']:14s} {r['samples']:5d} samples x {r['steps']:4d} steps   "
              f"float32 {r['float32_s']:7.2f} s   float64 {r['float64_s']:7.2f} s   ratio {r['ratio_f64_to_f32']:.2f}")


if __name__ == "__main__":
    main()
