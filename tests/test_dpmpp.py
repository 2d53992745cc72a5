"""DPM-Solver++ 2M (samplers/dpmpp.py): diffusers' DPMSolverMultistepScheduler (VP grid) and
EDMDPMSolverMultistepScheduler (EDM grid) on exact denoisers in float64, the parallel sampler's fixed point over its
[x_j, D_{j-1}] state, and its accuracy against DDIM / Euler on a Gaussian."""

import importlib

import numpy as np
import pytest
import torch

from conftest import ROUND_OFF
from difflab import devices
from difflab.denoisers import EDMPrecond
from difflab.errors import DifflabError
from difflab.nets import MLP
from difflab.samplers import Noise, draw_noise, make_chain, picard, run_chain, sample_chain
from difflab.samplers.starts import FROZEN_ROWS, Frozen, extrapolated_start
from difflab.schedules import DDPMSchedule, edm_sigma_steps

F64 = torch.float64
M = 16


class _Wide:
    """A module whose float32 is float64: diffusers' DPM-Solver schedulers build their tables in float32 and upcast
    the step's sample to it; widened, they do the same arithmetic in float64, comparable to 1e-10."""

    def __init__(self, module, wide):
        self._module, self._wide = module, wide

    def __getattr__(self, name):
        return self._wide if name == "float32" else getattr(self._module, name)


@pytest.fixture
def diffusers(monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    for name in ("scheduling_dpmsolver_multistep", "scheduling_edm_dpmsolver_multistep"):
        module = importlib.import_module(f"diffusers.schedulers.{name}")
        monkeypatch.setattr(module, "torch", _Wide(torch, torch.float64))
        if hasattr(module, "np"):
            monkeypatch.setattr(module, "np", _Wide(np, np.float64))
    return diffusers


@pytest.fixture(params=["gauss2d", "gmm2d"])
def exact(request):
    """The exact denoiser of the Gaussian (affine) and of the mixture (not)."""
    return request.getfixturevalue(request.param)


VP = [(5, "trailing", "linear"), (10, "trailing", "linear"), (20, "trailing", "linear"),
      (10, "linspace", "linear"), (10, "trailing", "squaredcos_cap_v2"), (10, "trailing", "scaled_linear")]
KIND = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled_linear"}


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # (diffusers' np.array(tensor))
@pytest.mark.parametrize(("steps", "spacing", "beta_schedule"), VP)
def test_the_vp_grid_equals_diffusers_dpm_solver_multistep(diffusers, exact, steps, spacing, beta_schedule):
    """diffusers' 0-based timestep t is difflab's t + 1: its "trailing" is difflab's, its own DPM "linspace" (n + 1
    points, the lowest dropped) goes in as a list. Measured max differences 9e-16 .. 9.3e-15."""
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule=beta_schedule, algorithm_type="dpmsolver++",
                                                  solver_order=2, prediction_type="sample", timestep_spacing=spacing)
    sched.set_timesteps(steps)
    schedule = DDPMSchedule(kind=KIND[beta_schedule])
    torch.testing.assert_close(schedule.abar[1:], sched.alphas_cumprod, rtol=1e-12, atol=0)
    t = sched.timesteps + 1
    if spacing == "trailing":
        assert torch.equal(schedule.timesteps(steps, "trailing"), t)
        chain = make_chain("dpmpp-2m", exact, steps=steps, schedule=schedule)  # (trailing: the default)
    else:
        chain = make_chain("dpmpp-2m", exact, steps=t.tolist(), schedule=schedule)
    noise = draw_noise(0, range(M), (2,), steps, False, F64)
    ours = run_chain(chain, noise)
    x = noise.x_T.clone()
    for i, ti in enumerate(sched.timesteps):
        s = sched.sigmas[i]  # the VP state is (x0 + s n) / sqrt(1 + s^2)
        x = sched.step(exact(x * (1 + s**2).sqrt(), s), ti, x).prev_sample
    assert x.dtype == F64 and float((ours - x).abs().max()) < 1e-10
    assert float((ours - noise.x_T).abs().max()) > 0.1  # (it sampled something)


EDM = [(5, {}), (10, {}), (20, {}), (10, {"sigma_min": 0.01, "sigma_max": 20.0, "rho": 5.0})]


@pytest.mark.parametrize(("steps", "options"), EDM)
def test_the_edm_grid_equals_diffusers_edm_dpm_solver_multistep(diffusers, exact, steps, options):
    """The same Karras sigmas and sigma-space state; diffusers' EDM scheduler takes an eps-preconditioned output, so
    the exact D goes in as (D - c_skip x) / c_out. Measured max differences 1.3e-15 .. 6.4e-15."""
    grid = {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, **options}
    sched = diffusers.EDMDPMSolverMultistepScheduler(**grid, sigma_data=0.5, prediction_type="epsilon",
                                                     algorithm_type="dpmsolver++", solver_order=2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # (its ramp is a torch.linspace in the default dtype)
    try:
        sched.set_timesteps(steps)
    finally:
        torch.set_default_dtype(default)
    torch.testing.assert_close(sched.sigmas, edm_sigma_steps(steps, **grid), rtol=1e-14, atol=0)
    chain = make_chain("dpmpp-2m-edm", exact, steps=steps, **options)
    noise = draw_noise(0, range(M), (2,), steps, False, F64)
    ours = run_chain(chain, noise)
    x = chain.prior_scale * noise.x_T
    sd = sched.config.sigma_data
    for i, ti in enumerate(sched.timesteps):
        s = sched.sigmas[i]
        c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
        x = sched.step((exact(x, s) - c_skip * x) / c_out, ti, x).prev_sample
    assert x.dtype == F64 and float((ours - x).abs().max()) < 1e-10
    assert float((ours - noise.x_T).abs().max()) > 0.1


CHAINS = [("dpmpp-2m", {"steps": 12}), ("dpmpp-2m", {"steps": 12, "spacing": "quadratic", "clip": 2.0}),
          ("dpmpp-2m-edm", {"steps": 12})]
VARIANTS = [{}, {"window": 1}, {"window": 4}, {"accel": "taa"}, {"accel": "taa", "window": 4, "init": "extrapolate"},
            {"init": "warm", "warm_steps": 3}, {"criterion": "step", "convergence": "batch", "max_batch": 7}]


def _setup(name, options, den, M=M):
    chain = make_chain(name, den, **options)
    noise = draw_noise(0, range(M), (2,), chain.n_steps, chain.stochastic)
    return chain, noise, run_chain(chain, noise)


@pytest.mark.parametrize(("name", "options"), CHAINS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_picard_at_tol0_is_the_sequential_chain(name, options, variant, gmm2d):
    chain, noise, seq = _setup(name, options, gmm2d)
    res = picard(chain, noise, tol=0.0, **variant)
    torch.testing.assert_close(res.x, seq, rtol=0, atol=ROUND_OFF * float(seq.abs().max()))
    assert res.converged and res.iterations <= chain.n_steps
    if variant.get("init") == "extrapolate":
        assert res.rounds == 1 and res.iterations + res.rounds <= chain.n_steps
    if variant == {"window": 1}:
        assert torch.equal(res.nfe, torch.full((M,), float(chain.n_steps), dtype=F64))  # one call a step


def test_picard_sums_the_drifts_of_x_and_takes_the_carried_estimate_as_stepped(gmm2d):
    """Summed like x, the carried D_{j-1} of every window slot would become a sum of the estimates before it: the
    20-step chain then took all 20 sweeps at tol 0.1. Taken as the step returns it: 7 sweeps (6.2 a sample) at a
    largest distance 0.10 from the sequential samples (DDIM on the same grid: 5 sweeps, 0.15)."""
    chain, noise, seq = _setup("dpmpp-2m", {"steps": 20}, gmm2d)
    res = picard(chain, noise, tol=0.1)
    assert res.iterations <= 10 and float((res.x - seq).abs().max()) < 0.2
    x, stats = sample_chain(chain, M, seed=0, shape=(2,), parallel={"tol": 0.0})
    torch.testing.assert_close(x, seq, rtol=0, atol=ROUND_OFF * float(seq.abs().max()))
    assert stats.sampler == "picard-dpmpp-2m" and stats.extra["sequential_nfe_per_sample"] == 20


def test_the_state_carries_the_estimate_and_callbacks_see_x(gmm2d):
    chain, noise, _ = _setup("dpmpp-2m-edm", {"steps": 6}, gmm2d, M=3)
    assert torch.equal(chain.nfe, torch.ones(6, dtype=torch.long)) and not chain.stochastic
    calls, seen = [], []

    def counting(x, sigma):
        calls.append(len(x))
        return gmm2d(x, sigma)

    x = run_chain(make_chain("dpmpp-2m-edm", counting, steps=6), noise, callback=lambda j, x: seen.append(x.shape))
    assert x.shape == (3, 2) and seen == [(3, 2)] * 6 and calls == [3] * 6  # one call a step
    state = chain.lift(x, 2 * x)
    assert state.shape == (3, 2, 2) and all(torch.equal(a, b) for a, b in zip(chain.split(state), (x, 2 * x),
                                                                               strict=True))
    sweeps = []
    picard(chain, noise, tol=0.0, window=2, callback=lambda it, x_end, X: sweeps.append((x_end.shape, X.shape)))
    assert sweeps == [((3, 2), (7, 3, 2))] * len(sweeps) and len(sweeps) == 6


def test_the_extrapolated_start_steps_with_the_frozen_estimate_carried(gmm2d):
    """extend reads the steps off at lift(0, x0) and lift(1, x0): from the P-th state, which carries x0, that is
    stepping with the frozen estimate itself."""
    chain, noise, _ = _setup("dpmpp-2m", {"steps": 12}, gmm2d)
    X = chain.lift(chain.prior_scale * noise.x_T).unsqueeze(0).repeat(13, 1, 1, 1)
    P, x0 = extrapolated_start(chain, noise, X, 3)
    assert P == 3 and torch.equal(chain.split(X[P])[1], x0)
    step, state = chain.step_for(Frozen(x0)), X[P]
    for j in range(P, chain.n_steps):
        state = step(state, j, None, {FROZEN_ROWS: torch.arange(M)})
        torch.testing.assert_close(X[j + 1], state, rtol=0, atol=ROUND_OFF)


def _moments(chain):
    """The exact mean (2,) and covariance (2, 2) of a chain that is affine in x_T (deterministic, over the Gaussian's
    affine denoiser): its image of 0 and of the unit vectors."""
    out = run_chain(chain, Noise(torch.cat([torch.zeros(1, 2, dtype=F64), torch.eye(2, dtype=F64)]), None))
    L = (out[1:] - out[0]).T
    x_T = torch.tensor([[0.3, -1.2]], dtype=F64)
    torch.testing.assert_close(run_chain(chain, Noise(x_T, None)), out[0] + x_T @ L.T)  # (it is affine)
    return out[0], L @ L.T


def _errors(name, den, **options):
    mean, cov = _moments(make_chain(name, den, **options))
    return float((mean - den.mean).norm()), float((cov - den.cov).norm())


def test_2m_is_closer_to_the_gaussian_than_ddim_and_euler(gauss2d):
    """Covariance errors (Frobenius) of the sampled distribution, exact: VP grid, 10 trailing steps, 2M 0.127 and
    DDIM 0.454; EDM grid, 20 steps, 2M 0.119 and Euler 0.357. The means are off by the prior's N(0, I) alone (3e-3
    to 9e-3, alike). The uniform grid (down to t = 1) is why the default is trailing: 2M 1.02 there, DDIM 0.49."""
    mean, cov = _errors("dpmpp-2m", gauss2d, steps=10)
    _, cov_ddim = _errors("ddim", gauss2d, steps=10, spacing="trailing")
    assert cov < 0.2 and cov < 0.4 * cov_ddim and mean < 5e-3
    mean, cov = _errors("dpmpp-2m-edm", gauss2d, steps=20)
    _, cov_euler = _errors("euler", gauss2d, steps=20)
    assert cov < 0.2 and cov < 0.5 * cov_euler and mean < 1.2e-2
    assert _errors("dpmpp-2m", gauss2d, steps=10, spacing="uniform")[1] > 0.8


@pytest.mark.parametrize(("name", "options", "msg"), [
    ("dpmpp-2m", {"eta": 0.5}, "sampler 'dpmpp-2m' has no option 'eta': its options are steps, spacing, clip"),
    ("dpmpp-2m", {"spacng": "uniform"}, "sampler 'dpmpp-2m' has no option 'spacng' (did you mean 'spacing'?)"),
    ("dpmpp-2m-edm", {"spacing": "uniform"}, "sampler 'dpmpp-2m-edm' has no option 'spacing': its options are "
                                             "steps, sigma_min, sigma_max, rho"),
    ("dpmpp-2m-edm", {"S_churn": 1.0}, "sampler 'dpmpp-2m-edm' has no option 'S_churn'"),
    ("dpmpp", {}, "unknown sampler 'dpmpp' (did you mean 'dpmpp-2m'?)"),
    ("dpmpp-2m", {"steps": [5, 9, 3]}, "timesteps must be strictly decreasing"),
    ("dpmpp-2m", {"spacing": "even"}, "unknown spacing 'even'"),
])
def test_bad_options_are_refused(name, options, msg, gauss2d):
    with pytest.raises(DifflabError) as err:
        make_chain(name, gauss2d, **options)
    assert str(err.value).startswith(msg) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["dpmpp-2m", "dpmpp-2m-edm"])
def test_the_steps_and_sweeps_stay_on_the_network_device(name, monkeypatch):
    """A meta-device network: a CPU tensor left in a step or a sweep fails when it meets the state."""
    meta = torch.device("meta")
    torch.manual_seed(0)
    chain = make_chain(name, EDMPrecond(MLP(2, width=8, depth=1)).to(meta), steps=6)
    noise = draw_noise(0, range(3), (2,), 6, False)  # drawn on the CPU
    assert run_chain(chain, noise).device == meta
    monkeypatch.setattr(devices, "host", lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.device == meta else t)
    for options in ({"window": 4, "accel": "taa", "init": "extrapolate"}, {"init": "warm", "warm_steps": 2}):
        res = picard(chain, noise.to(meta), max_sweeps=3, **options)
        assert res.x.device == meta and res.x.shape == (3, 2)
