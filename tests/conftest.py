import pytest
import torch

from difflab.denoisers import GaussianDenoiser, GMMDenoiser

torch.set_num_threads(1)
F64 = torch.float64


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
