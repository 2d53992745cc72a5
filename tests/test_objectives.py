"""Objectives against closed forms: with the exact denoiser of a Gaussian N(mu, C) (eigenvalues l_i), the expected
per-example losses are known at every noise level:
  eps-MSE(sigma)      = sum_i l_i / (l_i + sigma^2)
  x0-MSE(sigma)       = sum_i l_i sigma^2 / (l_i + sigma^2)  (the posterior variance)
so each objective's mean loss equals an integral over its noise distribution, computed here by quadrature."""

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.objectives import OBJECTIVES, DSMEps, EDMLoss, VELoss, VPLoss, build_objective
from difflab.schedules import DDPMSchedule, VPSchedule

B = 200_000


def _data(den, n=B, seed=0):
    return den.sample(n, torch.Generator().manual_seed(seed))


def _mean_and_se(loss: torch.Tensor) -> tuple[float, float]:
    return loss.mean().item(), (loss.std() / len(loss) ** 0.5).item()


def _eps_mse(lam, sigma):
    return (lam[None] / (lam[None] + sigma[:, None] ** 2)).sum(1)


def _x0_mse(lam, sigma):
    return (lam[None] * sigma[:, None] ** 2 / (lam[None] + sigma[:, None] ** 2)).sum(1)


def test_dsm_eps_loss_of_the_exact_denoiser_is_the_mmse(gauss2d):
    lam, sched = gauss2d.lam[0], DDPMSchedule()
    expected = _eps_mse(lam, sched.sigma[1:]).mean().item()
    for antithetic in (False, True):
        loss = DSMEps(sched, antithetic)(gauss2d, _data(gauss2d), torch.Generator().manual_seed(1))
        assert loss.shape == (B,)
        m, se = _mean_and_se(loss)
        assert abs(m - expected) < 5 * se, (m, expected, se)


def test_exact_denoiser_beats_perturbed_ones(gauss2d):
    x0 = _data(gauss2d, 50_000)
    for obj in (DSMEps(), EDMLoss(), VPLoss(), VELoss()):
        exact = obj(gauss2d, x0, torch.Generator().manual_seed(2)).mean()
        for bad in (lambda x, s: 0.9 * gauss2d(x, s), lambda x, s: gauss2d(x, s) + 0.05):
            worse = obj(bad, x0, torch.Generator().manual_seed(2)).mean()
            assert worse > exact * 1.01, type(obj).__name__


def _gauss_hermite_lognormal(f, mean, std, n=80):
    z, w = np.polynomial.hermite_e.hermegauss(n)
    sigma = torch.from_numpy(np.exp(mean + std * z))
    return float((torch.from_numpy(w) * f(sigma)).sum() / np.sqrt(2 * np.pi))


def test_edm_loss_matches_its_integral(gauss2d):
    lam, sd = gauss2d.lam[0], 1.0
    expected = _gauss_hermite_lognormal(lambda s: (s**2 + sd**2) / (s * sd) ** 2 * _x0_mse(lam, s), -1.2, 1.2)
    m, se = _mean_and_se(EDMLoss(sigma_data=sd)(gauss2d, _data(gauss2d), torch.Generator().manual_seed(3)))
    assert abs(m - expected) < 5 * se, (m, expected, se)


def test_vp_and_ve_losses_match_their_integrals(gauss2d):
    lam = gauss2d.lam[0]
    x, w = np.polynomial.legendre.leggauss(200)
    vp = VPSchedule()
    t = torch.from_numpy(vp.eps_t + (1 - vp.eps_t) * (x + 1) / 2)
    expected_vp = float((torch.from_numpy(w) / 2 * _eps_mse(lam, vp.sigma(t))).sum())
    m, se = _mean_and_se(VPLoss()(gauss2d, _data(gauss2d), torch.Generator().manual_seed(4)))
    assert abs(m - expected_vp) < 5 * se, (m, expected_vp, se)
    lo, hi = np.log(0.02), np.log(100)
    sig = torch.from_numpy(np.exp(lo + (hi - lo) * (x + 1) / 2))
    expected_ve = float((torch.from_numpy(w) / 2 * _eps_mse(lam, sig)).sum())
    m, se = _mean_and_se(VELoss()(gauss2d, _data(gauss2d), torch.Generator().manual_seed(5)))
    assert abs(m - expected_ve) < 5 * se, (m, expected_ve, se)


def test_antithetic_timesteps_pair_up():
    t = DSMEps(antithetic=True).sample_t(10, torch.Generator().manual_seed(0))
    assert torch.equal(t[:5] + t[5:], torch.full((5,), 1001))
    assert len(DSMEps(antithetic=True).sample_t(7, torch.Generator().manual_seed(0))) == 7


def test_objectives_are_reproducible_from_the_generator(gauss2d):
    x0 = _data(gauss2d, 64)
    for name in OBJECTIVES:
        obj = build_objective(name, data=x0)
        a = obj(gauss2d, x0, torch.Generator().manual_seed(9))
        b = obj(gauss2d, x0, torch.Generator().manual_seed(9))
        assert torch.equal(a, b) and a.shape == (64,)


@pytest.mark.parametrize(("name", "options", "msg"), [
    ("dsn", {}, "did you mean 'dsm'"),
    ("dsm", {"antithetc": True}, "did you mean 'antithetic'"),
    ("edm", {"P_std": -1.0}, "P_std > 0"),
    ("ve", {"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min < sigma_max"),
])
def test_bad_objective_config(name, options, msg):
    with pytest.raises(DifflabError, match=msg):
        build_objective(name, options)
