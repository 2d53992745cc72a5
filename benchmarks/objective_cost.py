"""Cost of a training step of each objective against a DSM step at equal batch size, side by side in one run
(repeats alternate; medians reported as ratios to DSM): on the Dino MLP by default, or on images with a U-Net.

  dsm            the DDPM eps loss
  itd            the standard term CDL is added to
  cdl            difflab's defaults: 2 CDL examples x 16 log-SNR nodes (ratio nodes: stratified, mostly above
                 zeta), the ITD and ratio rows in one network call, both estimates sharing alpha and eps
  cdl-old        the defaults until 2026-12-07: 8 x 32 independent draws from the ITD logistic
  cdl-reference  the reference code's settings: 2 CDL examples x B log-SNR draws, independent noise
  cdl-n0         CDL's code with no CDL example (the ITD term alone, through CDL's code)
  cdl-8x4        8 examples x 4 nodes (as many rows as the default)
  cdl-n8         8 examples x 16 nodes
  cdl-a32        2 examples x 32 nodes
  sa-2/3/4       the sequence-aware loss: K x B rows in one forward pass
  stf            EDM + STF with 4,096 references
  fm             flow matching (rectified flow, a velocity network)
  fm-ot          fm with the exact minibatch OT pairing (scipy's assignment on the CPU, O(B^3))
  fm-ot256       the same within blocks of 256 rows (the studies' fm-ot)
  fm-stf         fm with stable velocity targets over 4,096 references
  fm-sa2         SA-2 on the flow-Euler grid

    python benchmarks/objective_cost.py [--batch 1024] [--steps 30] [--repeats 5] [--only dsm,cdl] [--json]
    python benchmarks/objective_cost.py --data digits --arch unet --preset tiny --batch 128      # 8x8 images
    python benchmarks/objective_cost.py --synthetic 3x32x32 --arch unet --preset small --batch 32 \
        --set model.unet.attn_resolutions=[8] --only itd,cdl-n0,cdl,cdl-old,cdl-reference    # the small U-Net, 32x32
    python benchmarks/objective_cost.py --synthetic 3x32x32 --arch unet --preset cifar10 --batch 512 \
        --device cuda                                  # CIFAR-size, the papers' U-Net, on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from difflab.config import load_config
from difflab.training import Trainer

VARIANTS = {
    "dsm": ('objective.name="dsm"',),
    "itd": ('objective.name="itd"',),
    "cdl": ('objective.name="cdl"',),
    "cdl-old": ('objective.name="cdl"', "objective.options.n_cdl=8", "objective.options.n_alpha=32",
                'objective.options.nodes="iid"'),
    "cdl-reference": ('objective.name="cdl"', "objective.options.n_cdl=2", "objective.options.n_alpha={B}",
                      "objective.options.common_noise=false", 'objective.options.nodes="iid"'),
    # where CDL's cost goes: its extra network rows are n_cdl x n_alpha x 2 (the two density estimates) a step
    "cdl-n0": ('objective.name="cdl"', "objective.options.n_cdl=0"),
    "cdl-8x4": ('objective.name="cdl"', "objective.options.n_cdl=8", "objective.options.n_alpha=4"),
    "cdl-n8": ('objective.name="cdl"', "objective.options.n_cdl=8"),
    "cdl-a32": ('objective.name="cdl"', "objective.options.n_alpha=32"),
    "sa-2": ('objective.name="sa"', "objective.options.K=2"),
    "sa-3": ('objective.name="sa"', "objective.options.K=3"),
    "sa-4": ('objective.name="sa"', "objective.options.K=4"),
    "edm": ('objective.name="edm"',),
    "stf": ('objective.name="stf"', "objective.options.reference_size=4096"),
    "fm": ('objective.name="fm"',),
    "fm-ot": ('objective.name="fm"', "objective.options.ot=true"),
    "fm-ot256": ('objective.name="fm"', "objective.options.ot=true", "objective.options.ot_block=256"),
    "fm-stf": ('objective.name="stf"', 'objective.options.base="fm"', "objective.options.reference_size=4096"),
    "fm-sa2": ('objective.name="sa"', 'objective.options.grid="flow"', "objective.options.K=2"),
}


def synthetic_images(shape: str, n: int = 8192) -> str:
    """An images:PATH spec of n uniform random images of shape 'CxHxW' in [-1, 1] (a temporary .npz)."""
    import tempfile

    import numpy as np

    c, h, w = (int(v) for v in shape.lower().split("x"))
    path = Path(tempfile.mkdtemp(prefix="difflab-bench-")) / f"synthetic-{c}x{h}x{w}.npz"
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.uniform(-1, 1, size=(n, c, h, w)).astype(np.float32))
    return f"images:{path}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", help="comma-separated variants (dsm is always timed)")
    p.add_argument("--data", default="dino", help="a data set spec   [dino]")
    p.add_argument("--synthetic", metavar="CxHxW", help="random images of this shape instead of --data")
    p.add_argument("--arch", default="mlp", help="mlp | unet   [mlp]")
    p.add_argument("--preset", default="small", help="U-Net preset   [small]")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda   [auto]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides for every variant, e.g. model.unet.attn_resolutions=[8]")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    data = synthetic_images(a.synthetic) if a.synthetic else a.data
    chosen = ["dsm", *[v for v in (a.only.split(",") if a.only else VARIANTS) if v != "dsm"]]
    trainers = {}
    for name in chosen:
        over = VARIANTS[name]
        cfg = load_config(overrides=[*(o.format(B=a.batch) for o in over), f"train.batch_size={a.batch}",
                                     "train.steps=1000000", f'data.name="{data}"', f'model.arch="{a.arch}"',
                                     f'model.preset="{a.preset}"', f'train.device="{a.device}"', *a.set])
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
    result = {"data": a.synthetic or a.data, "arch": a.arch, "device": str(next(iter(trainers.values())).device),
              "batch": a.batch, "threads": torch.get_num_threads(), "ms_per_step": {k: v * 1e3 for k, v in med.items()},
              "ratio_to_dsm": {k: v / med["dsm"] for k, v in med.items()}}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{result['data']}, {a.arch}, {result['device']}, batch {a.batch}, torch threads {result['threads']}: "
          "time per training step and ratio to DSM")
    for k in trainers:
        print(f"  {k:14s} {result['ms_per_step'][k]:8.2f} ms   {result['ratio_to_dsm'][k]:5.2f}x")


if __name__ == "__main__":
    main()
