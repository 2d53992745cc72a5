"""Sequential vs parallel (Picard) DDPM, and the parallel variants side by side, on a trained Dino MLP in one run
(``--sampler`` picks another chain: flow-euler on a flow-matching run, ddim, ...).

The variants (``--variants``, a comma list; default ``picard,taa-x0``) are Picard option sets:

    picard  {}                                       plain ParaDiGMS Picard iteration
    taa     {"accel": "taa", "init": "prior"}        triangular Anderson acceleration alone
    x0      {"init": "extrapolate"}                  extrapolated start (true steps, then a frozen clean estimate)
    taa-x0  {"accel": "taa", "init": "extrapolate"}  both

For each batch size and window, every repeat times the sequential sampler and then every variant, interleaved
(seq, variant 1, variant 2, ... per repeat) so that machine noise hits all alike, after one untimed call of each
sampler (first-call costs); the medians are reported. One row per (batch, window, variant): the wall times, their
ratio (sequential / parallel: > 1 means the variant has the lower latency), the variant's time against plain
Picard's in the same batch and window (``vs picard`` = picard's parallel time / this one's: > 1 means faster than
plain Picard; only when ``picard`` is among the variants), the Picard iterations (sweeps), the sequential rounds
outside the sweeps (the extrapolated start's true steps; the depth is iterations + rounds) and the NFE per sample
(iterations and NFE of seed 0). Then, per variant, the throughput crossover: the smallest batch at which the
sequential loop is faster on this machine, per window and for the best window at each batch. ``--mmd`` also scores
2,000 samples of the sequential sampler and of each variant (whole-chain window) against the Dino (slow on a CPU:
the parallel samplers' total work is many times the sequential one's).

    python benchmarks/picard_latency.py --run runs/dsm [--variants picard,taa,x0,taa-x0] [--steps 1000]
        [--batches 1,8,32,128] [--windows 1000,200] [--tol 0.1] [--repeats 3] [--threads N] [--mmd] [--json]
    python benchmarks/picard_latency.py --run runs/fm --sampler flow-euler --steps 100 --windows 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from difflab.data import get_dataset
from difflab.metrics import mmd
from difflab.runs import Run
from difflab.samplers import sample_chain

VARIANTS: dict[str, dict] = {
    "picard": {},
    "taa": {"accel": "taa", "init": "prior"},
    "x0": {"init": "extrapolate"},
    "taa-x0": {"accel": "taa", "init": "extrapolate"},
}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def fail(message: str) -> None:
    sys.exit(f"picard_latency: {message}")


def ints(text: str, what: str) -> list[int]:
    """A comma list of positive integers, duplicates dropped (order kept); a bad one exits with a one-line error."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--{what} must be a comma list of positive integers, got {text!r}")
    if not values or min(values) < 1:
        fail(f"--{what} must be a comma list of positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def variant_names(text: str) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in names if s not in VARIANTS]
    if unknown or not names:
        fail(f"unknown variant{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown)) or '(none given)'}: "
             f"use a comma list of {', '.join(VARIANTS)}")
    return names


def crossovers(rows: list[dict], variant: str, windows: list[int]) -> tuple[dict, int | None]:
    """For one variant: the smallest batch where the sequential loop is faster, per window and for the best window
    at each batch (None: the variant is faster at every batch measured)."""
    mine = [r for r in rows if r["variant"] == variant]
    by_window = {W: min((r["batch"] for r in mine if r["window"] == W and r["speedup"] < 1), default=None)
                 for W in windows}
    best: dict[int, float] = {}
    for r in mine:  # the best window at each batch size
        best[r["batch"]] = max(best.get(r["batch"], 0.0), r["speedup"])
    return by_window, min((b for b, s in best.items() if s < 1), default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/dsm", help="a trained Dino run (difflab train --data dino --out RUN)")
    p.add_argument("--variants", default="picard,taa-x0",
                   help=f"parallel variants to compare, a comma list of {', '.join(VARIANTS)}")
    p.add_argument("--sampler", default="ddpm", help="the sequential chain: ddpm (default), ddim, flow-euler, ...")
    p.add_argument("--steps", type=int, default=1000, help="steps of the chain (default 1000)")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--windows", default=None,
                   help="Picard windows to compare (default: the step count, i.e. the whole chain; larger ones are "
                        "capped at it)")
    p.add_argument("--tol", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own choice)")
    p.add_argument("--mmd", action="store_true",
                   help="also score 2,000 samples of the sequential sampler and of each variant (slow)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    variants = variant_names(a.variants)
    if a.steps < 1:
        fail(f"--steps must be a positive integer, got {a.steps}")
    if a.repeats < 1:
        fail(f"--repeats must be a positive integer, got {a.repeats}")
    if a.threads < 0:
        fail(f"--threads must be an integer >= 0, got {a.threads}")
    if a.threads:
        torch.set_num_threads(a.threads)
    batches = ints(a.batches, "batches")
    # a window of the chain's length or more is the whole chain: measure it once
    windows = list(dict.fromkeys(min(W, a.steps) for W in ints(a.windows or str(a.steps), "windows")))

    run = Run.load(a.run)
    cfg, chain, shape = run.config, run.chain(a.sampler, steps=a.steps), run.shape
    options = {v: {"tol": a.tol, **VARIANTS[v]} for v in variants}
    # one untimed call of each sampler first, so that no timing carries first-call costs (lazy initialisation)
    sample_chain(chain, batches[0], seed=0, shape=shape, batch_size=batches[0])
    for v in variants:
        sample_chain(chain, batches[0], seed=0, shape=shape, batch_size=batches[0],
                     parallel={**options[v], "window": windows[0]})
    rows = []
    for B in batches:
        for W in windows:
            seq_t, par_t, stats = [], {v: [] for v in variants}, {}
            for r in range(a.repeats):  # interleave them so that machine noise hits all alike
                t, _ = timed(sample_chain, chain, B, seed=r, shape=shape, batch_size=B)
                seq_t.append(t)
                for v in variants:
                    t, (_, st) = timed(sample_chain, chain, B, seed=r, shape=shape, batch_size=B,
                                       parallel={**options[v], "window": W})
                    par_t[v].append(t)
                    stats.setdefault(v, st)  # seed 0's iterations and NFE
            s = statistics.median(seq_t)
            for v in variants:
                q, st = statistics.median(par_t[v]), stats[v]
                row = {"batch": B, "window": W, "variant": v, "sequential_s": s, "parallel_s": q,
                       "speedup": s / q, "iterations": st.iterations,
                       "sequential_rounds": st.extra.get("sequential_rounds", 0),
                       "mean_sweeps": st.extra.get("mean_sweeps"), "nfe_per_sample": st.nfe_per_sample}
                if "accel_fallback_rate" in st.extra:
                    row["accel_fallback_rate"] = st.extra["accel_fallback_rate"]
                if "picard" in variants:
                    row["vs_picard"] = statistics.median(par_t["picard"]) / q
                rows.append(row)
    cross = {v: crossovers(rows, v, windows) for v in variants}
    result = {"threads": torch.get_num_threads(), "sampler": a.sampler, "steps": a.steps, "tol": a.tol,
              "variants": {v: VARIANTS[v] for v in variants}, "rows": rows,
              "crossover_by_window": {v: c[0] for v, c in cross.items()},
              "crossover_best_window": {v: c[1] for v, c in cross.items()}}
    if a.mmd:
        ref = get_dataset(cfg.data.name).eval_data()
        x_seq, _ = sample_chain(chain, 2000, seed=0, shape=shape)
        result["mmd"] = {"sequential": mmd(x_seq, ref)}
        for v in variants:
            x_par, st = sample_chain(chain, 2000, seed=0, shape=shape, parallel=options[v])
            result["mmd"][v] = {"mmd": mmd(x_par, ref), "iterations": st.iterations,
                                "sequential_rounds": st.extra.get("sequential_rounds", 0),
                                "nfe_per_sample": st.nfe_per_sample}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{a.steps}-step {a.sampler}, {a.run}, torch threads {result['threads']}, tol {a.tol}, "
          f"{a.repeats} repeat(s), medians; sequential vs "
          + ", ".join(f"{v} {json.dumps(VARIANTS[v])}" for v in variants))
    vs = "picard" in variants
    print(f"{'batch':>6} {'window':>6} {'variant':>8} {'sequential':>11} {'parallel':>10} {'speed-up':>9} "
          + (f"{'vs picard':>10} " if vs else "") + f"{'iters':>6} {'rounds':>6} {'NFE/sample':>11}")
    for r in rows:
        print(f"{r['batch']:>6} {r['window']:>6} {r['variant']:>8} {r['sequential_s']:>10.3f}s "
              f"{r['parallel_s']:>9.3f}s {r['speedup']:>8.2f}x "
              + (f"{r['vs_picard']:>9.2f}x " if vs else "")
              + f"{r['iterations']:>6} {r['sequential_rounds']:>6} {r['nfe_per_sample']:>11.0f}")
    for v in variants:
        for W, c in result["crossover_by_window"][v].items():
            print(f"{v}, window {W}: the sequential loop is faster from batch {c} on" if c else
                  f"{v}, window {W}: {v} is faster at every batch measured")
        c = result["crossover_best_window"][v]
        print(f"{v}, best window per batch: the sequential loop is faster from batch {c} on" if c else
              f"{v}, best window per batch: {v} is faster at every batch measured")
    if a.mmd:
        m = result["mmd"]
        print(f"MMD (2,000 samples, whole-chain window): sequential {m['sequential']:.3e}")
        for v in variants:
            print(f"  {v:>8} {m[v]['mmd']:.3e} ({m[v]['iterations']} iterations + {m[v]['sequential_rounds']} "
                  f"sequential round(s), {m[v]['nfe_per_sample']:.0f} NFE/sample)")


if __name__ == "__main__":
    main()
