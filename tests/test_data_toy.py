import numpy as np
import pytest
import torch

from difflab.data import GMM1D, TOY_SETS, Dino, get_dataset
from difflab.errors import DifflabError


@pytest.mark.parametrize("name", list(TOY_SETS))
def test_toy_sets_are_seeded_standardised_and_finite(name):
    ds = get_dataset(name)
    a, b, c = ds.sample(50_000, seed=3), ds.sample(50_000, seed=3), ds.sample(50_000, seed=4)
    assert a.shape == (50_000, ds.dim) and a.dtype == torch.float64 and bool(torch.isfinite(a).all())
    assert torch.equal(a, b) and not torch.equal(a, c)
    if name != "gmm1d":
        torch.testing.assert_close(a.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=0.03)
        torch.testing.assert_close(a.std(0), torch.ones(2, dtype=torch.float64), rtol=0, atol=0.03)
    assert len(ds.train_data()) == 100_000 and len(ds.eval_data()) == 8_000
    assert not torch.equal(ds.train_data(1000), ds.eval_data(1000))


def test_dino_is_prepared_as_the_spec_says():
    """Undo the standardisation and the (x/54 - 1) 4, (y/48 - 1) 4 map: every point sits on a Datasaurus point
    plus N(0, 0.15^2) jitter in raw units."""
    ds = Dino()
    x = ds.sample(20_000, seed=0).numpy()
    mapped = (ds.raw - [54.0, 48.0]) * [4 / 54, 4 / 48]
    mean, std = mapped.mean(0), np.sqrt(mapped.var(0) + (0.15 * np.array([4 / 54, 4 / 48])) ** 2)
    raw = (x * std + mean) / [4 / 54, 4 / 48] + [54.0, 48.0]
    d2 = ((raw[:, None, :] - ds.raw[None]) ** 2).sum(-1)
    resid = raw - ds.raw[d2.argmin(1)]
    assert np.sqrt(d2.min(1)).max() < 1.0  # 0.15 jitter: never farther than ~6 sigma from its point
    assert abs(resid.std() - 0.15) < 0.01
    assert ds.raw.shape == (142, 2)


def test_dino_exact_denoiser_is_the_mixture_the_samples_come_from():
    """The standardised set has unit variances by construction; the mixture's log-density must rank real points
    above shifted ones, and its posterior mean at a tiny noise level must return a point (nearly) unchanged."""
    ds = Dino()
    den = ds.denoiser()
    torch.testing.assert_close(den.mean, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(den.cov.diagonal(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    x = ds.sample(4_000, seed=5)
    cov = torch.cov(x.T)
    torch.testing.assert_close(cov, den.cov, rtol=0, atol=0.05)
    lp_real, lp_shift = den.log_prob(x), den.log_prob(x + 0.3)
    assert float((lp_real > lp_shift).double().mean()) > 0.9
    jitter = float(den.covs[0, 0, 0].sqrt())
    sig = torch.full((len(x),), jitter / 100, dtype=torch.float64)
    assert float((den(x, sig) - x).abs().max()) < 1e-3 * jitter * 10


def test_gmm1d_samples_match_the_mixture():
    ds = GMM1D()
    x = ds.sample(100_000, seed=0)[:, 0]
    assert abs((x > 0).double().mean() - 0.5) < 0.01
    assert abs(x[x > 0].mean() - 5) < 0.02 and abs(x[x > 0].std() - 1) < 0.02
    den = ds.denoiser()
    assert float(den.mean) == pytest.approx(0.0) and float(den.cov) == pytest.approx(26.0)


def test_unknown_sets_get_a_suggestion():
    with pytest.raises(DifflabError, match="did you mean 'moons'"):
        get_dataset("moon")
    with pytest.raises(DifflabError, match="no such file"):
        get_dataset("data/none.npy")
