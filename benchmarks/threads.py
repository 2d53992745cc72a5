"""How many torch threads a run should use: training and sampling speed at 1 and 2 (or more) threads, side by side,
on an idle machine and beside busy loops, and whether the thread count changes the trained weights.

Cases: the Dino MLP (batch 1,024, the default network of flat data), the `tiny` U-Net on the 8x8 digits (batch 128),
and DDPM sampling of the Dino MLP (2,000 samples, 200 steps). Each repeat times every thread count in turn, so
machine noise hits them alike; the median rate is reported, with its ratio to one thread. ``--busy K`` runs K
busy-loop processes (one core each) during the timing: what happens when something else runs on the machine.
``--weights`` trains 300 Dino steps at each thread count from the same seed and reports the largest weight
difference to the one-thread run (0.0: bit-identical).

    python benchmarks/threads.py [--threads 1,2] [--busy 0,1,2] [--repeats 3] [--weights] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time

import torch

from difflab.config import load_config
from difflab.training import Trainer


def _spin(stop) -> None:  # a busy loop: one core's worth of someone else's work
    while not stop.is_set():
        pass


def trainer(data: str, tmp: str) -> Trainer:
    return Trainer(load_config(overrides=[f"data.name='{data}'", "train.threads=1"]), tmp)


def time_train(tr: Trainer, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    return steps / (time.perf_counter() - t0)


def time_sample(run, threads: int, n: int, steps: int) -> float:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run.sample(n, seed=0, sampler="ddpm", steps=steps)
    return 1.0 / (time.perf_counter() - t0)


def weights_spread(counts: list[int], steps: int) -> dict:
    """Largest |w_T - w_1| over the weights after ``steps`` Dino steps at T threads against 1 thread."""
    out, ref = {}, None
    for t in counts:
        with tempfile.TemporaryDirectory() as tmp:
            tr = trainer("dino", tmp)
            torch.set_num_threads(t)
            for _ in range(steps):
                tr.train_step()
            w = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
        ref = w if ref is None else ref
        out[str(t)] = float((w - ref).abs().max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="thread counts to compare   [1,2]")
    p.add_argument("--busy", default="0,2", help="busy-loop processes beside the timing, one setting each   [0,2]")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=100, help="MLP training steps per timing (U-Net: a fifth)")
    p.add_argument("--weights", action="store_true", help="also: weight difference after 300 Dino steps")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    counts = [int(t) for t in a.threads.split(",")]
    from difflab.runs import Run

    with tempfile.TemporaryDirectory() as t1, tempfile.TemporaryDirectory() as t2:
        mlp, unet = trainer("dino", t1), trainer("digits", t2)
        run = Run.of(mlp.ema, mlp.cfg, mlp.shape, 0, t1)
        cases = {"train mlp (dino, batch 1024)": lambda t: time_train(mlp, t, a.steps),
                 "train unet tiny (digits, batch 128)": lambda t: time_train(unet, t, max(1, a.steps // 5)),
                 "sample mlp (ddpm-200, 2000 samples)": lambda t: time_sample(run, t, 2000, 200)}
        for f in cases.values():  # warm-up
            f(counts[0])
        results = {}
        for busy in (int(b) for b in a.busy.split(",")):
            stop = mp.Event()
            procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
            for q in procs:
                q.start()
            rates = {name: {t: [] for t in counts} for name in cases}
            for _ in range(a.repeats):
                for name, f in cases.items():
                    for t in counts:
                        rates[name][t].append(f(t))
            stop.set()
            for q in procs:
                q.join()
            results[f"busy {busy}"] = {
                name: {str(t): {"rate_per_s": statistics.median(r), "vs_1_thread":
                                statistics.median(r) / statistics.median(by_t[counts[0]])}
                       for t, r in by_t.items()} for name, by_t in rates.items()}
    out = {"threads": counts, "repeats": a.repeats, "cores": torch.get_num_threads(), "results": results}
    if a.weights:
        out["weights_max_abs_diff_vs_first"] = weights_spread(counts, 300)
    if a.json:
        print(json.dumps(out))
        return
    for busy, cases_ in results.items():
        print(f"== {busy} busy-loop processes ==")
        for name, by_t in cases_.items():
            print(f"  {name}: " + ", ".join(f"{t} threads {r['rate_per_s']:.3g}/s ({r['vs_1_thread']:.2f}x)"
                                            for t, r in by_t.items()))
    if a.weights:
        print("max |weights(T threads) - weights(first)| after 300 Dino steps:", out["weights_max_abs_diff_vs_first"])


if __name__ == "__main__":
    main()
