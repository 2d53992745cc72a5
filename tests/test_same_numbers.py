"""Same command, same numbers: a run trained beside busy loops on every core writes the same weights, bit for bit,
as the same command on an idle machine (the thread count is fixed by the network, never read from the load)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

COMMANDS = {
    "mlp": ["--data", "dino", "--steps", "40", "--width", "32", "--depth", "1", "--set", "train.batch_size=64"],
    # (4 images a step: the U-Net still computes on all its threads, at half the work of 8)
    "unet": ["--data", "digits", "--preset", "tiny", "--steps", "3", "--set", "train.batch_size=4"],
}


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _train(args: list[str], out: Path) -> bytes:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run([sys.executable, "-m", "difflab.cli", "train", *args, "--quiet", "--out", str(out)], check=True,
                   env=env, capture_output=True, timeout=300)
    return next((out / "checkpoints").glob("step-*/weights.safetensors")).read_bytes()


@pytest.mark.parametrize("arch", sorted(COMMANDS))
def test_the_same_command_beside_busy_loops_writes_the_same_weights(arch, tmp_path):
    idle = _train(COMMANDS[arch], tmp_path / "idle")
    stop = mp.Event()
    busy = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 2)]
    for p in busy:
        p.start()
    try:
        loaded = _train(COMMANDS[arch], tmp_path / "busy")
    finally:
        stop.set()
        for p in busy:
            p.join()
    assert loaded == idle
    saved = [json.loads((tmp_path / r / "config.json").read_text())["train"]["threads"] for r in ("idle", "busy")]
    assert saved[0] == saved[1] >= 1 and (arch != "mlp" or saved[0] == 1)
