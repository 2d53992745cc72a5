"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end at toy sizes on whatever device there is, so
the one run a lent GPU gets is not spent on a broken script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One thread: with torch's default of one per core, the toy sizes took 190-220 s on two cores busy with other work
# (every op waits for its slowest thread), 7-9 s with one; what the test checks does not depend on the thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_sizes_and_writes_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--skip",
                          "tests,nccl", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert json.loads(run.stdout.strip().splitlines()[-1]) == result
    assert {"throughput", "latency", "fid"} <= result.keys() and "tests" not in result
    assert not any("error" in result[part] for part in ("throughput", "latency", "fid")), result
    assert result["throughput"]["edm"]["img_per_s"] > 0 and len(result["latency"]["rows"]) == 4
    fid = result["fid"]
    assert fid["img_per_s"] > 0 and fid["max_abs_diff_vs_cpu"] <= 1e-4 * max(fid["max_abs_feature"], 1.0)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--skip", "tests,fast"],
                         cwd=ROOT, capture_output=True, text=True, env=ENV)
    assert bad.returncode != 0 and "unknown part(s) fast" in bad.stderr
