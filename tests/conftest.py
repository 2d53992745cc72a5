"""Shared fixtures (analytic 2-D denoisers) and helpers; test modules import the helpers with
``from conftest import ...`` (pytest puts tests/ on sys.path)."""

import sys
import warnings

import pytest
import torch

from difflab.denoisers import GaussianDenoiser, GMMDenoiser
from difflab.devices import STATE_DTYPE_ENV, STATE_DTYPES, state_dtype

torch.set_num_threads(1)
F64 = torch.float64


def round_off(dtype: torch.dtype) -> float:
    """"Equal up to round-off" at scale 1 for a sampler state of ``dtype``."""
    return 1e-12 if dtype == torch.float64 else 1e-4


# The sampler state's default dtype (float64 on the CPU, or DIFFLAB_STATE_DTYPE's) and its round-off. A test module
# imports them (``from conftest import ROUND_OFF, STATE``); in the STATE_DTYPE_SUITES the sampler_state_dtype
# fixture rebinds them in the test's module for each of its runs.
STATE = state_dtype()
ROUND_OFF = round_off(STATE)

# The sampler and objective suites: each of their tests runs twice in this process, with the default float64 state
# and with float32 state ([float64] / [float32] in the test ids; tests/test_state_dtype.py checks the set-up). The
# float32 runs repeat the float64 ones' coverage in the other dtype: marked slow, so `make test-fast` skips them.
STATE_DTYPE_SUITES = frozenset({
    "test_samplers", "test_picard", "test_picard_accel", "test_device_resident", "test_dpmpp", "test_objectives",
    "test_stf", "test_sa", "test_cdl", "test_itd", "test_draws",
})


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in STATE_DTYPE_SUITES:
        metafunc.parametrize("sampler_state_dtype", ["float64", pytest.param("float32", marks=pytest.mark.slow)],
                             indirect=True)


@pytest.fixture(autouse=True)
def sampler_state_dtype(request, monkeypatch) -> torch.dtype:
    """The default sampler state dtype of this test (what ``draw_noise`` and ``sample_chain`` use without a dtype).

    In the STATE_DTYPE_SUITES it is a parameter: "float64" removes DIFFLAB_STATE_DTYPE (the CPU's default, float64),
    "float32" sets it, for this test and any process it starts, and the test module's STATE and ROUND_OFF (and this
    module's) are rebound to the run's. Elsewhere it changes nothing. Function-scoped and autouse, it is set up before
    the test's other function-scoped fixtures; a module- or session-scoped fixture would see the outer default only."""
    name = getattr(request, "param", None)
    if name is None:
        return STATE
    if name == "float64":
        monkeypatch.delenv(STATE_DTYPE_ENV, raising=False)
    else:
        monkeypatch.setenv(STATE_DTYPE_ENV, name)
    dtype = state_dtype()
    assert dtype == STATE_DTYPES[name], (name, dtype)
    for module in {request.module, sys.modules[__name__]}:
        for attr, value in (("STATE", dtype), ("ROUND_OFF", round_off(dtype))):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, value)
    return dtype


@pytest.fixture(scope="session", autouse=True)
def difflab_cache(tmp_path_factory):
    """The session's DIFFLAB_CACHE, never the user's ~/.cache/difflab: the digits classifier that
    ``--features classifier:digits`` trains on first use is trained once here and kept for the later tests."""
    path = tmp_path_factory.mktemp("difflab-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFLAB_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def digits_classifier(difflab_cache):
    """The folders of the digits feature classifier in the session's DIFFLAB_CACHE (trained by the first test that
    needs it, here or through ``--features classifier:digits``). A study that keeps its classifier in its own folder
    gets a copy: the model it would train there (a folder's name hashes the data, seed and epochs, so only the
    same model is ever served from it)."""
    from difflab.metrics.classifier import classifier_for

    classifier_for("digits", difflab_cache / "classifiers")
    found = sorted((difflab_cache / "classifiers").glob("classifier-digits-*"))
    assert found, "classifier_for left no classifier-digits-* folder"
    return found


def seed_classifiers(folders, cache_dir) -> list:
    """Copy the session's classifier ``folders`` into a study's ``cache_dir``; returns their model files there."""
    import shutil

    for folder in folders:
        shutil.copytree(folder, cache_dir / folder.name)
    return sorted(cache_dir.rglob("model.safetensors"))


@pytest.fixture
def gauss2d() -> GaussianDenoiser:
    """A correlated 2-D Gaussian with a non-zero mean: analytic ground truth for samplers and objectives."""
    return GaussianDenoiser(torch.tensor([0.5, -1.0], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64))


@pytest.fixture
def gmm2d() -> GMMDenoiser:
    """A three-component 2-D mixture with full, diagonal and isotropic shapes folded into full covariances."""
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64),
                        torch.diag(torch.tensor([0.05, 0.4], dtype=F64)), 0.1 * torch.eye(2, dtype=F64)])
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.5]], dtype=F64)
    return GMMDenoiser(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


def moments_match(x: torch.Tensor, den, k: float = 5.0) -> None:
    """Assert that samples x (n, d) have a Gaussian denoiser's moments: the mean within k standard errors, each
    covariance entry within k standard errors of the Gaussian's (``den.mean`` (d,), ``den.cov`` (d, d))."""
    n = len(x)
    C = den.cov
    se_mean = (C.diagonal() / n).sqrt()
    assert bool(((x.mean(0) - den.mean).abs() < k * se_mean).all()), (x.mean(0), den.mean)
    se_cov = ((C**2 + C.diagonal()[:, None] * C.diagonal()[None, :]) / n).sqrt()
    assert bool(((torch.cov(x.T) - C).abs() < k * se_cov).all()), (torch.cov(x.T), C)


def save_scripted(module: torch.nn.Module, path) -> None:
    """torch.jit.script + save, without torch's deprecation warning for TorchScript."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))


class FakeEDMInception(torch.nn.Module):
    """EDM convention: forward(x, return_features); features = per-channel mean, min, max of the input."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.shape[1] == 3, "expected 3 channels"
        f = torch.cat([x.mean(dim=(2, 3)), x.amin(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return f if return_features else f.sum(dim=1, keepdim=True)
