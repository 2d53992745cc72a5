"""Training-step time with ``train.compile`` (torch.compile of the backbone) and ``train.channels_last``, side by side.

    python benchmarks/compile_layout.py [--cases mlp,unet8,unet32] [--steps N] [--warmup 2] [--repeats 3]
                                        [--threads 2] [--json]

Each variant runs in its own process, the variants alternate over repeats, and the warm-up steps (where torch.compile
compiles) are timed apart as ``first_steps_s``; a process's ms/step is its median timed step. The run uses a fresh
inductor cache, so the first repeat compiles cold and the later ones hit the cache. ``ratio`` is the variant's ms/step
over the same case's eager ms/step (below 1: faster). ``--json`` adds the results as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

SYNTH32 = "/tmp/difflab-compile-bench-32.npy"
EDM = ['objective.name="edm"', "train.steps=1000000"]
CASES = {  # name: (description, overrides, variants, default timed steps)
    "mlp": ("dino, MLP 128 x 3 blocks, batch 1024",
            ['data.name="dino"', "model.width=128", "model.depth=3", "train.batch_size=1024"],
            ("eager", "compile"), 10),
    "unet8": ("digits 1 x 8 x 8, U-Net small, batch 64",
              ['data.name="digits"', 'model.arch="unet"', 'model.preset="small"', "train.batch_size=64"],
              ("eager", "channels_last", "compile", "compile+channels_last"), 10),
    "unet32": ("synthetic 3 x 32 x 32, U-Net small (attention at 8x8), batch 32",
               [f'data.name="{SYNTH32}"', 'model.arch="unet"', 'model.preset="small"',
                "model.unet.attn_resolutions=[8]", "model.sigma_data=1.0", "train.batch_size=32"],
               ("eager", "channels_last", "compile", "compile+channels_last"), 4),
}


def run_variant(case: str, variant: str, steps: int, warmup: int, threads: int) -> dict:
    import numpy as np
    import torch

    from difflab.config import load_config
    from difflab.training import Trainer

    if case == "unet32":
        np.save(SYNTH32, torch.randn(2048, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy())
    flags = variant.split("+")
    cfg = load_config(overrides=[*CASES[case][1], *EDM, f"train.threads={threads}",
                                 f"train.compile={str('compile' in flags).lower()}",
                                 f"train.channels_last={str('channels_last' in flags).lower()}"])
    trainer = Trainer(cfg, "/tmp/difflab-bench-unused")
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return {"s_per_step": statistics.median(times), "first_steps_s": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, help="timed steps per process   [mlp 10, unet8 10, unet32 4]")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (torch.compile compiles there)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="train.threads for every variant")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    cases = a.cases.split(",")
    if unknown := set(cases) - set(CASES):
        p.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if a.variant:
        case, variant = a.variant.split(":")
        print(json.dumps(run_variant(case, variant, a.steps, a.warmup, a.threads)))
        return
    cache = tempfile.mkdtemp(prefix="difflab-inductor-")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    summary = {"threads": a.threads, "warmup": a.warmup, "repeats": a.repeats, "cases": {}}
    try:
        for case in cases:
            desc, _, variants, default_steps = CASES[case]
            steps = a.steps or default_steps
            runs = {v: [] for v in variants}
            for _ in range(a.repeats):
                for v in variants:
                    out = subprocess.run([sys.executable, __file__, "--variant", f"{case}:{v}", "--steps", str(steps),
                                          "--warmup", str(a.warmup), "--threads", str(a.threads)],
                                         capture_output=True, text=True, env=env)
                    if out.returncode:
                        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
                        runs[v].append({"error": f"exit {out.returncode}: {tail}"})
                    else:
                        runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            res = {}
            for v, rs in runs.items():
                ok = [r for r in rs if "error" not in r]
                errors = [r["error"] for r in rs if "error" in r]
                res[v] = {"ms_per_step": 1e3 * statistics.median(r["s_per_step"] for r in ok) if ok else None,
                          "first_steps_s": statistics.median(r["first_steps_s"] for r in ok) if ok else None,
                          "first_steps_cold_s": rs[0].get("first_steps_s"), **({"errors": errors} if errors else {})}
            base = res["eager"]["ms_per_step"]
            for r in res.values():
                r["ratio"] = r["ms_per_step"] / base if base and r["ms_per_step"] else None
            summary["cases"][case] = {"setting": desc, "steps": steps, "variants": res}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"EDM training steps, train.threads={a.threads}, {a.warmup} warm-up + timed steps, median of {a.repeats} "
          "processes per variant; warm-up s: median (first repeat: cold compile cache)")
    for case, c in summary["cases"].items():
        print(f"{case}: {c['setting']}, {c['steps']} timed steps")
        for v, r in c["variants"].items():
            if r["ms_per_step"] is None:
                print(f"  {v:22s} failed: {r['errors'][0]}")
                continue
            cold = r["first_steps_cold_s"]
            print(f"  {v:22s} {r['ms_per_step']:9.1f} ms/step  {r['ratio']:5.2f}x  warm-up {r['first_steps_s']:6.1f} s"
                  f" ({'failed' if cold is None else f'{cold:.1f}'})")
            for e in r.get("errors", []):
                print(f"    error: {e}")
    if a.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
