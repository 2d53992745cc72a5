"""The flow-matching samplers (flow-euler, flow-heun; samplers/flow.py) on an exact mixture, in float64:

- they are diffusers' FlowMatchEuler/HeunDiscreteScheduler loops, step for step, once diffusers is made to compute
  in float64, and flow_times is its grid;
- Euler in t on x_t is Euler in sigma on x_t / (1 - t); Heun in t is not Heun in sigma;
- they reach the mixture (moments, component occupancy), and a too-short chain visibly does not;
- a FlowPrecond velocity network is, as a denoiser, exactly the mixture's: every sigma-space sampler agrees;
- their Picard (parallel) forms at tol 0 are the sequential chains, with every option, and under torchrun;
- a sigma-space network is refused at t = 1 in one line that names the fix.
"""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm_euler
import diffusers.schedulers.scheduling_flow_match_heun_discrete as fm_heun
import pytest
import torch
from torch import nn

from difflab.denoisers import EDMPrecond, FlowPrecond, GMMDenoiser, VPPrecond, per_sample
from difflab.errors import DifflabError
from difflab.samplers import PicardWarning, draw_noise, make_chain, picard, run_chain, sample_chain
from difflab.schedules import flow_times

F64 = torch.float64
M = 64  # samples of the step-for-step comparisons


def mixture() -> GMMDenoiser:
    """A three-component 2-D mixture with full, diagonal and isotropic covariances (conftest's gmm2d)."""
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64),
                        torch.diag(torch.tensor([0.05, 0.4], dtype=F64)), 0.1 * torch.eye(2, dtype=F64)])
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.5]], dtype=F64)
    return GMMDenoiser(torch.tensor([0.5, 0.3, 0.2], dtype=F64), means, covs)


@pytest.fixture(scope="module")
def gmm() -> GMMDenoiser:
    return mixture()


def exact_velocity(den, x: torch.Tensor, t) -> torch.Tensor:
    """v*(x_t, t) = (x_t - E[x0 | x_t]) / t of an exact denoiser, float64."""
    return (x - den.flow_x0(x, t)) / per_sample(t, x)


class ExactVelocityNet(nn.Module):
    """A "network" net(x_t, c_noise) that returns the exact velocity of ``den`` at t = c_noise / 1000 (what
    FlowPrecond feeds it): a flow-matching model trained to perfection."""

    def __init__(self, den):
        super().__init__()
        self.den = den
        self.anchor = nn.Parameter(torch.zeros((), dtype=F64))  # (Precond runs the net in its parameters' dtype)
        self.calls = 0

    def forward(self, x_t: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return exact_velocity(self.den, x_t, c_noise / 1000)


class TinyNet(nn.Module):
    """Any backbone F(x_in, c_noise) for the sigma-space wrappers."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2, dtype=F64)

    def forward(self, x, c_noise):
        return self.lin(x) + c_noise[:, None]


def trajectory(chain, noise) -> list[torch.Tensor]:
    """The chain's states x_0 (the prior draw) .. x_n, run sequentially."""
    states = [chain.prior_scale * noise.x_T.clone()]
    run_chain(chain, noise, callback=lambda j, x: states.append(x.clone()))
    return states


# --------------------------------------------------------------------------------------------- diffusers


class _Float64Torch:
    """``torch`` for a diffusers scheduler module, with ``float32`` meaning float64: its grid (np.float32 training
    grid cast with ``.to(dtype=torch.float32)``), its sigmas and step()'s upcast then all run in float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


SCHEDULERS = {"flow-euler": (fm_euler, "FlowMatchEulerDiscreteScheduler"),
              "flow-heun": (fm_heun, "FlowMatchHeunDiscreteScheduler")}


def scheduler(name: str, n: int, shift: float, float64: bool, monkeypatch=None):
    """diffusers' scheduler for ``name`` after set_timesteps(n), built in float64 when ``float64`` (its module's
    ``torch`` is the proxy while ``monkeypatch`` lasts)."""
    module, cls = SCHEDULERS[name]
    if float64:
        monkeypatch.setattr(module, "torch", _Float64Torch())
    sched = getattr(module, cls)(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(n)
    return sched


def distinct_sigmas(name: str, sigmas: torch.Tensor) -> torch.Tensor:
    """The n grid times before the final 0 of a scheduler's sigmas (Heun's repeat every inner one)."""
    s = sigmas[:-1]
    return s if name == "flow-euler" else torch.cat([s[:1], s[1::2]])


def diffusers_loop(sched, den, x: torch.Tensor, heun: bool) -> list[torch.Tensor]:
    """A diffusers pipeline's denoising loop with the exact velocity as the transformer (one model call per entry
    of sched.timesteps, timestep / 1000 = t). Returns the state after each complete step (Heun: its corrector, or
    the final Euler step), n states."""
    states = []
    ts = sched.timesteps
    for i, t in enumerate(ts):
        x = sched.step(exact_velocity(den, x, t / 1000), t, x).prev_sample
        if not heun or i % 2 == 1 or i == len(ts) - 1:
            states.append(x)
    return states


@pytest.mark.parametrize("name", ["flow-euler", "flow-heun"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 7, 28])
def test_flow_chains_are_diffusers_flow_match_schedulers_in_float64(gmm, monkeypatch, name, shift, n):
    ours = flow_times(n, shift)
    assert ours.dtype == F64 and len(ours) == n + 1 and ours[0] == 1 and ours[-1] == 0
    noise = draw_noise(0, range(M), (2,), n, False, F64)
    plain = scheduler(name, n, shift, float64=False)
    assert plain.sigmas.dtype == torch.float32
    torch.testing.assert_close(ours[:-1], distinct_sigmas(name, plain.sigmas).double(), rtol=1e-6, atol=0)
    as_shipped = diffusers_loop(plain, gmm, noise.x_T.clone(), heun=name == "flow-heun")[-1]  # float32 inside

    sched = scheduler(name, n, shift, float64=True, monkeypatch=monkeypatch)
    assert sched.sigmas.dtype == F64 and sched.timesteps.dtype == F64  # the proxy made diffusers run in float64
    assert len(sched.timesteps) == (n if name == "flow-euler" else 2 * n - 1)  # Heun: one call more per inner step
    torch.testing.assert_close(ours[:-1], distinct_sigmas(name, sched.sigmas), rtol=1e-12, atol=0)

    chain = make_chain(name, gmm, steps=n, shift=shift)
    assert int(chain.nfe.sum()) == len(sched.timesteps)
    mine = trajectory(chain, noise)
    theirs = diffusers_loop(sched, gmm, noise.x_T.clone(), heun=name == "flow-heun")
    assert theirs[-1].dtype == F64
    assert len(theirs) == len(mine) - 1 == n
    diff = max(float((a - b).abs().max()) for a, b in zip(mine[1:], theirs, strict=True))
    assert diff <= 1e-10, diff
    assert float((mine[-1] - theirs[-1]).abs().max()) <= 1e-10
    # what the proxy changed: diffusers as shipped agrees to float32 round-off only
    assert 1e-9 < float((as_shipped - mine[-1]).abs().max()) < 1e-5
    if n > 1:  # (the samples moved: one step from t = 1 lands on the data mean)
        assert float(mine[-1].std(0).min()) > 0.3


# --------------------------------------------------------------------------------------------- sigma-space


def sigma_space_step(den, x_t: torch.Tensor, t: float, t_next: float, heun: bool) -> torch.Tensor:
    """One Euler (heun: EDM Heun, Euler into sigma = 0) step in sigma-space, x~ = x_t / (1 - t), sigma = t / (1 - t),
    D-based, mapped back to x_t's scale."""
    s, s_next = t / (1 - t), t_next / (1 - t_next)
    x = x_t / (1 - t)
    d1 = (x - den(x, s)) / s
    out = x + (s_next - s) * d1
    if heun and s_next > 0:
        d2 = (out - den(out, s_next)) / s_next
        out = x + (s_next - s) * 0.5 * (d1 + d2)
    return (1 - t_next) * out


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_in_t_is_euler_in_sigma_and_heun_in_t_is_not_heun_in_sigma(gmm, shift):
    n = 7
    t = flow_times(n, shift).tolist()
    noise = draw_noise(1, range(M), (2,), n, False, F64)
    euler = trajectory(make_chain("flow-euler", gmm, steps=n, shift=shift), noise)
    heun = trajectory(make_chain("flow-heun", gmm, steps=n, shift=shift), noise)
    # every step after the first (t_0 = 1 has no sigma-space point): Euler's agree at round-off
    d_euler = [float((sigma_space_step(gmm, euler[j], t[j], t[j + 1], False) - euler[j + 1]).abs().max())
               for j in range(1, n)]
    assert max(d_euler) <= 1e-12, d_euler
    # Heun's corrector averages d/dt slopes in t, not d/dsigma slopes in sigma: other states
    d_heun = [float((sigma_space_step(gmm, heun[j], t[j], t[j + 1], True) - heun[j + 1]).abs().max())
              for j in range(1, n)]
    assert max(d_heun[:-1]) > 1e-4, d_heun
    assert d_heun[-1] <= 1e-12, d_heun  # the last step (to t = 0) is Euler in both


# --------------------------------------------------------------------------------------------- the distribution


def _reference(den, n: int = 200_000):
    """Exact draws of the mixture (for Monte-Carlo standard errors of moments and occupancy)."""
    return den.sample(n, torch.Generator().manual_seed(123))


def _component(den, x: torch.Tensor) -> torch.Tensor:
    """The most probable mixture component of each point (n,)."""
    comps = torch.distributions.MultivariateNormal(den.means, den.covs)
    return (den.log_w[None] + comps.log_prob(x[:, None, :])).argmax(1)


def distribution_failures(den, x: torch.Tensor, k: float = 4.0) -> list[str]:
    """The checks samples x (n, d) of ``den`` fail: mean and covariance entries within k Monte-Carlo standard
    errors of the mixture's, the components' occupancy within k binomial standard errors of the exact draws'."""
    n = len(x)
    ref = _reference(den)
    failures = []
    se_mean = (den.cov.diagonal() / n).sqrt()
    if not bool(((x.mean(0) - den.mean).abs() <= k * se_mean).all()):
        failures.append(f"mean {x.mean(0).tolist()} vs {den.mean.tolist()}")
    c = ref - den.mean
    se_cov = (c[:, :, None] * c[:, None, :]).std(0) / math.sqrt(n)
    if not bool(((torch.cov(x.T) - den.cov).abs() <= k * se_cov).all()):
        failures.append(f"covariance {torch.cov(x.T).tolist()} vs {den.cov.tolist()}")
    K = len(den.means)
    p = torch.bincount(_component(den, ref), minlength=K).double() / len(ref)
    occ = torch.bincount(_component(den, x), minlength=K).double() / n
    se = (p * (1 - p) * (1 / n + 1 / len(ref))).sqrt()
    if not bool(((occ - p).abs() <= k * se).all()):
        failures.append(f"occupancy {occ.tolist()} vs {p.tolist()}")
    return failures


@pytest.mark.parametrize(("name", "steps"), [("flow-euler", 200), ("flow-heun", 50)])
def test_flow_samplers_reach_the_mixture(gmm, name, steps):
    x, stats = sample_chain(make_chain(name, gmm, steps=steps), 4000, 7, (2,), dtype=F64)
    assert stats.nfe_per_sample == (steps if name == "flow-euler" else 2 * steps - 1)
    assert distribution_failures(gmm, x) == []


def test_a_too_short_flow_chain_misses_the_mixture(gmm):
    """Two Euler steps: the first, from t = 1 (where the clean estimate is the data mean) to 1 / 1000, lands every
    sample at the data mean plus 1 / 1000 of its noise, and the last keeps them there. A point mass at the mean
    has the right mean, but the check that passes the chains above fails its covariance and occupancy."""
    x, _ = sample_chain(make_chain("flow-euler", gmm, steps=2), 4000, 7, (2,), dtype=F64)
    assert float((x - gmm.mean).abs().max()) < 0.01
    failures = distribution_failures(gmm, x)
    assert [f.split()[0] for f in failures] == ["covariance", "occupancy"], failures


# --------------------------------------------------------------------------------------------- sigma-space samplers


@pytest.fixture(scope="module")
def flow_model(gmm) -> FlowPrecond:
    return FlowPrecond(ExactVelocityNet(gmm))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "heun", "euler", "dpmpp-2m", "dpmpp-2m-edm"])
def test_sigma_space_samplers_run_a_flow_model_as_its_exact_denoiser(gmm, flow_model, sampler):
    """FlowPrecond's D form x_t - t v(x_t, 1000 t) at x_t = x / (1 + sigma) is the mixture's own denoiser."""
    x = torch.randn(32, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    for sigma in (1e-3, 0.5, 4.0, 80.0):
        assert float((flow_model(x, sigma) - gmm(x, sigma)).abs().max()) <= 1e-10
    calls = flow_model.net.calls
    ref, _ = sample_chain(make_chain(sampler, gmm), 64, 3, (2,), dtype=F64)
    out, _ = sample_chain(make_chain(sampler, flow_model), 64, 3, (2,), dtype=F64)
    assert flow_model.net.calls > calls  # the network answered
    assert float((out - ref).abs().max()) <= 1e-8, float((out - ref).abs().max())
    assert float(ref.std(0).min()) > 0.3


# --------------------------------------------------------------------------------------------- Picard

PICARD_OPTIONS = [
    {},
    {"init": "warm"},
    {"init": "extrapolate"},
    {"accel": "taa", "init": "extrapolate"},
    {"accel": "taa", "init": "prior"},
    {"window": 5},
    {"window": 5, "accel": "taa", "init": "extrapolate"},
    {"window": 5, "init": "warm", "max_batch": 7},
    {"criterion": "step"},
    {"convergence": "batch", "accel": "taa"},
]


@pytest.mark.parametrize(("name", "steps"), [("flow-euler", 24), ("flow-heun", 10)])
@pytest.mark.parametrize("model", ["gmm", "flow-precond"])
def test_picard_at_tol_0_is_the_sequential_flow_chain(gmm, flow_model, name, steps, model):
    den = gmm if model == "gmm" else flow_model
    chain = make_chain(name, den, steps=steps)
    seq, _ = sample_chain(chain, 16, 5, (2,), dtype=F64)
    assert float(seq.std(0).min()) > 0.3
    for options in PICARD_OPTIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PicardWarning)  # TAA from the prior start: warned, still exact at tol 0
            par, stats = sample_chain(chain, 16, 5, (2,), dtype=F64, parallel={"tol": 0, **options})
        assert stats.sampler == "picard-" + name and stats.iterations <= steps
        assert float((par - seq).abs().max()) <= 1e-12, (options, float((par - seq).abs().max()))


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_picard_flow_euler_equals_the_sequential_chain(tmp_path):
    """torchrun, 2 gloo processes on the CPU, tests/dist_picard.py's mixture: picard-flow-euler at tol 0 with
    each process evaluating half of every sweep's rows equals flow-euler run sequentially in this process."""
    script = Path(__file__).with_name("dist_picard.py")
    env = {k: v for k, v in os.environ.items() if k != "DIFFLAB_STATE_DTYPE"}  # (float64 state, the CPU's)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "two.pt"), '{"tol": 0}', "flow-euler"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    den = GMMDenoiser(torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=F64),
                      torch.tensor([0.3, 0.2], dtype=F64))
    chain = make_chain("flow-euler", den, steps=200)
    noise = draw_noise(4, range(16), (2,), 200, False, F64)
    seq = run_chain(chain, noise)
    assert two["world"] == 2 and two["x"].dtype == F64
    assert float((two["x"] - seq).abs().max()) <= 1e-12
    rows, step = [], chain.step
    chain.step = lambda x, j, z, *cond: rows.append(len(x)) or step(x, j, z, *cond)
    one = picard(chain, noise, tol=0, window=64)  # the same call in one process
    assert float((one.x - seq).abs().max()) <= 1e-12
    assert two["iterations"] == one.iterations <= 200 and torch.equal(two["sweeps"], one.sweeps)
    assert two["rows"] <= sum(rows) // 2 + one.iterations  # each process evaluated about half of every sweep


# --------------------------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("wrapper", ["edm", "vp"])
@pytest.mark.parametrize("name", ["flow-euler", "flow-heun"])
def test_a_sigma_space_network_is_refused_at_t_1_in_one_line(wrapper, name):
    net = TinyNet()
    den = EDMPrecond(net) if wrapper == "edm" else VPPrecond(net)
    chain = make_chain(name, den, steps=10)
    for parallel in (None, {"tol": 0}, {"init": "warm"}):
        with pytest.raises(DifflabError) as err:
            sample_chain(chain, 4, 0, (2,), dtype=F64, parallel=parallel)
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"{type(den).__name__} cannot be evaluated at t = 1 (pure noise)"), msg
        assert "flow-matching model (objective fm, precond flow)" in msg and "ddpm, ddim, heun or dpmpp-2m" in msg
