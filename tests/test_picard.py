import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.errors import DifflabError
from difflab.samplers import draw_noise, make_chain, picard, run_chain, sample_chain
from test_samplers import _moments_match

EXACT = [
    ("ddpm", {"steps": 60, "variance": "beta"}),
    ("ddpm", {"steps": 60, "variance": "beta_tilde", "spacing": "quadratic"}),
    ("ddim", {"steps": 40, "eta": 0.0}),
    ("ddim", {"steps": 40, "eta": 0.0, "spacing": "quadratic"}),
    ("ddim", {"steps": 40, "eta": 1.0}),
    ("ddim", {"steps": 40, "eta": 1.0, "spacing": "quadratic"}),
    ("heun", {"steps": 18}),
    ("heun", {"steps": 18, "S_churn": 10.0}),
    ("euler", {"steps": 30}),
]


def _setup(name, options, den, M=32, seed=0):
    chain = make_chain(name, den, **options)
    noise = draw_noise(seed, range(M), (2,), chain.n_steps, chain.stochastic)
    return chain, noise, run_chain(chain, noise)


PICARD = importlib.import_module("difflab.samplers.picard")  # the module (the package's ``picard`` is the function)


def _same_run(a, b, atol: float) -> bool:
    """Two Picard results of one run up to round-off: the same sweeps (in all and per sample), the same NFE, and
    samples within ``atol``."""
    return (a.iterations == b.iterations and torch.equal(a.sweeps, b.sweeps) and torch.equal(a.nfe, b.nfe)
            and bool(((a.x - b.x).abs() <= atol).all()))


def _chunks(shift: int):
    """Picard's max_batch chunking (``shift=0``), or with every chunk after the first starting ``shift`` rows
    early: the row before each boundary is evaluated twice and the chunk's last row never, so every result of that
    chunk lands one row off."""
    def chunked(fn, x, j, z, max_batch):
        if max_batch is None or x.shape[0] <= max_batch:
            return fn(x, j, z)
        parts = []
        for i in range(0, x.shape[0], max_batch):
            lo = max(0, i - shift)
            rows = slice(lo, lo + min(max_batch, x.shape[0] - i))
            parts.append(fn(x[rows], j[rows], None if z is None else z[rows]))
        return torch.cat(parts)
    return chunked


@pytest.mark.parametrize(("name", "options"), EXACT)
@pytest.mark.parametrize("window", [None, 1, 7])
def test_tol0_equals_the_sequential_sampler(name, options, window, gmm2d):
    chain, noise, seq = _setup(name, options, gmm2d)
    res = picard(chain, noise, window=window, tol=0.0)
    torch.testing.assert_close(res.x, seq, rtol=0, atol=1e-12)
    assert res.converged and res.iterations <= chain.n_steps
    if window == 1:
        assert res.iterations == chain.n_steps
        assert torch.equal(res.nfe, torch.full((32,), float(chain.nfe.sum()), dtype=torch.float64))


@pytest.mark.parametrize(("name", "options"), [("ddim", {"steps": 40}), ("ddpm", {"steps": 60})])
def test_warm_start_and_chunking_keep_exactness(name, options, gmm2d, monkeypatch):
    """max_batch=50 cuts each sweep's rows (up to 32 x n) into chunks. That is the same arithmetic, but not bit for
    bit: a BLAS may pick other kernels for another number of rows (2.8e-17 apart on an Intel Xeon). So the samples
    must agree to 1e-12 of their scale, the sweeps exactly; a chunk boundary one row off is far outside that."""
    chain, noise, seq = _setup(name, options, gmm2d)
    warm = picard(chain, noise, tol=0.0, init="warm", warm_steps=5)
    torch.testing.assert_close(warm.x, seq, rtol=0, atol=1e-12)
    a = picard(chain, noise, tol=0.1)
    b = picard(chain, noise, tol=0.1, max_batch=50)
    atol = 1e-12 * float(a.x.abs().max())
    assert _same_run(a, b, atol)
    monkeypatch.setattr(PICARD, "_chunked", _chunks(0))  # the helper is faithful ...
    assert _same_run(a, picard(chain, noise, tol=0.1, max_batch=50), atol)
    monkeypatch.setattr(PICARD, "_chunked", _chunks(1))  # ... and an off-by-one boundary fails the comparison
    wrong = picard(chain, noise, tol=0.1, max_batch=50)
    assert not _same_run(a, wrong, atol) and float((wrong.x - a.x).abs().max()) > 1e3 * atol


PARALLEL = [("ddpm", {"steps": 200}), ("ddim", {"steps": 50}), ("heun", {"steps": 64}),
            ("ddim", {"steps": 200, "eta": 1.0})]


@pytest.mark.parametrize(("name", "options"), PARALLEL)
def test_tol01_on_the_exact_gaussian_denoiser_gives_that_gaussian(name, options, gauss2d):
    chain = make_chain(name, gauss2d, **options)
    x, stats = sample_chain(chain, 4000, seed=11, shape=(2,), parallel={"tol": 0.1})
    _moments_match(x, gauss2d)
    assert stats.iterations < chain.n_steps and stats.sampler == "picard-" + name


def test_per_sample_convergence_is_batch_invariant(gmm2d):
    chain = make_chain("ddpm", gmm2d, steps=100)
    a, sa = sample_chain(chain, 40, seed=2, shape=(2,), batch_size=40, parallel={"tol": 0.1})
    b, sb = sample_chain(chain, 40, seed=2, shape=(2,), batch_size=7, parallel={"tol": 0.1})
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert sa.nfe_per_sample == pytest.approx(sb.nfe_per_sample)


def test_batch_convergence_moves_all_samples_together(gmm2d):
    chain, noise, seq = _setup("ddpm", {"steps": 100}, gmm2d)
    res = picard(chain, noise, tol=0.1, convergence="batch")
    per = picard(chain, noise, tol=0.1, convergence="sample")
    assert bool((res.sweeps == res.iterations).all())
    assert len(set(res.nfe.tolist())) == 1
    assert res.nfe.mean() >= per.nfe.mean()  # the batch waits for its slowest sample
    assert (res.x - seq).abs().max() < 0.5 and (per.x - seq).abs().max() < 0.5


def test_max_sweeps_and_callback(gmm2d):
    chain, noise, _ = _setup("ddpm", {"steps": 100}, gmm2d)
    seen = []
    res = picard(chain, noise, tol=0.0, max_sweeps=5, callback=lambda it, x, X: seen.append((it, x.shape, X.shape)))
    assert not res.converged and res.iterations == 5
    assert seen == [(i, (32, 2), (101, 32, 2)) for i in range(1, 6)]


def test_a_good_tolerance_converges_in_far_fewer_sweeps_than_steps(gmm2d):
    chain, noise, seq = _setup("ddpm", {"steps": 1000}, gmm2d, M=8)
    res = picard(chain, noise, tol=0.1)
    assert res.iterations < 100
    assert (res.x - seq).abs().max() < 0.2


@pytest.mark.parametrize(("options", "msg"), [
    ({"window": 0}, "window must be a positive integer"),
    ({"tol": -0.1}, "tolerance must be a number >= 0"),
    ({"convergence": "all"}, "convergence must be"),
    ({"init": "zeros"}, "init must be"),
    ({"max_batch": 0}, "max_batch"),
])
def test_bad_picard_options(options, msg, gmm2d):
    chain, noise, _ = _setup("ddim", {"steps": 10}, gmm2d, M=2)
    with pytest.raises(DifflabError, match=msg):
        picard(chain, noise, **options)
    with pytest.raises(DifflabError, match=msg):
        sample_chain(chain, 2, 0, (2,), parallel=options)


def test_cli_parallel_sampling(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "20", "--width", "16", "--depth", "1",
                 "--set", "train.batch_size=16", "--set", "data.n_train=200", "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "p.npz"
    assert main(["sample", str(tmp_path / "r"), "--sampler", "picard-ddpm", "--steps", "100", "--window", "30",
                 "--tol", "0.1", "--n", "20", "--out", str(out), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["sampler"] == "picard-ddpm" and 1 <= stats["iterations"] <= 100 and stats["window"] == 30
    assert np.load(out)["samples"].shape == (20, 2)
    for argv, msg in ((["--sampler", "ddpm", "--window", "8"], "--window applies to the parallel samplers"),
                      (["--sampler", "picard-ddpm", "--window", "0"], "window must be a positive integer"),
                      (["--sampler", "picard-ddpm", "--tol", "-1"], "tolerance must be a number >= 0"),
                      (["--sampler", "picard-dpm"], "unknown sampler 'dpm'")):
        assert main(["sample", str(tmp_path / "r"), *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.dist
def test_two_processes_split_the_sweeps_and_agree_with_one(tmp_path):
    script = Path(__file__).with_name("dist_picard.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "two.pt")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, capture_output=True,
                   timeout=120)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    # each process evaluates half of every sweep's rows: other shapes, so not bit for bit (see the chunking test)
    torch.testing.assert_close(two["x"], one["x"], rtol=0, atol=1e-12 * float(one["x"].abs().max()))
    assert two["iterations"] == one["iterations"] and torch.equal(two["sweeps"], one["sweeps"])
    assert two["world"] == 2 and one["world"] == 1
    assert two["rows"] <= one["rows"] // 2 + two["iterations"]  # each process evaluated about half of every sweep


def test_a_denoiser_that_extrapolates_outwards_slows_picard_and_clipping_restores_it():
    """The far-field mechanism on an exact ground truth: the exact Dino denoiser, and the same with an outward
    linear gain of 3 beyond radius 3 (what an extrapolating network does far from the data). Only the far field
    differs, yet the parallel sampler needs about three times the sweeps; clipping x0_hat to 3 bounds the far
    field and brings the count back to the exact denoiser's."""
    from difflab.data import get_dataset
    from difflab.diagnostics import far_field_gain

    exact = get_dataset("dino").denoiser()

    def outward(x, sigma):
        r = x.norm(dim=-1, keepdim=True)
        return exact(x, sigma) + 3.0 * torch.relu(r - 3.0) * x / r.clamp_min(1e-12)

    assert far_field_gain(outward, (2,), [1.0], [1000.0]).gain[0, 0] > 2.9
    noise = draw_noise(0, range(8), (2,), 250, True, torch.float64)
    sweeps = {}
    for name, den, clip in [("exact", exact, None), ("outward", outward, None), ("outward, clipped", outward, 3.0)]:
        chain = make_chain("ddpm", den, steps=250, variance="beta_tilde", clip=clip)
        with torch.inference_mode():
            sweeps[name] = picard(chain, noise, tol=0.1).iterations
    assert sweeps["outward"] > 2 * sweeps["exact"], sweeps
    assert sweeps["outward, clipped"] <= sweeps["exact"] + 4, sweeps
