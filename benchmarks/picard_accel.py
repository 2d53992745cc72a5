"""How far beyond ParaDiGMS: sweeps, NFE and accuracy of the parallel sampler's variants, side by side in one run.

For each denoiser (an exact mixture, or trained runs), chain, criterion, method and tolerance, runs the sequential
chain once and :func:`~difflab.samplers.picard` with the method's options on the same pre-drawn noise, and reports
the sweeps per sample (mean / p99 / max), the sequential rounds outside the sweeps, the depth (max sweeps +
rounds), the NFE per sample, the distance to the sequential samples (per-sample RMS over coordinates, in units of
the data's standard deviation), TAA's fallback rate and the wall time; ``--mmd`` also scores both sample sets
against 8,000 reference points. Methods: picard (ParaDiGMS), taa (triangular Anderson), x0 (extrapolated start),
taa-x0 (both), warm (coarse warm start), taa-m2 / taa-m5 (TAA with memory 2 / 5).

The matched-error summary (several ``--tols`` with picard among the methods) compares each method at the largest
tol whose mean distance is at most plain Picard's at tol 0.1 (cumulative criterion when run), not at equal nominal
tol. ``--trace`` prints the accepted front of each call's slowest sample after every sweep, and the sweeps spent on
the chain's last 5%. With several ``--runs`` every table is also given as mean +- std over the runs.

    python benchmarks/picard_accel.py [--data dino|gmm1d | --runs RUN[,RUN...]]
        [--chains ddpm1000,ddim50,ddim100,heun18] [--methods picard,taa,x0,taa-x0] [--criteria cumulative]
        [--tols 0.1] [--n 256] [--seed 0] [--window W] [--convergence sample] [--threads 1] [--mmd] [--trace] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from difflab.data import get_dataset
from difflab.metrics import mmd, pathwise_distance
from difflab.samplers import Chain, draw_noise, make_chain, picard, run_chain
from difflab.studies.report import mean_std

CHAINS = {
    "ddpm1000": ("ddpm", {"steps": 1000, "variance": "beta_tilde"}),
    "ddim50": ("ddim", {"steps": 50}),
    "ddim100": ("ddim", {"steps": 100}),
    "heun18": ("heun", {"steps": 18}),
    "ddim50eta1": ("ddim", {"steps": 50, "eta": 1.0}),
}
METHODS = {
    "picard": {},
    "taa": {"accel": "taa", "init": "prior"},
    "x0": {"init": "extrapolate"},
    "taa-x0": {"accel": "taa", "init": "extrapolate"},
    "warm": {"init": "warm"},
    "taa-m2": {"accel": "taa", "accel_memory": 2, "init": "prior"},
    "taa-m5": {"accel": "taa", "accel_memory": 5, "init": "prior"},
}
BASE_TOL = 0.1  # the fairness rule's reference: plain Picard at this tol
N_REF = 8000  # reference points for the data std and MMD
TAIL = 0.05  # --trace: the share of the chain whose sweeps are counted


@dataclass
class Source:
    """One denoiser to benchmark: its label, data set name, chain factory and per-example shape."""

    label: str
    data: str
    chain: Callable[..., Chain]
    shape: tuple[int, ...]
    labels: Callable[[int, int], torch.Tensor | None] | None = None  # (n, seed) -> class labels (conditional runs)


def listed(text: str, allowed, what: str) -> list[str]:
    """A comma list, each item checked against ``allowed``."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"unknown {what} {', '.join(bad) or '(none)'}: use {', '.join(allowed)}")
    return items


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default="dino", choices=("dino", "gmm1d"), help="the exact mixture denoiser")
    src.add_argument("--runs", default=None, help="trained runs, comma separated (e.g. 3 seeds)")
    p.add_argument("--chains", default="ddpm1000,ddim50,ddim100,heun18", help=f"from {', '.join(CHAINS)}")
    p.add_argument("--methods", default="picard,taa,x0,taa-x0", help=f"from {', '.join(METHODS)}")
    p.add_argument("--criteria", default="cumulative", help="cumulative and/or step")
    p.add_argument("--tols", default="0.1", help="e.g. 0.3,0.1,0.03,0.01,0.003")
    p.add_argument("--n", type=int, default=256, help="samples per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="Picard window (default: the whole chain)")
    p.add_argument("--convergence", default="sample", choices=("sample", "batch"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--mmd", action="store_true", help=f"also score samples against {N_REF} reference points")
    p.add_argument("--trace", action="store_true", help="print the slowest sample's front per sweep")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    a = p.parse_args()
    a.chains = listed(a.chains, CHAINS, "chain")
    a.methods = listed(a.methods, METHODS, "method")
    a.criteria = listed(a.criteria, ("cumulative", "step"), "criterion")
    a.tols = [float(s) for s in a.tols.split(",") if s.strip()]
    return a


def sources(a: argparse.Namespace) -> list[Source]:
    """The exact mixture of ``--data``, or each run of ``--runs``."""
    if a.runs is None:
        ds = get_dataset(a.data)
        den = ds.denoiser()
        return [Source(a.data, a.data, lambda name, **o: make_chain(name, den, **o), tuple(ds.eval_data(1).shape[1:]))]
    from difflab.runs import Run

    out = []
    for path in (s.strip() for s in a.runs.split(",") if s.strip()):
        run = Run.load(path)
        labels = (lambda n, seed, r=run: r.labels("random", n, seed)) if run.num_classes else None
        out.append(Source(path.rstrip("/").split("/")[-1], run.config.data.name, run.chain, run.shape, labels))
    return out


@cache
def reference(data: str) -> tuple[torch.Tensor, float]:
    """``eval_data(8000)`` of a data set, flattened (N, d), and its standard deviation over all coordinates."""
    ref = get_dataset(data).eval_data(N_REF).double().reshape(N_REF, -1)
    return ref, float(ref.std())


def score(x: torch.Tensor, data: str) -> float:
    """MMD^2 of the samples against the data set's reference points."""
    return mmd(x.double().reshape(len(x), -1), reference(data)[0])


def tail_sweeps(front: list[int], start: int, n: int) -> int:
    """Sweeps begun with the front already in the chain's last 5%."""
    cut = int((1 - TAIL) * n)
    return sum(f >= cut for f in [start, *front[:-1]])


def sequential_row(src: Source, name: str, chain: Chain, noise, want_mmd: bool) -> tuple[dict, torch.Tensor]:
    """Run the sequential chain once; its record and samples."""
    t0 = time.perf_counter()
    x = run_chain(chain, noise)
    row = {"source": src.label, "chain": name, "steps": chain.n_steps, "nfe": float(chain.nfe.sum()),
           "wall_s": time.perf_counter() - t0}
    if want_mmd:
        row["mmd"] = score(x, src.data)
    return row, x


def picard_row(src: Source, chain: Chain, noise, x_seq: torch.Tensor, setting: dict, options: dict,
               a: argparse.Namespace) -> dict:
    """Run picard with ``options`` and summarise it against the sequential samples."""
    fronts = []
    on_sweep = (lambda it, begin: fronts.append(begin.clone())) if a.trace else None
    res = picard(chain, noise, on_sweep=on_sweep, **options)
    sweeps = res.sweeps.double()
    dist = pathwise_distance(res.x, x_seq, reference(src.data)[1])
    row = {**setting, "sweeps_mean": float(sweeps.mean()), "sweeps_p99": float(torch.quantile(sweeps, 0.99)),
           "sweeps_max": int(res.sweeps.max()), "rounds": res.rounds, "depth": res.iterations + res.rounds,
           "nfe": float(res.nfe.mean()), "dist_mean": dist["mean"], "dist_median": dist["median"],
           "dist_max": dist["max"], "fallback_rate": res.fallbacks / res.accelerated if res.accelerated else None,
           "converged": res.converged, "wall_s": res.wall_time_s}
    if a.mmd:
        row["mmd"] = score(res.x, src.data)
    if a.trace:
        k = int(res.sweeps.argmax())
        front = [int(f[k]) for f in fronts[: int(res.sweeps[k])]]
        start = res.rounds if options.get("init") == "extrapolate" else 0
        row.update(trace_sample=k, front=front, tail_sweeps=tail_sweeps(front, start, chain.n_steps))
    return row


def benchmark(src: Source, a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every chain x criterion x method x tol of one source: (sequential records, picard rows)."""
    seq, rows = [], []
    for name in a.chains:
        kind, chain_options = CHAINS[name]
        chain = src.chain(kind, **chain_options)
        cond = None if src.labels is None else {"class_labels": src.labels(a.n, a.seed)}
        noise = draw_noise(a.seed, range(a.n), src.shape, chain.n_steps, chain.stochastic, cond=cond)
        s, x_seq = sequential_row(src, name, chain, noise, a.mmd)
        seq.append(s)
        for criterion in a.criteria:
            for method in a.methods:
                for tol in a.tols:
                    setting = {"source": src.label, "chain": name, "criterion": criterion, "method": method, "tol": tol}
                    options = {**METHODS[method], "tol": tol, "criterion": criterion, "window": a.window,
                               "convergence": a.convergence}
                    rows.append(picard_row(src, chain, noise, x_seq, setting, options, a))
    return seq, rows


def baseline(rows: list[dict]) -> dict | None:
    """Plain Picard at tol 0.1 among one chain's rows (the cumulative criterion when it was run)."""
    base = [r for r in rows if r["method"] == "picard" and math.isclose(r["tol"], BASE_TOL)]
    return min(base, key=lambda r: r["criterion"] != "cumulative", default=None)


def matched(rows: list[dict], methods: list[str], criteria: list[str]) -> list[dict]:
    """Per source, chain, criterion and method: its row at the largest tol whose mean distance is at most the
    baseline's, with its sweeps and NFE relative to the baseline's."""
    out = []
    for key in dict.fromkeys((r["source"], r["chain"]) for r in rows):
        group = [r for r in rows if (r["source"], r["chain"]) == key]
        base = baseline(group)
        if base is None:
            continue
        for criterion in criteria:
            for method in methods:
                ok = [r for r in group if r["criterion"] == criterion and r["method"] == method
                      and r["dist_mean"] <= base["dist_mean"]]
                best = max(ok, key=lambda r: r["tol"], default=None)
                entry = {"source": key[0], "chain": key[1], "criterion": criterion, "method": method,
                         "target_dist": base["dist_mean"], "tol": None if best is None else best["tol"]}
                if best is not None:
                    entry.update({k: best[k] for k in ("sweeps_mean", "sweeps_max", "nfe", "dist_mean")})
                    entry.update(sweeps_mean_ratio=best["sweeps_mean"] / base["sweeps_mean"],
                                 sweeps_max_ratio=best["sweeps_max"] / base["sweeps_max"],
                                 nfe_ratio=best["nfe"] / base["nfe"])
                out.append(entry)
    return out


def over_runs(rows: list[dict], keys: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """Rows grouped by ``keys`` across sources, each metric as mean +- std (entries without it are left out)."""
    out = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in rows):
        group = [r for r in rows if tuple(r[k] for k in keys) == key]
        entry = {**dict(zip(keys, key, strict=True)), "runs": len(group)}
        for m in metrics:
            values = [r[m] for r in group if r.get(m) is not None]
            if values:
                entry[m] = mean_std(values)
        out.append(entry)
    return out


ROW_METRICS = ("sweeps_mean", "sweeps_p99", "sweeps_max", "depth", "nfe", "dist_mean", "dist_max", "mmd")
MATCHED_METRICS = ("sweeps_mean", "sweeps_max", "nfe", "sweeps_mean_ratio", "sweeps_max_ratio", "nfe_ratio")


# ------------------------------------------------------------------------------------------------ text output


def fmt(v, spec: str) -> str:
    """A number in ``spec``, or "-" when missing."""
    return "-" if v is None else format(v, spec)


def pm(entry: dict, m: str, spec: str) -> str:
    """An aggregated metric as mean+-std."""
    v = entry.get(m)
    return "-" if v is None else f"{format(v['mean'], spec)}+-{format(v['std'], spec)}"


def print_rows(seq: list[dict], rows: list[dict], want_mmd: bool) -> None:
    """One line per setting, each chain's sequential run first."""
    head = (f"{'source':<10} {'chain':<10} {'criterion':<10} {'method':<8} {'tol':>6} {'sw.mean':>8} {'sw.p99':>7} "
            f"{'sw.max':>6} {'rounds':>6} {'depth':>6} {'NFE':>8} {'d.mean':>9} {'d.med':>9} {'d.max':>9} "
            f"{'fallbk':>7} {'wall':>8}" + (f" {'MMD':>10}" if want_mmd else ""))
    print(head)
    for s in seq:
        mm = f" {s['mmd']:>10.3e}" if want_mmd else ""
        print(f"{s['source']:<10} {s['chain']:<10} {'-':<10} {'seq':<8} {'-':>6} {'-':>8} {'-':>7} {'-':>6} "
              f"{'-':>6} {s['steps']:>6} {s['nfe']:>8.1f} {0:>9.2e} {0:>9.2e} {0:>9.2e} {'-':>7} "
              f"{s['wall_s']:>7.2f}s{mm}")
        for r in rows:
            if (r["source"], r["chain"]) != (s["source"], s["chain"]):
                continue
            mm = f" {r['mmd']:>10.3e}" if want_mmd else ""
            flag = "" if r["converged"] else " (not converged)"
            print(f"{r['source']:<10} {r['chain']:<10} {r['criterion']:<10} {r['method']:<8} {r['tol']:>6g} "
                  f"{r['sweeps_mean']:>8.2f} {r['sweeps_p99']:>7.1f} {r['sweeps_max']:>6} {r['rounds']:>6} "
                  f"{r['depth']:>6} {r['nfe']:>8.1f} {r['dist_mean']:>9.2e} {r['dist_median']:>9.2e} "
                  f"{r['dist_max']:>9.2e} {fmt(r['fallback_rate'], '.3f'):>7} {r['wall_s']:>7.2f}s{mm}{flag}")


def print_matched(entries: list[dict]) -> None:
    """The matched-error summary, one line per source, chain, criterion and method."""
    print("\nmatched error: each method at the largest tol whose mean distance <= plain Picard's at tol 0.1")
    print(f"{'source':<10} {'chain':<10} {'criterion':<10} {'method':<8} {'target':>9} {'tol':>6} {'sw.mean':>8} "
          f"{'sw.max':>6} {'NFE':>8} {'d.mean':>9} {'mean/P':>7} {'max/P':>7} {'NFE/P':>7}")
    for e in entries:
        if e["tol"] is None:
            print(f"{e['source']:<10} {e['chain']:<10} {e['criterion']:<10} {e['method']:<8} "
                  f"{e['target_dist']:>9.2e}  no tol reaches the target")
            continue
        print(f"{e['source']:<10} {e['chain']:<10} {e['criterion']:<10} {e['method']:<8} {e['target_dist']:>9.2e} "
              f"{e['tol']:>6g} {e['sweeps_mean']:>8.2f} {e['sweeps_max']:>6} {e['nfe']:>8.1f} {e['dist_mean']:>9.2e} "
              f"{e['sweeps_mean_ratio']:>7.3f} {e['sweeps_max_ratio']:>7.3f} {e['nfe_ratio']:>7.3f}")


def compact(front: list[int], head: int = 8, tail: int = 24) -> str:
    """The front positions, the middle elided when there are many."""
    if len(front) <= head + tail:
        return " ".join(map(str, front))
    return " ".join(map(str, front[:head])) + " ... " + " ".join(map(str, front[-tail:]))


def print_traces(rows: list[dict], seq: list[dict]) -> None:
    """Per call, the slowest sample's front after each sweep and its sweeps on the chain's last 5%."""
    steps = {(s["source"], s["chain"]): s["steps"] for s in seq}
    print("\ntrace: the slowest sample's accepted steps after each sweep (tail: sweeps begun in the last 5%)")
    for key in dict.fromkeys((r["source"], r["chain"], r["criterion"], r["tol"]) for r in rows):
        print(f"{key[0]} {key[1]} ({steps[key[:2]]} steps), {key[2]}, tol {key[3]:g}:")
        for r in rows:
            if (r["source"], r["chain"], r["criterion"], r["tol"]) == key:
                print(f"  {r['method']:>7}: {compact(r['front'])}  [sample {r['trace_sample']}, "
                      f"{len(r['front'])} sweeps, tail {r['tail_sweeps']}]")


def print_over_runs(agg: list[dict], agg_matched: list[dict], n_runs: int, want_mmd: bool) -> None:
    """The mean +- std tables over runs."""
    print(f"\nmean +- std over {n_runs} runs")
    cols = (("sweeps_mean", "sw.mean", ".2f", 13), ("sweeps_max", "sw.max", ".1f", 13), ("depth", "depth", ".1f", 13),
            ("nfe", "NFE", ".1f", 15), ("dist_mean", "d.mean", ".2e", 19), ("dist_max", "d.max", ".2e", 19),
            ("mmd", "MMD", ".2e", 19))[: None if want_mmd else -1]
    print(f"{'chain':<10} {'criterion':<10} {'method':<8} {'tol':>6} " + " ".join(f"{h:>{w}}" for _, h, _, w in cols))
    for e in agg:
        print(f"{e['chain']:<10} {e['criterion']:<10} {e['method']:<8} {e['tol']:>6g} "
              + " ".join(f"{pm(e, m, spec):>{w}}" for m, _, spec, w in cols))
    if agg_matched:
        print(f"\nmatched error, mean +- std over {n_runs} runs")
        print(f"{'chain':<10} {'criterion':<10} {'method':<8} {'tols':<14} {'mean/P':>13} {'max/P':>13} {'NFE/P':>13}")
        for e in agg_matched:
            tols = ",".join(fmt(t, "g") for t in e["tols"])
            print(f"{e['chain']:<10} {e['criterion']:<10} {e['method']:<8} {tols:<14} "
                  f"{pm(e, 'sweeps_mean_ratio', '.3f'):>13} {pm(e, 'sweeps_max_ratio', '.3f'):>13} "
                  f"{pm(e, 'nfe_ratio', '.3f'):>13}")


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    srcs = sources(a)
    seq, rows = [], []
    with torch.inference_mode():
        for src in srcs:
            s, r = benchmark(src, a)
            seq += s
            rows += r
    use_matched = len(a.tols) > 1 and "picard" in a.methods
    summary = matched(rows, a.methods, a.criteria) if use_matched else []
    result = {"threads": torch.get_num_threads(), "n": a.n, "seed": a.seed, "window": a.window,
              "convergence": a.convergence, "sources": [s.label for s in srcs],
              "data_std": {s.data: reference(s.data)[1] for s in srcs}, "sequential": seq, "rows": rows,
              "matched": summary}
    agg_matched = []
    if len(srcs) > 1:
        result["over_runs"] = over_runs(rows, ("chain", "criterion", "method", "tol"), ROW_METRICS)
        agg_matched = over_runs(summary, ("chain", "criterion", "method"), MATCHED_METRICS)
        for e in agg_matched:
            e["tols"] = [m["tol"] for m in summary if (m["chain"], m["criterion"], m["method"])
                         == (e["chain"], e["criterion"], e["method"])]
        result["matched_over_runs"] = agg_matched
    if a.json:
        print(json.dumps(result))
        return
    stds = ", ".join(f"{k} {v:.3f}" for k, v in result["data_std"].items())
    print(f"{a.n} samples, seed {a.seed}, window {a.window or 'whole chain'}, convergence {a.convergence}, "
          f"torch threads {result['threads']}; distances in data std ({stds})")
    print_rows(seq, rows, a.mmd)
    if use_matched:
        print_matched(summary)
    if a.trace:
        print_traces(rows, seq)
    if len(srcs) > 1:
        print_over_runs(result["over_runs"], agg_matched, len(srcs), a.mmd)


if __name__ == "__main__":
    main()
