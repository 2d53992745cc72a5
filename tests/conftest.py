"""Shared fixtures (analytic 2-D denoisers) and helpers; test modules import the helpers with
``from conftest import ...`` (pytest puts tests/ on sys.path)."""

import warnings

import pytest
import torch

from difflab.denoisers import GaussianDenoiser, GMMDenoiser
from difflab.devices import state_dtype

torch.set_num_threads(1)
F64 = torch.float64
# The sampler state's dtype in this run: float64, or float32 under DIFFLAB_STATE_DTYPE=float32 (the sampler and
# objective suites run under both: tests/test_state_dtype.py), and "equal up to round-off" in it at scale 1.
STATE = state_dtype()
ROUND_OFF = 1e-12 if STATE == torch.float64 else 1e-4


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
