"""The sampler and objective suites pass unchanged with float32 sampler state as they do with float64 (the rest of
this run): the same tests, rerun in a subprocess under DIFFLAB_STATE_DTYPE=float32, where "equal up to round-off"
means float32's (conftest.ROUND_OFF) and every default-dtype buffer is float32."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STATE
from difflab.devices import STATE_DTYPE_ENV, state_dtype
from difflab.samplers import draw_noise

SUITES = ["test_samplers.py", "test_picard.py", "test_picard_accel.py", "test_device_resident.py", "test_dpmpp.py",
          "test_objectives.py", "test_stf.py", "test_sa.py", "test_cdl.py", "test_itd.py", "test_draws.py"]


def test_the_environment_sets_the_default_state_dtype(monkeypatch):
    monkeypatch.setenv(STATE_DTYPE_ENV, "float32")
    assert state_dtype() == torch.float32 and draw_noise(0, range(2), (3,), 4, True).z.dtype == torch.float32
    assert state_dtype("float64") == torch.float64  # an explicit dtype wins
    monkeypatch.setenv(STATE_DTYPE_ENV, "half")
    with pytest.raises(Exception, match="DIFFLAB_STATE_DTYPE must be float32 or float64"):
        state_dtype()


@pytest.mark.skipif(STATE == torch.float32, reason="this run is the float32 one")
def test_the_sampler_and_objective_suites_pass_with_float32_state():
    here = Path(__file__).parent
    env = {**os.environ, STATE_DTYPE_ENV: "float32", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          *(str(here / s) for s in SUITES)], cwd=here.parent, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
