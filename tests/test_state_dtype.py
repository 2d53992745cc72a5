"""The sampler and objective suites pass with float32 sampler state as with float64: conftest's STATE_DTYPE_SUITES
run each of their tests twice in this process, [float64] and [float32], where "equal up to round-off" means the
run's (conftest.ROUND_OFF) and every default-dtype buffer is float32. These tests check that set-up and the
environment variable behind it."""

import os
from pathlib import Path

import pytest
import torch

import conftest
from conftest import ROUND_OFF, STATE, STATE_DTYPE_SUITES
from difflab.devices import STATE_DTYPE_ENV, state_dtype
from difflab.samplers import draw_noise, make_chain, sample_chain


def test_the_environment_sets_the_default_state_dtype(monkeypatch):
    monkeypatch.setenv(STATE_DTYPE_ENV, "float32")
    assert state_dtype() == torch.float32 and draw_noise(0, range(2), (3,), 4, True).z.dtype == torch.float32
    assert state_dtype("float64") == torch.float64  # an explicit dtype wins
    monkeypatch.setenv(STATE_DTYPE_ENV, "half")
    with pytest.raises(Exception, match="DIFFLAB_STATE_DTYPE must be float32 or float64"):
        state_dtype()


@pytest.mark.parametrize("sampler_state_dtype", ["float64", "float32"], indirect=True)
def test_each_run_samples_in_its_dtype_with_its_round_off(sampler_state_dtype, gauss2d, request):
    """The default state dtype, the samples, the module's STATE and ROUND_OFF (and conftest's) are the run's, the
    one its test id names; a process the test starts inherits it through the environment."""
    name = request.node.callspec.params["sampler_state_dtype"]
    assert sampler_state_dtype == {"float64": torch.float64, "float32": torch.float32}[name]
    assert state_dtype() == sampler_state_dtype == STATE == conftest.STATE
    assert ROUND_OFF == conftest.ROUND_OFF == (1e-12 if name == "float64" else 1e-4)
    x, _ = sample_chain(make_chain("ddim", gauss2d, steps=5), 4, 0, (2,), progress=False)
    assert x.dtype == sampler_state_dtype
    assert os.environ.get(STATE_DTYPE_ENV) == (None if name == "float64" else "float32")


def test_the_suites_exist_and_each_of_their_tests_takes_both_dtypes(request):
    here = Path(__file__).parent
    assert all((here / f"{name}.py").is_file() for name in STATE_DTYPE_SUITES), STATE_DTYPE_SUITES
    for item in request.session.items:
        if item.module.__name__ in STATE_DTYPE_SUITES:
            assert "sampler_state_dtype" in item.callspec.params, item.nodeid
