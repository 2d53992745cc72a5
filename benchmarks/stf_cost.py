"""STF's extra cost per training step and its peak memory, against the base (EDM) step, in one run.

The setting: batch B = 64, reference batch n = 4096, synthetic data of d = 3 x 32 x 32, and either a small MLP on
the flattened images (``--arch mlp``, whose step costs almost nothing, so STF's share looks large) or a U-Net on
the images (``--arch unet --preset small``, the real case). Each variant runs in its own process (so its peak
resident memory is its own) and the variants alternate over repeats. The reference code's (B, n, d) broadcast
would hold 64 x 4096 x 3072 float32 = 3.2 GB for the distances alone; difflab's logits are (B, n), computed by
chunked matrix products on the network's device. The last line with ``--json`` holds ``ratio``: STF step time /
EDM step time.

    python benchmarks/stf_cost.py [--arch mlp|unet] [--preset small] [--steps 10] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

STF = "edm+stf (n 4096, float32 logits)"
VARIANTS = {
    "edm": [],
    STF: ['objective.name="stf"', 'objective.options.base="edm"',
                                         "objective.options.reference_size=4096"],
}


def run_variant(name: str, steps: int, arch: str, preset: str) -> dict:
    import numpy as np
    import torch

    from difflab.config import load_config
    from difflab.training import Trainer

    torch.manual_seed(0)
    shape = (3, 32, 32) if arch == "unet" else (3 * 32 * 32,)
    path = f"/tmp/difflab-stf-bench-{arch}.npy"
    np.save(path, torch.randn(8192, *shape).numpy())
    # (the presets put attention at 4x4 for 8x8 digits; at 32x32 it goes to the lowest level, 8x8)
    net = ['model.arch="unet"', f'model.preset="{preset}"', "model.unet.attn_resolutions=[8]"] if arch == "unet" \
        else ["model.width=512", "model.depth=2"]
    cfg = load_config(overrides=[f'data.name="{path}"', 'objective.name="edm"', *VARIANTS[name], "train.batch_size=64",
                                 *net, "model.sigma_data=1.0", "train.steps=1000000"])
    trainer = Trainer(cfg, "/tmp/difflab-bench-unused")
    trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return {"s_per_step": (time.perf_counter() - t0) / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("mlp", "unet"), default="mlp", help="the network   [mlp: 512 x 2 blocks]")
    p.add_argument("--preset", default="small", help="the U-Net preset with --arch unet   [small]")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.steps, a.arch, a.preset)))
        return
    res = {k: [] for k in VARIANTS}
    for _ in range(a.repeats):
        for k in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", k, "--steps", str(a.steps), "--arch", a.arch,
                                  "--preset", a.preset], capture_output=True, text=True, check=True)
            res[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["s_per_step"] for r in res["edm"])
    summary = {k: {"ms_per_step": 1e3 * statistics.median(r["s_per_step"] for r in v),
                   "ratio_to_edm": statistics.median(r["s_per_step"] for r in v) / base,
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in v)} for k, v in res.items()}
    summary["reference_broadcast_gb"] = 64 * 4096 * 3072 * 4 / 1e9
    summary["arch"] = a.arch if a.arch == "mlp" else f"unet-{a.preset}"
    summary["ratio"] = summary[STF]["ratio_to_edm"]
    if a.json:
        print(json.dumps(summary))
        return
    net = "MLP width 512 x 2 blocks" if a.arch == "mlp" else f"U-Net preset {a.preset}"
    print(f"B 64, n 4096, d 3 x 32 x 32 (synthetic), {net}; each variant in its own process")
    for k in VARIANTS:
        r = summary[k]
        print(f"  {k:34s} {r['ms_per_step']:8.1f} ms/step  {r['ratio_to_edm']:5.2f}x  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB")
    print(f"  the reference code's (B, n, d) float32 broadcast alone: {summary['reference_broadcast_gb']:.1f} GB")


if __name__ == "__main__":
    main()
