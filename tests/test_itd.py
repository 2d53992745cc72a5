import math

import pytest
import torch

from difflab.data import GMM1D
from difflab.errors import DifflabError
from difflab.metrics.nll import itd_nll, nll_summary
from difflab.objectives import build_objective
from difflab.objectives.itd import ITDLoss, data_eigenvalues, default_loc_scale

F64 = torch.float64


def test_itd_likelihood_of_the_exact_gaussian_denoiser_is_its_entropy(gauss2d):
    """The reference Gaussian (identity) differs from the data's, so the integral term must do the work."""
    x = gauss2d.sample(200_000, torch.Generator().manual_seed(0))
    itd = ITDLoss(lam=torch.tensor([1.0, 1.0]))
    nll = itd_nll(gauss2d, x, itd, n_alpha=32)
    assert abs(nll.mean().item() / gauss2d.entropy() - 1) < 0.01
    # the training loss (one Monte-Carlo alpha per example) has the same expectation
    loss = itd(gauss2d, x, torch.Generator().manual_seed(1))
    se = loss.std().item() / math.sqrt(len(loss))
    assert abs(loss.mean().item() - gauss2d.entropy()) < 5 * se


def test_itd_pointwise_log_density_of_the_mixture():
    """Per point, the estimate over 40,000 (alpha, eps) pairs is within 4 standard errors of log p, SE small."""
    den = GMM1D().denoiser()
    itd = ITDLoss(lam=torch.tensor([26.0]))
    n = 40_000
    for x in (-6.0, -5.0, 0.0, 3.0, 5.0):
        xs = torch.full((n, 1), x, dtype=F64)
        terms = itd.nll_terms(den, xs, itd.quadrature_alpha(n), torch.randn(n, 1, generator=torch.Generator()
                                                                            .manual_seed(int(x) + 10), dtype=F64))
        se = terms.std().item() / math.sqrt(n)
        true = -den.log_prob(xs[:1], 0.0).item()
        assert se < (0.15 if x == 0 else 0.08)  # x = 0 lies between the modes: -log p = 13.4, a noisier estimate
        assert abs(terms.mean().item() - true) < 4 * se, (x, terms.mean().item(), true, se)


def test_a_worse_denoiser_has_a_higher_nll(gauss2d):
    x = gauss2d.sample(20_000, torch.Generator().manual_seed(0))
    itd = ITDLoss(lam=torch.tensor([1.0, 1.0]))
    good = itd_nll(gauss2d, x, itd, n_alpha=32).mean()
    bad = itd_nll(lambda y, s: 0.9 * gauss2d(y, s), x, itd, n_alpha=32).mean()
    assert bad > good + 0.1


def test_reference_statistics():
    x = torch.randn(50_000, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * torch.tensor([1.0, 2.0, 3.0])
    lam = data_eigenvalues(x)
    torch.testing.assert_close(lam, torch.tensor([1.0, 4.0, 9.0], dtype=F64), rtol=0.03, atol=0)
    torch.testing.assert_close(data_eigenvalues(x, "diagonal"), x.var(0))
    loc, scale = default_loc_scale(lam)
    assert loc == pytest.approx(-float(lam.log().mean()))
    assert scale == pytest.approx(math.sqrt(1 + 3 / math.pi * float(lam.log().var(unbiased=False))))
    assert default_loc_scale(torch.tensor([1.0, 1.0], dtype=F64)) == (0.0, 3.0)  # d <= 2: the spec's [-9, 9]


def test_importance_weight_is_the_inverse_truncated_density():
    itd = ITDLoss(lam=torch.tensor([1.0, 1.0]))
    a = torch.linspace(-9, 9, 200001, dtype=F64)
    q = 1 / itd.weight(a)
    assert torch.trapezoid(q, a).item() == pytest.approx(1.0, abs=1e-6)
    samples = itd.sample_alpha(100_000, torch.Generator().manual_seed(0))
    assert samples.min() >= -9 and samples.max() <= 9


def test_itd_errors_and_fitting():
    obj = build_objective("itd", data=torch.randn(100, 2, dtype=F64))
    assert obj.lam.shape == (2,)
    with pytest.raises(DifflabError, match="2 dimensions but the data has 3"):
        obj(lambda x, s: x, torch.zeros(4, 3))
    with pytest.raises(DifflabError, match="reference is not set"):
        ITDLoss()(lambda x, s: x, torch.zeros(4, 2))
    s = nll_summary(torch.tensor([1.0, 3.0], dtype=F64), dim=2)
    assert s["nll_nats"] == 2.0 and s["bits_per_dim"] == pytest.approx(1 / math.log(2))
