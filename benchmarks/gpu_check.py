"""The GPU check: everything the GPU path promises, measured in one run that writes its figures as JSON.

1. ``tests/test_device.py`` and ``tests/test_device_resident.py`` (the GPU cases run where CUDA is visible): the
   GPU trains like the CPU within float tolerance (dsm, cdl, stf, sa, fm) and resumes exactly, and samples like it
   (flow-heun and picard-flow-heun included).
2. Training throughput of the cifar10-preset U-Net (DDPM++, 56M parameters) on 32x32x3 synthetic images in bf16:
   images per second for EDM, STF (n 4,096 references), CDL, flow matching and stable velocity (fm-stf), and their
   overheads against EDM; eager, and with
   ``train.compile`` / ``train.channels_last``.
3. Latency of sequential against Picard sampling (DDIM, 100 steps, the whole chain as the window) for 1 and 16
   images, with float32 and float64 sampler state (what the ``--state-dtype auto`` default rests on).
4. FID features on the GPU: difflab's Inception-v3 on fid-helper's weights, images per second and the largest
   difference from the CPU's features.
5. NCCL under torchrun on every GPU of the machine (skipped with one GPU).

``--smoke`` runs every part at toy sizes on whatever device there is (the CPU here), so the script itself is
tested without a GPU. ``benchmarks/gpu_check.sh`` runs it under an 8-minute limit.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--smoke] [--skip tests,throughput,latency,fid,nccl]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "throughput", "latency", "fid", "nccl")
START = time.perf_counter()
COMPILE_BY_S = 270  # a compiled variant starts only this early in the run (compiling the U-Net takes minutes)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def synthetic(shape: tuple[int, ...], n: int) -> str:
    """A .npy of n standard-normal examples of ``shape`` (the trainer reads it as a data set)."""
    path = Path(tempfile.gettempdir()) / f"difflab-gpu-check-{'x'.join(map(str, shape))}-{n}.npy"
    if not path.exists():
        np.save(path, np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32))
    return str(path)


def part_tests(smoke: bool) -> dict:
    files = ["tests/test_device.py", "tests/test_device_resident.py"]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files], cwd=ROOT,
                         capture_output=True, text=True)
    tail = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-300:]
    return {"ok": out.returncode == 0, "summary": tail, "seconds": time.perf_counter() - t0,
            **({} if out.returncode == 0 else {"output_tail": out.stdout[-3000:]})}


def train_rate(overrides: list[str], steps: int, warmup: int) -> dict:
    """Images per second of Trainer.train_step after ``warmup`` untimed steps (compilation, allocator)."""
    from difflab.config import load_config
    from difflab.training import Trainer

    cfg = load_config(overrides=[*overrides, "train.steps=1000000"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        t0 = time.perf_counter()
        for _ in range(warmup):
            trainer.train_step()
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        wall = time.perf_counter() - t0
    batch = cfg.train.batch_size
    return {"img_per_s": batch * steps / wall, "ms_per_step": 1e3 * wall / steps, "warmup_s": first}


def part_throughput(smoke: bool) -> dict:
    shape, preset, batch = ((3, 8, 8), "tiny", 8) if smoke else ((3, 32, 32), "cifar10", 128)
    attn = "[4]" if smoke else "[16]"
    base = [f'data.name="{synthetic(shape, 512 if smoke else 8192)}"', 'model.arch="unet"',
            f'model.preset="{preset}"', f"model.unet.attn_resolutions={attn}", "model.sigma_data=1.0",
            f"train.batch_size={batch}", 'train.precision="bf16"', f'train.device="{device().type}"']
    objectives = {
        "edm": ['objective.name="edm"'],
        "stf": ['objective.name="stf"', f"objective.options.reference_size={64 if smoke else 4096}"],
        "cdl": ['objective.name="cdl"'],
        "fm": ['objective.name="fm"'],
        "fm-stf": ['objective.name="stf"', 'objective.options.base="fm"',
                   f"objective.options.reference_size={64 if smoke else 4096}"],
    }
    layouts = {"eager": [], "channels_last": ["train.channels_last=true"],
               "compile+channels_last": ["train.compile=true", "train.channels_last=true"],
               "compile": ["train.compile=true"]}
    steps, warmup = (2, 1) if smoke else (20, 5)
    out: dict = {"preset": preset, "batch": batch, "shape": list(shape), "precision": "bf16"}
    for name, over in objectives.items():
        out[name] = train_rate([*base, *over], steps, warmup)
    for name in ("stf", "cdl", "fm", "fm-stf"):
        out[f"{name}_overhead"] = out["edm"]["ms_per_step"] and out[name]["ms_per_step"] / out["edm"]["ms_per_step"] - 1
    out["layouts"] = {}
    for name, over in layouts.items():
        if name == "eager":
            out["layouts"][name] = out["edm"]
            continue
        if "compile" in name and (smoke or time.perf_counter() - START > COMPILE_BY_S):
            out["layouts"][name] = {"skipped": "smoke run" if smoke else f"after {COMPILE_BY_S} s of the check"}
            continue
        try:
            out["layouts"][name] = train_rate([*base, *objectives["edm"], *over], steps, warmup + (0 if smoke else 5))
        except Exception as e:  # (a compiler the machine lacks is a finding, not a crash of the check)
            out["layouts"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def part_latency(smoke: bool) -> dict:
    """Sequential vs Picard DDIM-100 latency on a cifar10-preset U-Net with EDM preconditioning (randomly
    initialised: its output layers start at zero, so D is c_skip x, a smooth denoiser; the sweeps it takes are
    those of a simple distribution, the time per sweep is the real network's)."""
    from difflab.config import load_config
    from difflab.models import build_denoiser
    from difflab.samplers import make_chain, sample_chain

    shape, preset, steps = ((3, 8, 8), "tiny", 10) if smoke else ((3, 32, 32), "cifar10", 100)
    cfg = load_config(overrides=['model.arch="unet"', f'model.preset="{preset}"', 'objective.name="edm"',
                                 f"model.unet.attn_resolutions={'[4]' if smoke else '[16]'}"])
    D = build_denoiser(cfg, shape).to(device()).eval()
    chain = make_chain("ddim", D, steps=steps)
    rows = []
    for batch in (1, 16):
        for dtype in ("float32", "float64"):
            row = {"batch": batch, "state_dtype": dtype}
            for name, parallel in (("sequential", None), ("picard", {"tol": 0.1})):
                sample_chain(chain, batch, 0, shape, dtype=dtype, parallel=parallel)  # untimed: first-call costs
                sync()
                t0 = time.perf_counter()
                _, stats = sample_chain(chain, batch, 1, shape, dtype=dtype, parallel=parallel)
                sync()
                row[f"{name}_s"] = time.perf_counter() - t0
                if parallel is not None:
                    row["sweeps"] = stats.iterations
            row["speedup"] = row["sequential_s"] / row["picard_s"]
            rows.append(row)
    return {"sampler": f"ddim-{steps}", "preset": preset, "rows": rows}


def part_fid(smoke: bool) -> dict:
    """FID features on the device: difflab's Inception-v3 (fid-helper's weights, read as data; random weights
    without the package), images per second at batch 64, and the features' largest difference from the CPU's."""
    from difflab.imports.torchscript import read_torchscript
    from difflab.metrics.inception import InceptionV3, inception_from_torchscript
    from difflab.metrics.inception_extractor import InceptionFeatures
    from difflab.metrics.inception_source import fid_helper_weights

    path = fid_helper_weights()
    real = path is not None and path.is_file()
    net = inception_from_torchscript(*read_torchscript(path), str(path)) if real else InceptionV3()
    batch, repeats = (2, 1) if smoke else (64, 3)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    # the CPU's features first: an extractor moves the network it is given to its device
    cpu = InceptionFeatures(net, convention="tf_normalized", device="cpu", batch_size=batch).extract(x[:2])
    here = InceptionFeatures(net, convention="tf_normalized", device=device(), batch_size=batch)
    diff = float(np.abs(here.extract(x[:2]) - cpu).max())
    here.extract(x)  # untimed: first-call costs
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        here.extract(x)
    sync()
    wall = (time.perf_counter() - t0) / repeats
    return {"weights": "fid-helper" if real else "random", "batch": batch, "img_per_s": batch / wall,
            "max_abs_diff_vs_cpu": diff, "max_abs_feature": float(np.abs(cpu).max())}


def part_nccl(smoke: bool) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < 2 and not smoke:
        return {"gpus": gpus, "skipped": "NCCL needs two GPUs or more"}
    procs = max(gpus, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "-m", "difflab.cli",
               "train", "--data", "dino", "--steps", "10", "--batch-size", "256", "--width", "32", "--depth", "1",
               "--quiet", "--json", "--out", str(Path(tmp) / "run")]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return {"gpus": gpus, "processes": procs, "backend": "nccl" if gpus >= 2 else "gloo", "ok": out.returncode == 0,
            "seconds": time.perf_counter() - t0, "result": last[:500],
            **({} if out.returncode == 0 else {"stderr_tail": out.stderr[-2000:]})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="where the JSON goes   [gpu_check.json]")
    p.add_argument("--smoke", action="store_true", help="toy sizes on any device (tests the script itself)")
    p.add_argument("--skip", default="", help=f"parts to skip, a comma list of {', '.join(PARTS)}")
    a = p.parse_args()
    skip = {s for s in a.skip.split(",") if s}
    unknown = skip - set(PARTS)
    if unknown:
        sys.exit(f"gpu_check: unknown part(s) {', '.join(sorted(unknown))}: use {', '.join(PARTS)}")
    result: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "gpus": torch.cuda.device_count(), "torch": torch.__version__, "smoke": a.smoke}
    for name, fn in (("tests", part_tests), ("throughput", part_throughput), ("latency", part_latency),
                     ("fid", part_fid), ("nccl", part_nccl)):
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = fn(a.smoke)
        except Exception as e:  # one part's failure is reported, the others still run
            result[name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        result[name]["part_s"] = time.perf_counter() - t0
        Path(a.out).write_text(json.dumps(result, indent=1))  # after every part: a timeout keeps what was done
        print(f"gpu_check: {name} done in {result[name]['part_s']:.0f} s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
