import math

import numpy as np
import pytest
import torch

from conftest import ROUND_OFF, STATE, moments_match
from difflab.denoisers import EDMPrecond
from difflab.errors import DifflabError
from difflab.nets import MLP
from difflab.samplers import draw_noise, make_chain, run_chain, sample_chain
from difflab.schedules import DDPMSchedule

N = 6000  # samples for distribution checks


CASES = [
    ("ddpm", {"steps": 1000, "variance": "beta"}),
    ("ddpm", {"steps": 1000, "variance": "beta_tilde"}),
    ("ddpm", {"steps": 100, "variance": "beta", "spacing": "quadratic"}),
    ("ddim", {"steps": 50, "eta": 0.0}),
    # stochastic DDIM needs many steps: x0_hat ignores Var[x0 | x_t], so coarse ancestral steps under-disperse
    ("ddim", {"steps": 1000, "eta": 1.0}),
    ("ddim", {"steps": 500, "eta": 0.5, "spacing": "quadratic"}),
    # Heun-18 inflates a unit Gaussian's variance by ~11% (discretisation, not sampling error): use finer grids
    ("heun", {"steps": 64}),
    ("heun", {"steps": 64, "S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0}),
    ("euler", {"steps": 200}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_samplers_driven_by_the_exact_denoiser_produce_the_gaussian(name, options, gauss2d):
    chain = make_chain(name, gauss2d, **options)
    x, stats = sample_chain(chain, N, seed=3, shape=(2,))
    assert x.shape == (N, 2) and x.dtype == STATE
    moments_match(x, gauss2d)
    assert stats.n_samples == N and stats.wall_time_s > 0


def test_samplers_reject_a_wrong_distribution(gauss2d):
    """The moment check can fail: a sampler run with a deliberately wrong variance is caught."""
    chain = make_chain("ddpm", lambda x, s: 0.8 * gauss2d(x, s), steps=200)
    x, _ = sample_chain(chain, N, seed=3, shape=(2,))
    with pytest.raises(AssertionError):
        moments_match(x, gauss2d)


def test_nfe_accounting(gauss2d):
    assert make_chain("heun", gauss2d, steps=18).nfe.sum() == 35
    assert make_chain("euler", gauss2d, steps=18).nfe.sum() == 18
    assert make_chain("ddpm", gauss2d, steps=250).nfe.sum() == 250
    calls = []

    def counting(x, s):
        calls.append(len(x))
        return gauss2d(x, s)

    _, stats = sample_chain(make_chain("heun", counting, steps=10), 5, seed=0, shape=(2,))
    assert stats.nfe_per_sample == 19 and sum(calls) == 19 * 5


def _exact_flow(den, y, s_from: float):
    """The probability-flow ODE map of a Gaussian from noise level s_from to 0, in sigma-space."""
    lam, U = den.lam[0], den.U[0]
    z = (y - den.means[0]) @ U
    return den.means[0] + (z * (lam / (lam + s_from**2)).sqrt()) @ U.T


def test_ddim_eta0_and_heun_converge_to_the_exact_probability_flow(gauss2d):
    """DDIM(eta=0) is a first-order and Heun a second-order solver of the same ODE: errors against the exact
    Gaussian flow halve (DDIM) and quarter (Heun) when the steps double, and the two samplers agree."""
    sched = DDPMSchedule()
    sT = float(sched.sigma_max)
    noise = draw_noise(7, range(200), (2,), 0, stochastic=False)
    exact_ddim = _exact_flow(gauss2d, noise.x_T / sched.abar[-1].sqrt(), sT)
    exact_heun = _exact_flow(gauss2d, sT * noise.x_T, sT)

    def err(name, steps, exact, **kw):
        return (run_chain(make_chain(name, gauss2d, steps=steps, **kw), noise) - exact).abs().max().item()

    d500, d1000 = err("ddim", 500, exact_ddim), err("ddim", 1000, exact_ddim)
    assert d1000 < 0.01 and 1.8 < d500 / d1000 < 2.2
    h100, h200 = (err("heun", n, exact_heun, sigma_max=sT, sigma_min=1e-3) for n in (100, 200))
    assert h200 < 0.002 and 3.5 < h100 / h200 < 4.5
    ddim = run_chain(make_chain("ddim", gauss2d, steps=1000), noise)
    heun = run_chain(make_chain("heun", gauss2d, steps=200, sigma_max=sT, sigma_min=1e-3), noise)
    assert (ddim - heun).abs().max() < 0.01


def test_ddim_eta1_is_ddpm_with_beta_tilde(gmm2d):
    noise = draw_noise(11, range(64), (2,), 40, stochastic=True)
    a = run_chain(make_chain("ddim", gmm2d, steps=40, eta=1.0), noise)
    b = run_chain(make_chain("ddpm", gmm2d, steps=40, variance="beta_tilde"), noise)
    torch.testing.assert_close(a, b, rtol=ROUND_OFF, atol=ROUND_OFF)


def test_explicit_timesteps_equal_the_named_spacing(gmm2d):
    t = DDPMSchedule().timesteps(30, "quadratic")
    noise = draw_noise(0, range(16), (2,), 30, stochastic=True)
    a = run_chain(make_chain("ddpm", gmm2d, steps=30, spacing="quadratic"), noise)
    b = run_chain(make_chain("ddpm", gmm2d, steps=t.tolist()), noise)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "heun"])
def test_sample_k_is_the_same_whatever_the_batch_size(name):
    torch.manual_seed(0)
    model = EDMPrecond(MLP(2, width=32, depth=2)).eval()
    chain = make_chain(name, model, steps=20)
    a, _ = sample_chain(chain, 37, seed=5, shape=(2,), batch_size=37)
    b, _ = sample_chain(chain, 37, seed=5, shape=(2,), batch_size=5)
    c, _ = sample_chain(chain, 10, seed=5, shape=(2,), batch_size=3, start=20)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(a[20:30], c, rtol=0, atol=1e-6)
    d, _ = sample_chain(chain, 37, seed=6, shape=(2,))
    assert (a - d).abs().min() > 0  # another seed, other samples


def test_noise_streams_are_per_sample():
    a = draw_noise(1, [0, 1, 2], (3,), 4, stochastic=True)
    b = draw_noise(1, [2], (3,), 4, stochastic=True)
    assert torch.equal(a.x_T[2], b.x_T[0]) and torch.equal(a.z[2], b.z[0])
    c = draw_noise(1, [2], (3,), 0, stochastic=False)
    assert torch.equal(c.x_T[0], b.x_T[0])  # the prior draw does not depend on the step count


@pytest.mark.parametrize(("name", "options", "msg"), [
    ("dpm", {}, "unknown sampler"),
    ("ddpm", {"eta": 0.5}, "has no option 'eta'"),
    ("ddpm", {"variance": "huge"}, "unknown DDPM variance"),
    ("ddim", {"eta": -1.0}, "eta must be >= 0"),
    ("ddim", {"steps": 0}, "number of steps"),
    ("ddpm", {"steps": [5, 9, 3]}, "strictly decreasing"),
    ("heun", {"S_churn": -1.0}, "S_churn"),
])
def test_bad_sampler_options(name, options, msg, gauss2d):
    with pytest.raises(DifflabError, match=msg):
        make_chain(name, gauss2d, **options)


def _karras_alg2_reference(denoise, x_T, z, steps, sigma_min, sigma_max, rho, S_churn, S_tmin, S_tmax, S_noise,
                           heun):
    """Karras et al. 2022, Algorithm 2, as a plain float64 numpy loop (independent of difflab's sampler code).

    ``denoise(x, sigma)``: numpy (M, d) -> (M, d); x_T (M, d) and z (M, N, d) the chain's pre-drawn noise.
    """
    i = np.arange(steps, dtype=np.float64)
    sig = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig = np.append(sig, 0.0)
    x = sig[0] * x_T
    for k in range(steps):
        s, s_next = float(sig[k]), float(sig[k + 1])
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0.0
        s_hat = s * (1 + gamma)
        x_hat = x + math.sqrt(s_hat**2 - s**2) * S_noise * z[:, k]
        d = (x_hat - denoise(x_hat, s_hat)) / s_hat
        x_next = x_hat + (s_next - s_hat) * d
        if heun and s_next != 0:
            d2 = (x_next - denoise(x_next, s_next)) / s_next
            x_next = x_hat + (s_next - s_hat) * 0.5 * (d + d2)
        x = x_next
    return x


@pytest.mark.parametrize("name", ["heun", "euler"])
def test_edm_churn_matches_a_float64_algorithm2_reference(name, gauss2d):
    steps, opts = 18, {"S_churn": 40.0, "S_tmin": 0.05, "S_tmax": 50.0, "S_noise": 1.003}
    chain = make_chain(name, gauss2d, steps=steps, **opts)
    noise = draw_noise(3, range(32), (2,), steps, stochastic=True)
    got = run_chain(chain, noise)

    def denoise(x, sigma):
        return gauss2d(torch.from_numpy(x), torch.tensor(sigma, dtype=torch.float64)).numpy()

    # the range leaves the first steps (sigma > 50) and the last ones (sigma < 0.05) without churn
    want = _karras_alg2_reference(denoise, noise.x_T.numpy(), noise.z.numpy(), steps, 0.002, 80.0, 7.0,
                                  heun=name == "heun", **opts)
    assert got.dtype == STATE
    rel = np.abs(got.numpy() - want).max() / np.abs(want).max()
    assert rel < ROUND_OFF, rel
