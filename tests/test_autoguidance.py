"""Autoguidance (difflab.autoguidance): D_w = (1 + w) D_main - w D_guide on exact denoisers, through every sampler and
Picard; w = 0 is the main model bit for bit; RUN@STEP loads a kept checkpoint; a guide that cannot guide is refused
in one line."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROUND_OFF
from difflab.autoguidance import AutoGuided, check_guide
from difflab.denoisers import FlowPrecond, GaussianDenoiser, per_sample
from difflab.errors import DifflabError
from difflab.runs import Run, split_step
from difflab.samplers import SEQUENTIAL, make_chain, sample_chain
from difflab.training.checkpoint import checkpoint_dir, load_checkpoint, unprefixed
from test_cli import last_json, run

F64 = torch.float64
# Two centred Gaussians with diagonal covariances: D(x, sigma) = C (C + sigma^2)^-1 x, so at sigma = 1 the main
# model's coefficients are (1/2, 1/5) and the guide's (4/5, 1/2), and the guided one's (1/2 - 3w/10, 1/5 - 3w/10).
MAIN = GaussianDenoiser(torch.zeros(2, dtype=F64), torch.tensor([1.0, 0.25], dtype=F64))
GUIDE = GaussianDenoiser(torch.zeros(2, dtype=F64), torch.tensor([4.0, 1.0], dtype=F64))
STEPS = 12


class Formula:
    """(1 + w) D1 - w D2 written out, on the sigma grid and the flow path."""

    def __init__(self, d1, d2, w):
        self.d1, self.d2, self.w = d1, d2, w

    def __call__(self, x, sigma):
        return (1 + self.w) * self.d1(x, sigma) - self.w * self.d2(x, sigma)

    def flow_x0(self, x_t, t):
        return (1 + self.w) * self.d1.flow_x0(x_t, t) - self.w * self.d2.flow_x0(x_t, t)


class VelocityNet(nn.Module):
    """A flow-matching "network" giving an exact denoiser's velocity at t = c_noise / 1000 (FlowPrecond's input)."""

    def __init__(self, den):
        super().__init__()
        self.den, self.anchor = den, nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x_t, c_noise):
        t = c_noise / FlowPrecond.T
        return (x_t - self.den.flow_x0(x_t, t)) / per_sample(t, x_t)


class Untouchable:
    """A guide that must not be evaluated."""

    def __call__(self, *a, **k):
        raise AssertionError("the guide was evaluated at w = 0")

    flow_x0 = velocity = __call__


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0])
def test_the_guided_denoiser_is_one_plus_w_main_minus_w_guide(w):
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0], [-0.5, 3.0]], dtype=F64)
    want = torch.tensor([0.5 - 0.3 * w, 0.2 - 0.3 * w], dtype=F64) * x
    D = AutoGuided(MAIN, GUIDE, w)
    torch.testing.assert_close(D(x, 1.0), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(D(x, torch.ones(3, dtype=F64)), want, rtol=0, atol=1e-15)  # one sigma per row
    # the flow path: x_t = x / 2 at t = 1/2 is x at sigma = 1; at t = 1 each model's estimate is its data mean
    torch.testing.assert_close(D.flow_x0(x / 2, 0.5), want, rtol=0, atol=1e-15)
    torch.testing.assert_close(D.velocity(x / 2, 0.5), (x / 2 - want) / 0.5, rtol=0, atol=1e-14)
    shifted = AutoGuided(GaussianDenoiser(torch.tensor([1.0, 0.0], dtype=F64), 1.0),
                         GaussianDenoiser(torch.tensor([0.0, 2.0], dtype=F64), 1.0), w)
    torch.testing.assert_close(shifted.flow_x0(x, 1.0), torch.tensor([[1 + w, -2 * w]] * 3, dtype=F64), rtol=0,
                               atol=1e-15)


def test_both_models_get_the_same_condition_and_a_negative_weight_is_refused():
    seen = []

    def conditional(x, sigma, class_labels):
        seen.append(class_labels)
        return x * (1 + class_labels[:, None].to(x.dtype))

    y = torch.tensor([0, 1, 2])
    x = torch.ones(3, 2, dtype=F64)
    out = AutoGuided(conditional, conditional, 1.5)(x, 0.3, class_labels=y)
    assert len(seen) == 2 and all(torch.equal(s, y) for s in seen)
    assert torch.equal(out, x * (1 + y[:, None].to(F64)))  # the same model as its own guide: no change
    for bad in (-1.0, float("nan")):
        with pytest.raises(DifflabError, match=">= 0"):
            AutoGuided(MAIN, GUIDE, bad)


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_every_sampler_and_its_picard_form_run_the_guided_denoiser(name):
    """Each sampler over AutoGuided is the sampler over the written-out (1 + w) D1 - w D2, and its parallel
    (Picard) form at tol 0 is its sequential twin."""
    chain = make_chain(name, AutoGuided(MAIN, GUIDE, 1.0), steps=STEPS)
    seq, _ = sample_chain(chain, 16, 3, (2,), dtype=F64)
    ref, _ = sample_chain(make_chain(name, Formula(MAIN, GUIDE, 1.0), steps=STEPS), 16, 3, (2,), dtype=F64)
    torch.testing.assert_close(seq, ref, rtol=0, atol=ROUND_OFF)
    plain, _ = sample_chain(make_chain(name, MAIN, steps=STEPS), 16, 3, (2,), dtype=F64)
    assert float((seq - plain).abs().max()) > 0.01  # (the guidance changes the samples)
    for parallel in ({"tol": 0}, {"tol": 0, "window": 5}):
        par, stats = sample_chain(chain, 16, 3, (2,), dtype=F64, parallel=parallel)
        assert stats.sampler == f"picard-{name}"
        torch.testing.assert_close(par, seq, rtol=0, atol=ROUND_OFF)


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_weight_zero_is_the_main_model_bit_for_bit(name):
    """w = 0 never evaluates the guide: the samples are the unguided ones exactly, a velocity network's too."""
    main = FlowPrecond(VelocityNet(MAIN)) if name.startswith("flow-") else MAIN
    for parallel in (None, {"tol": 0}):
        got, _ = sample_chain(make_chain(name, AutoGuided(main, Untouchable(), 0.0), steps=STEPS), 8, 1, (2,),
                              dtype=F64, parallel=parallel)
        want, _ = sample_chain(make_chain(name, main, steps=STEPS), 8, 1, (2,), dtype=F64, parallel=parallel)
        assert torch.equal(got, want), name


def test_check_guide_refuses_what_cannot_be_combined():
    def model(shape=(2,), K=0, precond="eps", data="dino"):
        return SimpleNamespace(shape=shape, num_classes=K, precond=precond, data=data)

    check_guide(model(precond="edm"), model(precond="eps"), "ddim")  # any two sigma-space denoisers combine
    check_guide(model(K=10), model(K=10))
    check_guide(model(data="dino"), model(data=""))  # an imported model names no data set
    cases = [(model(), model(shape=(1,)), None, "the guide's examples have shape (1,), the main model's (2,)"),
             (model(K=10), model(), None, "the main model is class-conditional (10 classes) but the guide is not"),
             (model(), model(K=10), None, "the guide is class-conditional (10 classes) but the main model is not"),
             (model(K=10), model(K=4), None, "the guide has 4 classes, the main model 10"),
             (model(precond="flow"), model(), "picard-flow-euler", "flow-euler starts from pure noise"),
             (model(precond="flow"), model(), "flow-heun", "the guide's parametrisation is eps")]
    for main, guide, sampler, msg in cases:
        with pytest.raises(DifflabError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            check_guide(main, guide, sampler)
    check_guide(model(precond="flow"), model(precond="flow"), "flow-euler")
    with pytest.warns(UserWarning, match="the guide was trained on 'moons'"):
        check_guide(model(data="dino?n=100"), model(data="moons"))


# --------------------------------------------------------------------------------------------- runs and the CLI

TINY = ["--width", "16", "--depth", "1", "--set", "train.batch_size=16", "--set", "data.n_train=200", "--quiet"]


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    """A 4-step Dino run that kept checkpoints 2 and 4."""
    from difflab.cli import main

    out = tmp_path_factory.mktemp("ag") / "dsm"
    assert main(["train", "--steps", "4", *TINY, "--set", "train.ckpt_every=2", "--set", "train.keep_checkpoints=5",
                 "--out", str(out)]) == 0
    return out


def test_run_at_step_loads_that_checkpoints_ema_weights(dino_run):
    tensors, state = load_checkpoint(checkpoint_dir(dino_run, 2))
    assert state["step"] == 2
    for r in (Run.load(f"{dino_run}@2"), Run.load(dino_run, step=2), Run.load(f"{dino_run}@2", step=2)):
        assert r.step == 2 and r.path == checkpoint_dir(dino_run, 2)
        got = r.denoiser.state_dict()
        assert all(torch.equal(got[k], v) for k, v in unprefixed("ema.", tensors).items()) and len(got)
    raw = Run.load(f"{dino_run}@2", ema=False).denoiser.state_dict()
    assert all(torch.equal(raw[k], v) for k, v in unprefixed("model.", tensors).items())
    final = Run.load(dino_run).denoiser.state_dict()
    assert final.keys() == got.keys() and any(not torch.equal(final[k], got[k]) for k in got)
    assert split_step(f"{dino_run}@2") == (dino_run, 2) and split_step(dino_run) == (dino_run, None)
    with pytest.raises(DifflabError, match="has no checkpoint of step 3: it keeps steps 2, 4 "):
        Run.load(f"{dino_run}@3")
    with pytest.raises(DifflabError, match="names step 2, but step=4"):
        Run.load(f"{dino_run}@2", step=4)
    with pytest.raises(DifflabError, match="is a checkpoint folder already"):
        Run.load(f"{checkpoint_dir(dino_run, 2)}@2")


def test_an_at_in_an_existing_path_is_part_of_its_name(dino_run, tmp_path):
    odd = tmp_path / "run@2"
    odd.symlink_to(dino_run, target_is_directory=True)
    assert split_step(odd) == (odd, None) and Run.load(odd).step == 4


def test_run_sample_with_a_guide_records_it_and_weight_zero_changes_nothing(dino_run):
    r = Run.load(dino_run)
    plain, _ = r.sample(20, 0, "ddim", steps=8)
    same, st = r.sample(20, 0, "ddim", steps=8, guide_with=f"{dino_run}@2", guidance=0.0)
    assert torch.equal(same, plain)
    assert st.extra["guide"] == str(checkpoint_dir(dino_run, 2)) and st.extra["guide_step"] == 2
    assert st.extra["guidance"] == 0.0
    guide = Run.load(f"{dino_run}@2")
    x, st = r.sample(20, 0, "ddim", steps=8, guide_with=guide, guidance=1.0)
    assert float((x - plain).abs().max()) > 0 and st.extra["guidance"] == 1.0
    chain = make_chain("ddim", AutoGuided(r.denoiser, guide.denoiser, 1.0), steps=8)
    by_hand, _ = sample_chain(chain, 20, 0, r.shape, dtype=F64)
    assert torch.equal(x, by_hand)
    with pytest.raises(DifflabError, match="--null-class is classifier-free guidance's"):
        r.sample(2, 0, "ddim", steps=2, guide_with=guide, guidance=1.0, null_class=0)


def test_cli_samples_with_a_guide_and_records_it(dino_run, tmp_path, capsys):
    code, out, err = run(["sample", str(dino_run), "--n", "10", "--sampler", "heun", "--steps", "4", "--guide-with",
                          f"{dino_run}@2", "--guidance", "1.5", "--out", str(tmp_path / "g.npz"), "--json",
                          "--quiet"], capsys)
    assert code == 0, err
    rec = last_json(out)
    assert rec["guide"] == str(checkpoint_dir(dino_run, 2)) and rec["guide_step"] == 2 and rec["guidance"] == 1.5
    with np.load(tmp_path / "g.npz") as f:
        assert json.loads(str(f["stats"]))["guide_step"] == 2
    code, out, err = run(["sample", f"{dino_run}@2", "--n", "4", "--steps", "3", "--json", "--quiet"], capsys)
    assert code == 0, err
    assert last_json(out)["checkpoint_step"] == 2 and (dino_run / "samples-step2.npz").is_file()


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """A 1-D run (another shape) and a flow-matching Dino run, one step each."""
    from difflab.cli import main

    root = tmp_path_factory.mktemp("other")
    assert main(["train", "--data", "gmm1d", "--steps", "1", *TINY, "--out", str(root / "gmm1d")]) == 0
    assert main(["train", "--objective", "fm", "--steps", "1", *TINY, "--out", str(root / "fm")]) == 0
    return root


@pytest.mark.parametrize(("args", "msg"), [
    (["--guide-with", "{run}@2"], "--guide-with needs --guidance W"),
    (["--guidance", "1"], "--guidance needs a guide (--guide-with RUN: autoguidance) or a class-conditional model"),
    (["--guide-with", "{run}@2", "--guidance", "-1"], "--guidance must be >= 0"),
    (["--guide-with", "{run}@3", "--guidance", "1"], "has no checkpoint of step 3: it keeps steps 2, 4"),
    (["--guide-with", "{run}@x", "--guidance", "1"], "the step after '@' must be a checkpoint's step number"),
    (["--guide-with", "{run}@2", "--guidance", "1", "--null-class", "0"], "--null-class is classifier-free"),
    (["--guide-with", "{run}@2", "--guidance", "1", "--class", "1"], "not class-conditional"),
    (["--guide-with", "{other}/gmm1d", "--guidance", "1"], "the guide's examples have shape (1,), the main model's"),
    (["--guide-with", "{other}/nothing", "--guidance", "1"], "no such run or checkpoint"),
])
def test_cli_errors_are_one_line(dino_run, other_runs, tmp_path, capsys, args, msg):
    args = [a.format(run=dino_run, other=other_runs) for a in args]
    code, _, err = run(["sample", str(dino_run), "--n", "4", "--steps", "3", "--out", str(tmp_path / "s.npz"),
                        "--quiet", *args], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and msg in lines[0], err
    assert not (tmp_path / "s.npz").exists()


def test_a_flow_sampler_needs_a_flow_matching_guide(dino_run, other_runs, tmp_path, capsys):
    fm = other_runs / "fm"
    code, _, err = run(["sample", str(fm), "--n", "4", "--steps", "3", "--sampler", "flow-euler", "--guide-with",
                        str(dino_run), "--guidance", "1", "--out", str(tmp_path / "s.npz"), "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "the guide's parametrisation is eps" in err, err
    code, _, err = run(["sample", str(fm), "--n", "4", "--steps", "3", "--sampler", "picard-flow-heun",
                        "--guide-with", str(fm), "--guidance", "1", "--out", str(tmp_path / "f.npz"), "--quiet"],
                       capsys)
    assert code == 0, err
    code, _, err = run(["sample", str(fm), "--n", "4", "--steps", "3", "--sampler", "ddim", "--guide-with",
                        str(dino_run), "--guidance", "1", "--out", str(tmp_path / "d.npz"), "--quiet"], capsys)
    assert code == 0, err  # on the sigma grid a flow model and an eps model combine
