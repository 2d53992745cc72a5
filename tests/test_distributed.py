"""torchrun with 2 gloo processes on the CPU: training equals one process with the same global batch and seeds
(to float tolerance), and sharded sampling equals one process exactly."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.training import load_checkpoint
from dist_run import command

SCRIPT = str(Path(__file__).with_name("dist_run.py"))
pytestmark = [pytest.mark.dist, pytest.mark.slow]


def run(args, procs=1):
    if procs == 1:  # the one-process reference: the same command in this process (what a process of its own adds,
        # the process group's set-up and teardown, is the torchrun runs'); one thread, as the MLP's runs always use
        assert main(command(args)) == 0
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), SCRIPT, *args]
    # one thread per process: GEMM results can depend on the thread count (torchrun defaults to 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    # the head too: a worker's own message ("terminate called ...") comes before torchrun's long report
    assert res.returncode == 0, res.stderr[:1500] + "\n...\n" + res.stderr[-1500:]


@pytest.mark.parametrize("objective", ["dsm", "cdl", "stf"])
def test_two_process_training_equals_one_process(objective, tmp_path):
    run(["train", str(tmp_path / "one"), objective])
    run(["train", str(tmp_path / "two"), objective], procs=2)
    a, sa = load_checkpoint(tmp_path / "one")
    b, sb = load_checkpoint(tmp_path / "two")
    assert sa["step"] == sb["step"] == 12
    for k in a:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert (tmp_path / "two" / "log.jsonl").read_text().count("\n") == 1  # one process wrote the log


def test_sharded_sampling_equals_one_process(tmp_path):
    run(["train", str(tmp_path / "r"), "dsm"])
    for sampler in ("ddpm", "heun"):
        run(["sample", str(tmp_path / "r"), str(tmp_path / "one.npz"), sampler])
        run(["sample", str(tmp_path / "r"), str(tmp_path / "two.npz"), sampler], procs=2)
        one, two = np.load(tmp_path / "one.npz")["samples"], np.load(tmp_path / "two.npz")["samples"]
        assert one.shape == (37, 2) and np.array_equal(one, two)


def test_the_parallel_sampler_splits_each_sweep_across_processes(tmp_path):
    """'difflab sample --sampler picard-ddim' under torchrun (Run.sample with the default group): every process
    evaluates its share of each sweep's rows; the samples and sweeps equal one process's up to float32 round-off
    of the network on other row shapes."""
    import json

    run(["train", str(tmp_path / "r"), "dsm"])
    run(["sample", str(tmp_path / "r"), str(tmp_path / "one.npz"), "picard-ddim"])
    run(["sample", str(tmp_path / "r"), str(tmp_path / "two.npz"), "picard-ddim"], procs=2)
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        one, two, s1, s2 = a["samples"], b["samples"], json.loads(str(a["stats"])), json.loads(str(b["stats"]))
    assert one.shape == (37, 2) and (s1["processes"], s2["processes"]) == (1, 2)
    assert np.abs(one - two).max() <= 1e-5 * np.abs(one).max()
    assert s1["iterations"] == s2["iterations"] and s1["nfe_per_sample"] == s2["nfe_per_sample"]
