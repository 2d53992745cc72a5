"""Parallel (Picard) vs sequential 1000-step DDPM on a trained Dino MLP, side by side in one run.

Reports, per batch size, the wall time of both samplers and their ratio (sequential / parallel: > 1 means the
parallel sampler has the lower latency), the Picard iterations and NFE per sample, and the throughput crossover:
the smallest batch at which the sequential loop is faster on this machine. ``--mmd`` also scores 2,000 samples of
each against the Dino (slow on a CPU: the parallel sampler's total work is ~12x the sequential one's).

    python benchmarks/picard_latency.py --run runs/dsm [--batches 1,8,32,128] [--windows 1000,200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from difflab.data import get_dataset
from difflab.metrics import mmd
from difflab.runs import Run
from difflab.samplers import sample_chain


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/dsm", help="a trained Dino run (difflab train --data dino --out RUN)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--windows", default="1000", help="Picard windows to compare (1000 = the whole chain)")
    p.add_argument("--tol", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mmd", action="store_true", help="also score 2,000 samples of each sampler (slow)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    run = Run.load(a.run)
    cfg, chain, shape = run.config, run.chain("ddpm", steps=1000), run.shape
    rows = []
    for B in (int(s) for s in a.batches.split(",")):
        for W in (int(s) for s in a.windows.split(",")):
            seq_t, par_t, stats = [], [], None
            for r in range(a.repeats):  # alternate the two so that machine noise hits both alike
                t, _ = timed(sample_chain, chain, B, seed=r, shape=shape, batch_size=B)
                seq_t.append(t)
                t, (_, stats) = timed(sample_chain, chain, B, seed=r, shape=shape, batch_size=B,
                                      parallel={"tol": a.tol, "window": W})
                par_t.append(t)
            s, q = statistics.median(seq_t), statistics.median(par_t)
            rows.append({"batch": B, "window": W, "sequential_s": s, "parallel_s": q, "speedup": s / q,
                         "iterations": stats.iterations, "nfe_per_sample": stats.nfe_per_sample})
    windows = sorted({r["window"] for r in rows})
    crossover = {W: min((r["batch"] for r in rows if r["window"] == W and r["speedup"] < 1), default=None)
                 for W in windows}
    best = {}
    for r in rows:  # the best window at each batch size
        best[r["batch"]] = max(best.get(r["batch"], 0.0), r["speedup"])
    result = {"threads": torch.get_num_threads(), "tol": a.tol, "rows": rows, "crossover_by_window": crossover,
              "crossover_best_window": min((b for b, s in best.items() if s < 1), default=None)}
    if a.mmd:
        ref = get_dataset(cfg.data.name).eval_data()
        x_seq, _ = sample_chain(chain, 2000, seed=0, shape=shape)
        x_par, st = sample_chain(chain, 2000, seed=0, shape=shape, parallel={"tol": a.tol})
        result["mmd"] = {"sequential": mmd(x_seq, ref), "parallel": mmd(x_par, ref),
                         "iterations": st.iterations, "nfe_per_sample": st.nfe_per_sample}
    if a.json:
        print(json.dumps(result))
        return
    print(f"1000-step DDPM, {a.run}, torch threads {result['threads']}, tol {a.tol}")
    print(f"{'batch':>6} {'window':>6} {'sequential':>11} {'parallel':>10} {'speed-up':>9} {'iters':>6} "
          f"{'NFE/sample':>11}")
    for r in rows:
        print(f"{r['batch']:>6} {r['window']:>6} {r['sequential_s']:>10.3f}s {r['parallel_s']:>9.3f}s "
              f"{r['speedup']:>8.2f}x {r['iterations']:>6} {r['nfe_per_sample']:>11.0f}")
    for W, c in crossover.items():
        print(f"window {W}: the sequential loop is faster from batch {c} on" if c else
              f"window {W}: the parallel sampler is faster at every batch measured")
    print(f"best window per batch: sequential faster from batch {result['crossover_best_window']} on")
    if a.mmd:
        m = result["mmd"]
        print(f"MMD (2,000 samples): sequential {m['sequential']:.3e}, parallel {m['parallel']:.3e} "
              f"({m['iterations']} iterations, {m['nfe_per_sample']:.0f} NFE/sample)")


if __name__ == "__main__":
    main()
