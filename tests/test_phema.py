"""Post-hoc EMA (EDM2's power-function EMA, difflab.training.phema): sigma_rel <-> gamma, the closed-form inner
products, the per-step update's exact weights, the reconstruction of a tracked profile from the others'
snapshots, exact resume, torchrun, and 'difflab phema' (its output read by Run.load, info and sample; bad input
in one line)."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.runs import Run
from difflab.training import load_checkpoint, train
from difflab.training import phema as P
from difflab.training.checkpoint import checkpoint_dir

TINY = ["train.batch_size=32", "model.width=16", "model.depth=1", "data.n_train=500", "train.log_every=10",
        "train.warmup_steps=5", "schedule.T=200"]


def tiny(steps: int, stds=(0.05, 0.1), every: int | None = 10, **train_kw):
    cfg = load_config(overrides=[*TINY, f"train.steps={steps}", f"train.phema={list(stds)}"])
    cfg.train.phema_every = every
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for _, v in sorted(state.items())])


# --------------------------------------------------------------------------------------------- the profiles


def test_sigma_rel_and_gamma_round_trip_with_edm2s_values():
    # EDM2 (Karras et al. 2024): sigma_rel 0.05 is gamma 16.97, 0.10 is gamma 6.94
    assert P.std_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert P.std_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    for std in (1e-3, 0.01, 0.05, 0.07, 0.1, 0.2, 0.28):
        g = P.std_to_gamma(std)
        assert g > 0 and P.gamma_to_std(g) == pytest.approx(std, rel=1e-13)
        assert g**3 + 7 * g**2 + (16 - std**-2) * g + 12 - std**-2 == pytest.approx(0, abs=1e-9 * std**-2 * g)
    for g in (0.5, 3.0, 16.97, 500.0):
        assert P.std_to_gamma(P.gamma_to_std(g)) == pytest.approx(g, rel=1e-10)
    assert P.gamma_to_std(0.0) == pytest.approx(P.MAX_STD)
    for bad in (0, -0.1, 0.29, math.nan, math.inf):
        with pytest.raises(DifflabError, match="must be in"):
            P.std_to_gamma(bad)


def test_inner_products_match_quadrature():
    """<p_a, p_b> in closed form against Gauss-Legendre quadrature of the densities on [0, min(T_a, T_b)]."""
    nodes, weights = np.polynomial.legendre.leggauss(400)
    for Ta, ga, Tb, gb in [(100, 16.97, 100, 6.94), (40, 6.94, 100, 16.97), (100, 16.97, 40, 6.94),
                           (7, 2.5, 3, 11.2), (1000, 0.3, 999, 0.3)]:
        lo = min(Ta, Tb)
        s = (nodes + 1) * lo / 2
        pa = (ga + 1) * s**ga / Ta ** (ga + 1)
        pb = (gb + 1) * s**gb / Tb ** (gb + 1)
        quad = float(np.sum(weights * pa * pb) * lo / 2)
        assert float(P.inner(Ta, ga, Tb, gb)) == pytest.approx(quad, rel=1e-10)
        assert float(P.inner(Ta, ga, Tb, gb)) == float(P.inner(Tb, gb, Ta, ga))  # symmetric


def test_the_per_step_update_weighs_each_step_by_the_profile_integrated_over_it():
    """Tracking a network whose weights after step k are the unit vector e_k gives the tracked copy's weights:
    (k^(g+1) - (k-1)^(g+1)) / T^(g+1), the continuous density integrated over step k (no offset)."""
    T = 50
    net = torch.nn.Linear(T, 1, bias=False)
    ema = P.PowerEMA(net, [0.05, 0.2])
    for k in range(1, T + 1):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, k - 1] = 1.0
        ema.update(net, k)
        if k in (1, 17, T):
            for gamma, copy in zip(ema.gammas, ema.copies, strict=True):
                got = copy["weight"][0, :k].double().numpy()
                np.testing.assert_allclose(got, P.profile_weights(gamma, k), rtol=1e-5, atol=1e-7)
    assert P.profile_weights(ema.gammas[0], T).sum() == pytest.approx(1.0, rel=1e-14)


def test_the_solve_rebuilds_per_step_weights_within_its_profile_error():
    """The coefficients for 0.07 from 20 snapshots each of 0.05 and 0.10 rebuild the per-step weights of the
    0.07 EMA to within the reported (continuous) profile error, which is small, and sum to 1."""
    every, n = 10, 20
    steps = [every * k for k in range(1, n + 1) for _ in (0, 1)]
    gammas = [P.std_to_gamma(s) for _ in range(n) for s in (0.05, 0.1)]
    x, err = P.solve(steps, gammas, every * n, P.std_to_gamma(0.07))
    assert x.sum() == pytest.approx(1.0, rel=1e-14) and err < 3e-3  # (measured 2.46e-3)
    rebuilt = np.zeros(every * n)
    for xi, s, g in zip(x, steps, gammas, strict=True):
        rebuilt[:s] += xi * P.profile_weights(g, s)
    target = P.profile_weights(P.std_to_gamma(0.07), every * n)
    assert np.linalg.norm(rebuilt - target) / np.linalg.norm(target) < 1.1 * err  # (measured 2.40e-3)


# --------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A 200-step Dino MLP run tracking 0.05, 0.10 and 0.07, snapshots every 10 steps."""
    path = tmp_path_factory.mktemp("phema") / "r"
    train(tiny(200, stds=(0.05, 0.1, 0.07)), path, progress=False)
    return path


def test_snapshots_are_written_every_phema_every_steps_and_at_the_end(tmp_path):
    train(tiny(45), tmp_path / "r", progress=False)
    snaps = P.list_snapshots(tmp_path / "r")
    assert [(s.step, s.std) for s in snaps] == [(k, s) for k in (10, 20, 30, 40, 45) for s in (0.05, 0.1)]
    last = load_file(str(snaps[-1].path))  # the 0.1 copy at step 45: the denoiser's state dict
    tensors, _ = load_checkpoint(tmp_path / "r")  # the checkpoint holds the tracked copies: phema.<i>.<name>
    assert set(last) == {k.removeprefix("ema.") for k in tensors if k.startswith("ema.")}
    for k, v in last.items():
        assert v.dtype == torch.float32 and torch.equal(tensors[f"phema.1.{k}"], v), k


def test_phema_every_defaults_to_a_32nd_of_the_steps_and_is_saved(tmp_path):
    train(tiny(64, every=None), tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["phema_every"] == 2
    assert len(P.list_snapshots(tmp_path / "r")) == 2 * 32
    cfg = load_config(overrides=[*TINY, "train.steps=10"])  # off: nothing resolved, nothing tracked
    train(cfg, tmp_path / "off", progress=False)
    assert json.loads((tmp_path / "off" / "config.json").read_text())["train"]["phema_every"] is None
    assert not (tmp_path / "off" / "phema").exists()
    assert not any(k.startswith("phema.") for k in load_checkpoint(tmp_path / "off")[0])


def test_a_tracked_profile_is_rebuilt_from_the_other_profiles_snapshots(run3, monkeypatch):
    """0.07 rebuilt from the snapshots of 0.05 and 0.10 only vs the 0.07 copy tracked directly: relative to how far
    apart the 0.05 and 0.10 copies are, 1.1e-4 here (profile error 2.5e-3). A target off by 0.005 in sigma_rel
    misses it by 8e-2, and inner products with the wrong exponent by far more."""
    copies = {s: flat(load_file(str(P.snapshot_path(run3, 200, s)))) for s in (0.05, 0.07, 0.1)}
    scale = float((copies[0.05] - copies[0.1]).norm())

    def miss(std):
        return float((flat(P.reconstruct(run3, std, from_stds=[0.05, 0.1])) - copies[0.07]).norm()) / scale

    plan = P.plan_reconstruction(run3, 0.07, from_stds=[0.05, 0.1])
    assert len(plan.snapshots) == 40 and plan.error < 3e-3
    assert miss(0.07) < 1e-3
    assert miss(0.065) > 2e-2 and miss(0.075) > 2e-2  # the bound tells sigma_rel to better than 0.005
    right = P.inner

    def swapped(T_a, gamma_a, T_b, gamma_b):  # the exponent of the shorter profile: a plausible slip
        T_a, gamma_a, T_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (T_a, gamma_a, T_b, gamma_b))
        lo, hi = np.minimum(T_a, T_b), np.maximum(T_a, T_b)
        g = np.where(T_a <= T_b, gamma_a, gamma_b)
        return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi) * (lo / hi) ** g

    monkeypatch.setattr(P, "inner", swapped)
    assert miss(0.07) > 1e-2  # (measured 0.32)
    monkeypatch.setattr(P, "inner", right)
    # no offset: the tracked copy at step T is the density on [0, T] integrated step by step; snapshot times
    # shifted by half a step or one step rebuild 0.07 10 to 20 times worse (measured 1.2e-3, 2.5e-3)
    for offset in (0.5, 1.0):
        x, _ = P.solve([s.step + offset for s in plan.snapshots], [s.gamma for s in plan.snapshots], 200 + offset,
                       plan.gamma)
        shifted = flat(P.combine(dataclasses.replace(plan, coefficients=x)))
        assert float((shifted - copies[0.07]).norm()) / scale > 5 * miss(0.07)
    # with every profile's snapshots, the tracked one at its own step comes back (nearly) as it is
    assert float((flat(P.reconstruct(run3, 0.07)) - copies[0.07]).norm()) / scale < 1e-5


def test_an_earlier_step_and_the_library_export(run3, tmp_path):
    plan = P.export_phema(run3, 0.08, tmp_path / "e", step=100)
    assert plan.step == 100 and all(s.step <= 100 for s in plan.snapshots)
    run = Run.load(tmp_path / "e")
    assert run.step == 100 and run.state["phema"]["std"] == 0.08
    want = P.reconstruct(run3, 0.08, step=100)
    for k, v in run.denoiser.state_dict().items():
        assert torch.equal(v, want[k]), k


def _snapshot_tensors(run_dir) -> dict:
    return {(s.step, s.std): load_file(str(s.path)) for s in P.list_snapshots(run_dir)}


def test_resume_is_bit_identical_with_snapshots_past_the_checkpoint_rewritten(tmp_path):
    train(tiny(60, ckpt_every=25), tmp_path / "a", progress=False)
    train(tiny(60, ckpt_every=25), tmp_path / "b", until=45, progress=False)  # checkpoints 25 and 45
    shutil.rmtree(checkpoint_dir(tmp_path / "b", 45))  # a kill after step 45: resumes from 25 past snapshots 30, 40
    stale = P.snapshot_path(tmp_path / "b", 40, 0.05)
    stale.write_bytes(b"from the lost steps")  # (to see it rewritten: a resume drops snapshots past its step)
    train(None, tmp_path / "b", resume=True, progress=False)
    a, b = _snapshot_tensors(tmp_path / "a"), _snapshot_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 2 * 6
    for key in a:
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    ta, tb = load_checkpoint(tmp_path / "a")[0], load_checkpoint(tmp_path / "b")[0]
    assert any(k.startswith("phema.") for k in ta) and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_track_and_snapshot_as_one(tmp_path):
    """torchrun with 2 gloo processes: one set of snapshots (the first process writes), equal to a one-process
    run's up to float summation order (as the weights are: tests/test_distributed.py)."""
    args = ["train", "--steps", "12", "--width", "16", "--depth", "1", "--set", "train.batch_size=24", "--set",
            "data.n_train=500", "--set", "train.phema=[0.05, 0.1]", "--set", "train.phema_every=5", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # one process: this one (one thread, the MLP's)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "difflab.cli"]
    res = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = _snapshot_tensors(tmp_path / "one"), _snapshot_tensors(tmp_path / "two")
    assert one.keys() == two.keys() == {(k, s) for k in (5, 10, 12) for s in (0.05, 0.1)}
    for key in one:
        for k in one[key]:
            torch.testing.assert_close(one[key][k], two[key][k], rtol=1e-4, atol=1e-5, msg=str((key, k)))
    assert sorted(p.name for p in (tmp_path / "two" / "phema").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "phema").iterdir())


# --------------------------------------------------------------------------------------------- the command


def phema_cli(argv, capsys):
    code = main(["phema", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_writes_a_folder_that_sample_info_and_run_load_read(run3, tmp_path, capsys):
    code, out, err = phema_cli([str(run3), "--std", "0.12", "--out", str(tmp_path / "r2"), "--json"], capsys)
    assert code == 0, err
    got = json.loads(out.splitlines()[-1])
    assert got["std"] == 0.12 and got["step"] == 200 and got["snapshots"] == 60 and got["profile_error"] < 1e-2
    run = Run.load(tmp_path / "r2")
    want = P.reconstruct(run3, 0.12)
    assert all(torch.equal(v, want[k]) for k, v in run.denoiser.state_dict().items())
    assert main(["info", str(tmp_path / "r2"), "--json"]) == 0
    info = json.loads(capsys.readouterr()[0].splitlines()[-1])
    assert info["kind"] == "exported" and info["step"] == 200
    assert main(["sample", str(tmp_path / "r2"), "--sampler", "ddim", "--steps", "5", "--n", "16", "--quiet"]) == 0
    capsys.readouterr()
    assert (tmp_path / "r2" / "samples.npz").is_file()
    code, _, err = phema_cli([str(run3), "--std", "0.12", "--out", str(tmp_path / "r2")], capsys)
    assert code == 2 and "not empty" in err  # (--overwrite replaces it)
    assert phema_cli([str(run3), "--std", "0.1", "--out", str(tmp_path / "r2"), "--overwrite"], capsys)[0] == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--std", "0.3"], "--std must be in (0, 0.2887)"),
    (["--std", "0"], "--std must be in (0, 0.2887)"),
    (["--std", "nan"], "--std must be in (0, 0.2887)"),
    (["--std", "0.07", "--step", "15"], "has no post-hoc EMA snapshots at step 15: its snapshot steps are 10, 20, "
                                        "30, ..., 190, 200"),
    (["--std", "0.07", "--step", "0"], "has no post-hoc EMA snapshots at step 0"),
])
def test_bad_input_fails_in_one_line_before_any_work(run3, tmp_path, capsys, argv, message):
    code, out, err = phema_cli([str(run3), *argv, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x").exists()


def test_a_run_without_snapshots_and_a_missing_run(tmp_path, capsys):
    train(load_config(overrides=[*TINY, "train.steps=5"]), tmp_path / "plain", progress=False)
    code, _, err = phema_cli([str(tmp_path / "plain"), "--std", "0.1", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1 and "holds no post-hoc EMA snapshots" in err and "train.phema" in err
    code, _, err = phema_cli([str(tmp_path / "nowhere"), "--std", "0.1", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such run folder" in err
    assert not (tmp_path / "x").exists()
