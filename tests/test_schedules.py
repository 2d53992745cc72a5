import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.schedules import (
    DDPMSchedule,
    VPSchedule,
    abar_to_logsnr,
    abar_to_sigma,
    edm_sigma_steps,
    logsnr_to_abar,
    logsnr_to_sigma,
    sigma_to_abar,
    sigma_to_logsnr,
)


def test_linear_ddpm_table_matches_the_papers_schedule():
    s = DDPMSchedule()
    assert s.abar[0] == 1.0 and s.sigma[0] == 0.0
    assert s.beta[1].item() == pytest.approx(1e-4) and s.beta[1000].item() == pytest.approx(0.02)
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(s.abar[1:], expected, rtol=0, atol=1e-15)
    # the spec: it covers log-SNR roughly [-10.1, 9.2]
    alpha = abar_to_logsnr(s.abar[1:])
    assert alpha.max().item() == pytest.approx(9.21, abs=0.01)
    assert alpha.min().item() == pytest.approx(-10.1, abs=0.05)


def test_cosine_schedule_is_monotone_and_bounded():
    s = DDPMSchedule(kind="cosine")
    assert bool((s.abar[1:] < s.abar[:-1]).all())
    assert s.beta.max() <= 0.999


def test_conversions_round_trip():
    sigma = torch.logspace(-3, 2.5, 50, dtype=torch.float64)
    # abar near 1 carries sigma^2 in its last digits, so this round trip is only good to ~1e-10
    torch.testing.assert_close(abar_to_sigma(sigma_to_abar(sigma)), sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(logsnr_to_sigma(sigma_to_logsnr(sigma)), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(logsnr_to_abar(sigma_to_logsnr(sigma)), sigma_to_abar(sigma), rtol=1e-12, atol=0)


def test_t_from_sigma_inverts_the_table():
    s = DDPMSchedule()
    t = torch.arange(1, 1001)
    assert torch.equal(s.t_from_sigma(s.sigma[t]).long(), t)
    assert torch.equal(s.t_from_sigma(s.sigma[t].float()).long(), t)  # float32 sigma still lands on its t
    torch.testing.assert_close(s.t_from_sigma(s.sigma[t], discrete=False), t.double(), rtol=0, atol=1e-9)
    mid = (s.sigma[10].log() + s.sigma[11].log()).div(2).exp()
    assert s.t_from_sigma(mid, discrete=False).item() == pytest.approx(10.5, abs=1e-9)
    assert s.t_from_sigma(torch.tensor(1e-6), discrete=False).item() == 0.0  # clamped below sigma_1


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("n", [1, 2, 10, 50, 100, 999, 1000])
def test_timesteps_are_strictly_decreasing_and_complete(n, spacing):
    t = DDPMSchedule().timesteps(n, spacing)
    assert len(t) == n
    assert int(t[0]) == 1000 and int(t[-1]) >= 1
    if n > 1:
        assert int(t[-1]) == 1
        assert bool((t[:-1] > t[1:]).all())


def test_full_sequence_is_every_step():
    assert torch.equal(DDPMSchedule().timesteps(1000), torch.arange(1000, 0, -1))


def test_vp_continuous_inverse():
    vp = VPSchedule()
    t = torch.linspace(1e-5, 1, 200, dtype=torch.float64)
    torch.testing.assert_close(vp.t(vp.sigma(t)), t, rtol=1e-9, atol=1e-12)


def test_edm_sigma_steps():
    s = edm_sigma_steps(18)
    assert len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[17].item() == pytest.approx(0.002)
    assert bool((s[:-1] > s[1:]).all())
    rho = 7
    expected = (80 ** (1 / rho) + 5 / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert s[5].item() == pytest.approx(expected, rel=1e-12)
    assert math.isclose(edm_sigma_steps(1)[0].item(), 80.0)


@pytest.mark.parametrize("bad", [lambda: DDPMSchedule(T=1), lambda: DDPMSchedule(kind="sqrt"),
                                 lambda: DDPMSchedule().timesteps(0), lambda: DDPMSchedule().timesteps(1001),
                                 lambda: edm_sigma_steps(0), lambda: edm_sigma_steps(5, sigma_min=100)])
def test_bad_arguments_raise_clear_errors(bad):
    with pytest.raises(DifflabError):
        bad()
