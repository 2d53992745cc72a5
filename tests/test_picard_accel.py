"""Beyond ParaDiGMS: triangular Anderson acceleration, the extrapolated start and the per-step criterion, on exact
denoisers (spec/parallel-acceleration.md)."""

import importlib
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import ROUND_OFF
from difflab.cli import main
from difflab.data import get_dataset
from difflab.errors import DifflabError
from difflab.samplers import PicardOptions, PicardWarning, draw_noise, make_chain, picard, run_chain, sample_chain
from difflab.samplers.anderson import TriangularAnderson

PICARD = importlib.import_module("difflab.samplers.picard")
CHAINS = [
    ("ddpm", {"steps": 60, "variance": "beta"}),
    ("ddpm", {"steps": 60, "variance": "beta_tilde", "spacing": "quadratic"}),
    ("ddim", {"steps": 40, "eta": 0.0}),
    ("ddim", {"steps": 40, "eta": 1.0}),
    ("heun", {"steps": 18}),
    ("heun", {"steps": 18, "S_churn": 10.0}),
    ("euler", {"steps": 30}),
]
VARIANTS = [
    {"accel": "taa"},  # (with the extrapolated start, what accel="taa" resolves to)
    {"accel": "taa", "init": "prior"},
    {"accel": "taa", "accel_memory": 5},
    {"init": "extrapolate"},
    {"init": "extrapolate", "init_steps": 4},
    {"accel": "taa", "init": "extrapolate"},
    {"criterion": "step"},
    {"accel": "taa", "init": "extrapolate", "criterion": "step", "convergence": "batch"},
]


def _setup(name, options, den, M=16, seed=0, shape=(2,)):
    chain = make_chain(name, den, **options)
    noise = draw_noise(seed, range(M), shape, chain.n_steps, chain.stochastic)
    return chain, noise, run_chain(chain, noise)


@pytest.mark.parametrize(("name", "options"), CHAINS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("window", [None, 7])
def test_tol0_equals_the_sequential_sampler_for_every_option(name, options, variant, window, gmm2d):
    chain, noise, seq = _setup(name, options, gmm2d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PicardWarning)  # (TAA from the prior start on an ODE: tested elsewhere)
        res = picard(chain, noise, tol=0.0, window=window, **variant)
    torch.testing.assert_close(res.x, seq, rtol=0, atol=ROUND_OFF * float(seq.abs().max()))
    assert res.converged and res.iterations + res.rounds <= chain.n_steps  # never more than n
    if PicardOptions(**variant).init == "extrapolate":
        assert res.rounds == variant.get("init_steps", 1)


def test_memory_one_is_plain_picard_and_a_sweep_costs_no_extra_denoiser_call(gmm2d):
    chain, noise, _ = _setup("ddpm", {"steps": 100}, gmm2d)
    plain = picard(chain, noise, tol=0.1)
    one = picard(chain, noise, tol=0.1, accel="taa", accel_memory=1, init="prior")
    assert torch.equal(plain.x, one.x) and torch.equal(plain.sweeps, one.sweeps) and torch.equal(plain.nfe, one.nfe)
    taa = picard(chain, noise, tol=0.1, accel="taa")
    # the NFE of a sweep is its window's steps: accelerated or not, NFE = sum over sweeps of the window sizes
    assert bool((taa.nfe <= taa.sweeps.double() * chain.n_steps).all()) and taa.accelerated > 0


def _dino_ddpm(M=24):
    den = get_dataset("dino").denoiser()
    chain = make_chain("ddpm", den, steps=1000, variance="beta_tilde")
    noise = draw_noise(0, range(M), (2,), chain.n_steps, True)
    return chain, noise, run_chain(chain, noise)


@pytest.mark.slow
def test_taa_and_the_extrapolated_start_cut_the_sweeps_of_ddpm_1000_on_the_exact_dino():
    """The CDL protocol on the exact Dino mixture (DDPM-1000, beta_tilde, tol 0.1, the whole chain). On 32 samples
    plain Picard takes 28.7 sweeps a sample (33 at most); TAA with the extrapolated start 12.4 (22), with 0.23x the
    NFE and a median distance to the sequential samples of 2.2e-4 (Picard: 1.1e-4). Stated margins: mean sweeps
    below 0.5x, the slowest sample below 0.8x (the last steps, where the step noise vanishes, set it), NFE below
    0.4x, the distance below 4x Picard's and 1e-3."""
    chain, noise, seq = _dino_ddpm()
    plain = picard(chain, noise, tol=0.1)
    fast = picard(chain, noise, tol=0.1, accel="taa", init="extrapolate")
    err = {k: float((r.x - seq).norm(dim=1).median()) for k, r in (("plain", plain), ("fast", fast))}
    mean = {k: float(r.sweeps.double().mean()) for k, r in (("plain", plain), ("fast", fast))}
    assert mean["fast"] < 0.5 * mean["plain"], mean
    assert fast.iterations + fast.rounds < 0.8 * plain.iterations, (fast.iterations, plain.iterations)
    assert float(fast.nfe.mean()) < 0.4 * float(plain.nfe.mean())
    assert err["fast"] < 4 * err["plain"] and err["fast"] < 1e-3, err
    assert fast.fallbacks == 0 and fast.rounds == 1


MATCHED = [("ddpm", {"steps": 1000, "variance": "beta_tilde"}, 0.01, 0.75), ("heun", {"steps": 18}, 0.1, 0.8)]


@pytest.mark.parametrize(("name", "options", "tol", "ratio"), MATCHED)
def test_on_the_1d_mixture_the_variants_need_fewer_sweeps_at_matched_error(name, options, tol, ratio):
    """The 1-D mixture (gmm1d), 64 samples, against plain Picard at tol 0.1: TAA with the extrapolated start at
    ``tol`` is as close to the sequential samples (median distance at most 1.5x) in at most ``ratio`` of the mean
    sweeps (DDPM-1000 at tol 0.01: 8.7 vs 13.7 sweeps, 1.1e-4 vs 1.5e-4; Heun-18: 7.6 vs 10.0, 1.1e-2 vs 5.7e-2)."""
    ds = get_dataset("gmm1d")
    chain, noise, seq = _setup(name, options, ds.denoiser(), M=64, shape=(1,))
    plain = picard(chain, noise, tol=0.1)
    fast = picard(chain, noise, tol=tol, accel="taa", init="extrapolate")
    assert float(fast.sweeps.double().mean()) < ratio * float(plain.sweeps.double().mean())
    e_plain, e_fast = ((r.x - seq).abs().median() for r in (plain, fast))
    assert e_fast < 1.5 * e_plain, (e_fast, e_plain)


def test_batch_invariance_chunking_and_batch_convergence_with_taa(gmm2d):
    chain, noise, _ = _setup("ddpm", {"steps": 100}, gmm2d, M=12)
    opts = {"tol": 0.1, "accel": "taa", "init": "extrapolate", "window": 30}
    full = picard(chain, noise, **opts)
    sub = picard(chain, draw_noise(0, range(4, 8), (2,), chain.n_steps, True), **opts)  # samples 4..7 alone
    torch.testing.assert_close(sub.x, full.x[4:8], rtol=0, atol=ROUND_OFF)
    assert torch.equal(sub.sweeps, full.sweeps[4:8])
    chunked = picard(chain, noise, max_batch=50, **opts)
    torch.testing.assert_close(chunked.x, full.x, rtol=0, atol=ROUND_OFF)
    assert torch.equal(chunked.sweeps, full.sweeps)
    together = picard(chain, noise, convergence="batch", **opts)
    assert bool((together.sweeps == together.iterations).all())


def test_the_update_is_anderson_with_an_upstream_only_least_squares():
    """One update against the formula written out position by position: gamma_i minimises the squared residual of
    the positions q <= i, ||sum_q (R_q - dR_q gamma)||^2 + lambda ||gamma||^2 with lambda = reg x the mean diagonal;
    a change at downstream positions leaves the upstream updates as they are (plain Anderson would not)."""
    g = torch.Generator().manual_seed(3)
    W, m, reg = 6, 3, 1e-3
    X = torch.zeros((W + 1, 1, 2), dtype=torch.float64)
    taa = TriangularAnderson(m, reg, W, X)
    targets, samples = torch.arange(1, W + 1)[None], torch.tensor([0])
    valid, none = torch.ones((1, W), dtype=torch.bool), torch.tensor([-1])
    iterates = [torch.randn((1, W, 2), generator=g, dtype=torch.float64) for _ in range(m)]
    images = [torch.randn((1, W, 2), generator=g, dtype=torch.float64) for _ in range(m)]
    for x, gx in zip(iterates[:-1], images[:-1], strict=True):
        taa.update(x, gx, targets, samples, valid, none)
    x, gx = iterates[-1], images[-1]
    before = {k: v.clone() for k, v in vars(taa).items() if isinstance(v, torch.Tensor)}
    new = taa.update(x, gx, targets, samples, valid, none)
    R = [b - a for a, b in zip(iterates, images, strict=True)]
    dX = torch.stack([iterates[2] - iterates[1], iterates[1] - iterates[0]], -1)[0]  # (W, 2, m - 1), newest first
    dR = torch.stack([R[2] - R[1], R[1] - R[0]], -1)[0]
    for i in range(W):
        A = dR[: i + 1].reshape(-1, m - 1)
        B = A.T @ A
        B = B + reg * B.diagonal().mean() * torch.eye(m - 1, dtype=torch.float64)
        gamma = torch.linalg.solve(B, A.T @ R[2][0, : i + 1].reshape(-1))
        expect = gx[0, i] - (dX[i] + dR[i]) @ gamma
        torch.testing.assert_close(new[0, i], expect, rtol=0, atol=1e-12)
    for k, v in before.items():  # the same last update with the downstream half of the residual changed
        setattr(taa, k, v)
    shifted = gx.clone()
    shifted[0, W // 2:] += 5.0
    other = taa.update(x, shifted, targets, samples, valid, none)
    assert torch.equal(other[0, : W // 2], new[0, : W // 2]) and not torch.allclose(other[0, W // 2:], new[0, W // 2:])


def test_the_safeguard_keeps_the_front_positions_plain(gmm2d):
    """The first unaccepted slot and those before it take the plain update (so the front advances a sweep), the
    rest the accelerated one."""
    g = torch.Generator().manual_seed(0)
    W = 5
    taa = TriangularAnderson(3, 1e-3, W, torch.zeros((W + 1, 1, 2), dtype=torch.float64))
    args = (torch.arange(1, W + 1)[None], torch.tensor([0]), torch.ones((1, W), dtype=torch.bool))
    for _ in range(2):
        taa.update(torch.randn((1, W, 2), generator=g, dtype=torch.float64),
                   torch.randn((1, W, 2), generator=g, dtype=torch.float64), *args, torch.tensor([-1]))
    x, gx = (torch.randn((1, W, 2), generator=g, dtype=torch.float64) for _ in range(2))
    new = taa.update(x, gx, *args, torch.tensor([2]))
    assert torch.equal(new[0, :3], gx[0, :3]) and not torch.allclose(new[0, 3:], gx[0, 3:])


def test_a_failed_solve_falls_back_to_the_plain_update(gmm2d, monkeypatch):
    chain, noise, seq = _setup("ddpm", {"steps": 60}, gmm2d)

    def broken(B, D):  # every solve reports a singular matrix
        return torch.full_like(D, float("nan")), torch.ones(B.shape[:-2], dtype=torch.int32)

    monkeypatch.setattr(torch.linalg, "solve_ex", broken)
    res = picard(chain, noise, tol=0.1, accel="taa", init="prior")
    plain = picard(chain, noise, tol=0.1)
    assert res.fallbacks == res.accelerated > 0
    assert torch.equal(res.x, plain.x) and torch.equal(res.sweeps, plain.sweeps)


def test_the_extrapolated_start_carries_the_noise():
    """With a denoiser whose clean estimate is the same everywhere, the extrapolated start IS the sequential
    trajectory: one sweep accepts every step. The prior start needs many; an extrapolation that dropped the noise
    would too."""
    c = torch.tensor([0.7, -0.3], dtype=torch.float64)

    def constant(x, sigma):
        return c.to(x.dtype).expand_as(x)

    chain = make_chain("ddpm", constant, steps=200)
    noise = draw_noise(5, range(6), (2,), chain.n_steps, True)
    seq = run_chain(chain, noise)
    ext = picard(chain, noise, tol=0.1, init="extrapolate")
    assert ext.iterations == 1 and ext.rounds == 1
    torch.testing.assert_close(ext.x, seq, rtol=0, atol=100 * ROUND_OFF)
    assert picard(chain, noise, tol=0.1).iterations > 10
    windowed = picard(chain, noise, tol=0.1, init="extrapolate", window=40)  # entering slots are extrapolated too
    assert windowed.iterations <= -(-199 // 40) + 1


def test_the_step_criterion_bounds_each_steps_residual(gmm2d):
    """criterion="step": a sweep accepts the leading steps whose own residual ||step(X[j]) - X[j+1]||^2 / d is at
    most tol^2 v_j, rechecked here from the buffers of every sweep."""
    chain, noise, _ = _setup("ddpm", {"steps": 80}, gmm2d, M=8)
    tol, states, begins = 0.1, [], []
    picard(chain, noise, tol=tol, criterion="step", callback=lambda it, x, X: states.append(X.clone()),
           on_sweep=lambda it, b: begins.append(b.clone()))
    n, var = chain.n_steps, chain.noise_var
    before = (chain.prior_scale * noise.x_T).expand(n + 1, 8, 2)
    begin = torch.zeros(8, dtype=torch.long)
    for after, new_begin in zip(states, begins, strict=True):
        for k in range(8):
            b = int(begin[k])
            if b == n:
                continue
            lead = 0
            for j in range(b, n):
                rho = chain.step(before[j, k: k + 1], j, noise.z[k: k + 1, j]) - before[j + 1, k: k + 1]
                if not (float((rho**2).mean()) <= tol**2 * float(var[j]) or var[j] == 0):
                    break
                lead += 1
            assert int(new_begin[k]) == min(b + lead + 1, n)
        before, begin = after, new_begin


def test_the_step_criterion_needs_a_smaller_tol_for_the_same_accuracy(gmm2d):
    """The pitfall of ParaTAA's rule: per-step residuals add up along the chain, so at equal tol it lands further
    from the sequential samples than the cumulative rule."""
    chain, noise, seq = _setup("ddpm", {"steps": 400, "variance": "beta_tilde"}, gmm2d, M=16)
    cum = picard(chain, noise, tol=0.3)
    step = picard(chain, noise, tol=0.3, criterion="step")
    e_cum, e_step = ((r.x - seq).norm(dim=1).median() for r in (cum, step))
    assert e_step > 3 * e_cum, (e_step, e_cum)


@pytest.mark.parametrize(("options", "msg"), [
    ({"accel": "anderson"}, "--accel (Picard accel) must be one of none, taa, got 'anderson'"),
    ({"accel_memory": 0}, "--accel-memory (accel_memory) must be an integer in 1..8, got 0"),
    ({"accel_memory": 9}, "--accel-memory (accel_memory) must be an integer in 1..8, got 9"),
    ({"accel_reg": 0.0}, "--accel-reg (accel_reg) must be a number > 0, got 0"),
    ({"criterion": "relative"}, "--criterion (Picard criterion) must be one of cumulative, step, got 'relative'"),
    ({"init": "x0"}, "--init (Picard init) must be one of prior, warm, extrapolate, got 'x0'"),
    ({"init_steps": 0}, "--init-steps (init_steps) must be an integer >= 1, got 0"),
    ({"tol": -1.0}, "--tol (Picard tolerance) must be a number >= 0, got -1"),
    ({"window": -2}, "--window (Picard window) must be an integer >= 0 (0: the whole chain), got -2"),
    ({"max_sweeps": 0}, "--max-sweeps (max_sweeps) must be an integer >= 1, got 0"),
    ({"max_batch": 0}, "--max-batch (max_batch) must be an integer >= 1, got 0"),
])
def test_bad_acceleration_options(options, msg):
    """Each message names the CLI flag and the option (the CLI passes the options straight through), not None."""
    with pytest.raises(DifflabError) as err:
        PicardOptions(**options)
    assert str(err.value) == msg and "None" not in msg


def test_sample_chain_reports_the_rounds_and_the_acceleration(gmm2d):
    chain = make_chain("ddpm", gmm2d, steps=100)
    _, st = sample_chain(chain, 12, seed=0, shape=(2,), batch_size=5,
                         parallel={"accel": "taa", "init": "extrapolate", "init_steps": 3})
    d = st.to_dict()
    assert (d["accel"], d["init"], d["sequential_rounds"], d["accel_memory"]) == ("taa", "extrapolate", 3, 3)
    assert d["accel_fallback_rate"] == 0.0 and d["criterion"] == "cumulative"


def test_cli_accel_flags(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "20", "--width", "16", "--depth", "1",
                 "--set", "train.batch_size=16", "--set", "data.n_train=200", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.npz"
    assert main(["sample", str(tmp_path / "r"), "--sampler", "picard-ddpm", "--steps", "100", "--accel", "taa",
                 "--accel-memory", "2", "--init", "extrapolate", "--init-steps", "2", "--criterion", "step",
                 "--n", "6", "--out", str(out), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (stats["accel"], stats["accel_memory"], stats["init"], stats["criterion"]) == ("taa", 2, "extrapolate",
                                                                                          "step")
    assert stats["sequential_rounds"] == 2 and np.load(out)["samples"].shape == (6, 2)
    # --window 0 is the whole chain (as --picard-window 0 in the studies); --accel taa alone takes the extrapolated
    # start; (samples 0..2 of the whole-chain, extrapolated-start call above)
    assert main(["sample", str(tmp_path / "r"), "--sampler", "picard-ddpm", "--steps", "100", "--window", "0",
                 "--accel", "taa", "--n", "3", "--out", str(tmp_path / "w0.npz"), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (stats["window"], stats["init"], stats["accel"], stats["sequential_rounds"]) == (100, "extrapolate",
                                                                                            "taa", 1)
    for argv, msg in ((["--sampler", "ddpm", "--accel", "taa"],
                       "--accel applies to the parallel samplers only (picard-<sampler>, e.g. picard-ddpm)"),
                      (["--sampler", "picard-ddpm", "--accel", "ta"],
                       "--accel (Picard accel) must be one of none, taa, got 'ta'"),
                      (["--sampler", "picard-ddpm", "--accel-memory", "0"],
                       "--accel-memory (accel_memory) must be an integer in 1..8, got 0"),
                      (["--sampler", "picard-ddpm", "--tol", "-1"],
                       "--tol (Picard tolerance) must be a number >= 0, got -1"),
                      (["--sampler", "picard-ddpm", "--window", "-1"],
                       "--window (Picard window) must be an integer >= 0 (0: the whole chain), got -1"),
                      (["--sampler", "ddim", "--variance", "beta"],  # (the run's schedule is no choice of the user)
                       "sampler 'ddim' has no option 'variance': its options are steps, eta, spacing, clip")):
        assert main(["sample", str(tmp_path / "r"), *argv, "--out", str(tmp_path / "bad.npz"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"error: {msg}" and "None" not in err and "schedule" not in err, err
