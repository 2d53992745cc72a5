"""The loss-weighting options of the sigma-weighted objectives (difflab.objectives.weighting): min-SNR-gamma,
soft-min-SNR and the v-loss weighting against their formulas (and diffusers' eps and v_prediction forms), EDM2's
learned uncertainty weighting (its formula, its head trained, saved and resumed bit-identically, averaged under
torchrun), and the defaults leaving every loss as it was."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from difflab.config import load_config
from difflab.denoisers import FlowPrecond, VPPrecond, per_sample
from difflab.errors import DifflabError
from difflab.models import build_denoiser
from difflab.objectives import OBJECTIVES, build_objective, objectives_help
from difflab.objectives.weighting import WEIGHTING_OPTIONS, LogVarHead
from difflab.schedules import DDPMSchedule
from difflab.training import Trainer, load_checkpoint, train

F64 = torch.float64
SD = 0.7  # the sigma_data the objectives that take one get here
BASES = ("dsm", "edm", "vp", "ve", "fm")
WEIGHTED = (*BASES, *(f"stf:{b}" for b in BASES))  # every objective the options apply to, stf on each base


def build(name: str, options: dict | None = None):
    """An objective by name, "stf:BASE" for STF on BASE, with the run's schedule and sigma_data = SD."""
    options = dict(options or {})
    if name.startswith("stf:"):
        name, options["base"] = "stf", name[4:]
    return build_objective(name, options, schedule=DDPMSchedule(), sigma_data=SD)


def own_lambda(base: str, sigma: torch.Tensor) -> torch.Tensor:
    """Each objective's own weight on |D - x0|^2 (the weight its loss form implies)."""
    if base == "edm":
        return (sigma**2 + SD**2) / (sigma * SD) ** 2
    if base == "fm":
        return ((1 + sigma) / sigma) ** 2
    return 1 / sigma**2  # dsm's eps-MSE and EDM's VP and VE


def by_hand(weighting: str, sigma: torch.Tensor, base: str, gamma: float = 5.0) -> torch.Tensor:
    """W(sigma) on |D - x0|^2, written out: SNR = 1 / sigma^2 (diffusers' abar / (1 - abar))."""
    snr = 1 / sigma**2
    if weighting == "min-snr":
        return torch.minimum(snr, torch.full_like(snr, gamma))
    if weighting == "soft-min-snr":  # k-diffusion's, sigma_data the objective's own (1 without one)
        sd = SD if base == "edm" else 1.0
        return 1 / (sigma**2 + sd**2)
    assert weighting == "v"
    return snr + 1


def draws_for(obj, x0, seed=2):
    return obj.draw(x0, torch.Generator().manual_seed(seed))


def known_error(draws, delta):
    """A denoiser whose error D - x0 is ``delta`` wherever it is asked at a row's own noised point."""
    noise = draws["noise"]
    return lambda x, sigma: x - per_sample(sigma, x) * noise + delta


class ConstantVelocity(nn.Module):
    """A 'velocity network' answering u + delta' row by row (u = n - x0: the flow path's true velocity)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros((), dtype=F64))
        self.out = out

    def forward(self, x_in, c_noise):
        return self.out + 0 * self.dummy


def x0_batch(shape=(2,), n=16, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------------------------- the formulas


@pytest.mark.parametrize("weighting", ["min-snr", "soft-min-snr", "v"])
@pytest.mark.parametrize("base", BASES)
def test_each_weight_is_its_formula_on_a_denoiser_of_known_error(base, weighting):
    x0 = x0_batch()
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    for gamma in ([5.0, 0.5] if weighting == "min-snr" else [None]):
        opts = {"weighting": weighting, **({"snr_gamma": gamma} if gamma is not None else {})}
        obj = build(base, opts)
        draws = draws_for(obj, x0)
        sigma, err = draws["sigma"], (delta**2).sum(1)
        D = known_error(draws, delta)
        expected = by_hand(weighting, sigma, base, gamma or 5.0) * err
        torch.testing.assert_close(obj.loss(D, x0, draws), expected, rtol=1e-9, atol=0)
        if base == "fm":  # the velocity form: a velocity network off by delta' is off by t delta' in D
            t = draws["t"]
            vel = FlowPrecond(ConstantVelocity(draws["noise"] - x0 + delta))
            torch.testing.assert_close(obj.loss(vel, x0, draws),
                                       by_hand(weighting, sigma, base, gamma or 5.0) * t**2 * err, rtol=1e-9, atol=0)


@pytest.mark.parametrize("weighting", ["min-snr", "soft-min-snr", "v"])
@pytest.mark.parametrize("name", WEIGHTED)
def test_each_weighting_is_its_weight_over_the_objectives_own_lambda(name, weighting):
    """Per example, loss with the weighting / loss without = W(sigma) / lambda(sigma), whatever the network (a
    seeded MLP in the objective's own parametrisation) and the target (STF's stable targets)."""
    base = name.split(":")[-1]
    x0 = x0_batch(n=24)
    D = seeded_network(OBJECTIVES[base].precond_for())
    plain, weighted = build(name), build(name, {"weighting": weighting})
    draws = draws_for(plain, x0)
    ratio = weighted.loss(D, x0, draws) / plain.loss(D, x0, draws)
    sigma = draws["sigma"]
    torch.testing.assert_close(ratio, by_hand(weighting, sigma, base) / own_lambda(base, sigma), rtol=1e-9, atol=0)


def test_min_snr_is_diffusers_epsilon_and_v_prediction_weights():
    """diffusers: mse_loss_weights = min(snr, gamma) / snr on the eps-MSE (epsilon), min(snr, gamma) / (snr + 1) on
    the v-MSE (v_prediction), snr = compute_snr = alphas_cumprod / (1 - alphas_cumprod) at the timestep. dsm's
    min-snr loss is both: the weighted eps-MSE of an eps network, and the weighted v-MSE of a v network."""
    sched, gamma = DDPMSchedule(), 3.0
    x0 = x0_batch(n=32)
    obj = build("dsm", {"weighting": "min-snr", "snr_gamma": gamma})
    draws = draws_for(obj, x0)
    sigma, noise = draws["sigma"], draws["noise"]
    t = torch.stack([(sched.sigma == s).nonzero()[0, 0] for s in sigma])  # each row's timestep
    abar = sched.abar[t]
    snr = (abar.sqrt() / (1 - abar).sqrt()) ** 2  # compute_snr
    w_eps = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    w_v = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / (snr + 1)
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * noise  # the VP sample of x0 + sigma n
    x = x0 + sigma[:, None] * noise
    for prediction, weight in (("eps", w_eps), ("v", w_v)):
        D = VPPrecond(TimedNet(), sched, prediction=prediction)
        assert torch.equal(D.timestep(sigma), t.to(F64)) and torch.allclose(x / (1 + sigma[:, None] ** 2).sqrt(), x_t)
        out = D.net(x_t, t.to(F64))  # what the network answers at (x_t, t)
        target = noise if prediction == "eps" else abar.sqrt()[:, None] * noise - (1 - abar).sqrt()[:, None] * x0
        diffusers = weight * ((out - target) ** 2).sum(1)
        torch.testing.assert_close(obj.loss(D, x0, draws), diffusers, rtol=1e-9, atol=0)


class TimedNet(nn.Module):
    """A seeded float64 MLP of (x, timestep), as diffusers' UNets take them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.f = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2)).double()

    def forward(self, x, c):
        return self.f(torch.cat([x, c.reshape(-1, 1) / 1000], 1))


def seeded_network(precond: str):
    cfg = load_config(overrides=["model.width=16", "model.depth=1", f'model.precond="{precond}"'])
    torch.manual_seed(0)
    return build_denoiser(cfg, (2,)).double()


# --------------------------------------------------------------------------------------------- the learned head


def test_the_head_is_edm2s_fourier_features_then_a_linear_layer():
    head = LogVarHead()
    assert head.weight.shape == (1, 128) and not head.weight.any() and not head.bias.any()
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=F64)
    assert torch.equal(head(sigma), torch.zeros(4, dtype=F64))  # u = 0 at the start
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(0))
        head.bias.fill_(0.25)
    c = sigma.float().log() / 4  # EDM2's c_noise
    feats = math.sqrt(2) * torch.cos(c[:, None] * head.freqs + head.phases)
    torch.testing.assert_close(head(sigma), (feats @ head.weight[0] + 0.25).double())
    assert torch.equal(LogVarHead().freqs, head.freqs)  # fixed frequencies, not drawn from the global generator
    state = torch.get_rng_state()
    LogVarHead()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
@pytest.mark.parametrize("weighting", ["none", "min-snr"])
@pytest.mark.parametrize("name", WEIGHTED)
def test_the_learned_weighting_is_edm2s_loss(name, weighting, shape):
    """L = W |D - x0|^2 / e^u + d u, d the example's dimensions (EDM2's per-element (w / e^u) (D - x0)^2 + u
    summed over them), for whichever weight is in force."""
    base = name.split(":")[-1]
    x0 = x0_batch(shape, n=12)
    plain = build(name, {"weighting": weighting})
    learned = build(name, {"weighting": weighting, "learned_weighting": True})
    head = learned.trainable()
    assert isinstance(head, LogVarHead) and learned.learned_weighting is not plain.learned_weighting
    assert [id(p) for p in learned.parameters()] == [id(head.weight), id(head.bias)]
    with torch.no_grad():
        head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        head.bias.fill_(0.3)
    draws = draws_for(plain, x0)
    delta = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    D = known_error(draws, delta)
    kw = {"reference": x0} if name.startswith("stf") else {}
    u = head(draws["sigma"])
    d = math.prod(shape)
    expected = plain.loss(D, x0, draws, **kw) * torch.exp(-u) + d * u
    torch.testing.assert_close(learned.loss(D, x0, draws, **kw), expected, rtol=1e-12, atol=1e-12)
    if base == "fm":  # and in the velocity form
        vel = FlowPrecond(ConstantVelocity(draws["noise"] - x0 + delta))
        expected = plain.loss(vel, x0, draws, **kw) * torch.exp(-u) + d * u
        torch.testing.assert_close(learned.loss(vel, x0, draws, **kw), expected, rtol=1e-12, atol=1e-12)


def test_the_learned_weightings_optimum_is_the_weighted_error_per_dimension():
    """d/du (L e^-u + d u) = 0 at e^u = L / d: minimising over u alone finds each sigma's error per dimension."""
    obj = build("edm", {"learned_weighting": True})
    x0 = x0_batch((3,), n=1)
    draws = draws_for(obj, x0)
    D = known_error(draws, torch.full_like(x0, 0.2))
    opt = torch.optim.Adam(obj.parameters(), lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        obj.loss(D, x0, draws).sum().backward()
        opt.step()
    plain = build("edm").loss(D, x0, draws)
    assert float(obj.trainable()(draws["sigma"]).detach()) == pytest.approx(math.log(float(plain) / 3), abs=1e-3)


# --------------------------------------------------------------------------------------------- training


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)


def tiny(name: str, options: dict, steps: int = 3, **train):
    """A tiny MLP run on the Dino ("stf:BASE": STF on BASE with 32 references), the options set as on the CLI."""
    opts = {**({"base": name[4:], "reference_size": 32} if name.startswith("stf") else {}), **options}
    cfg = load_config(overrides=[f"train.steps={steps}", "train.batch_size=16", "model.width=16", "model.depth=1",
                                 "data.n_train=200", "train.log_every=1", "train.ckpt_every=100",
                                 "train.warmup_steps=0", f'objective.name="{name.split(":")[0]}"',
                                 *(f"objective.options.{k}={_toml(v)}" for k, v in opts.items())])
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


TRAINED = [{"weighting": "min-snr", "snr_gamma": 1.0}, {"weighting": "soft-min-snr"}, {"weighting": "v"},
           {"learned_weighting": True}, {"weighting": "min-snr", "learned_weighting": True}]


@pytest.mark.parametrize("options", TRAINED, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("name", WEIGHTED)
def test_each_weighting_trains_each_objective(tmp_path, name, options):
    cfg = tiny(name, options, steps=2)
    trainer = Trainer(cfg, tmp_path)
    before = [p.detach().clone() for p in trainer.objective.parameters()]
    losses = [trainer.train_step()[0] for _ in range(2)]
    assert all(math.isfinite(v) for v in losses), losses
    after = trainer.objective.parameters()
    assert len(before) == len(after) == (2 if options.get("learned_weighting") else 0)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the head learns


@pytest.mark.parametrize("name", ["edm", "stf:fm"])
def test_the_head_is_trained_by_the_runs_optimiser_saved_and_resumed_bit_identically(tmp_path, name):
    def cfg():
        return tiny(name, {"weighting": "min-snr", "learned_weighting": True}, steps=8, ckpt_every=4)

    trainer = Trainer(cfg(), tmp_path / "t" / name)
    group = trainer.opt.param_groups[0]["params"]
    trained = (*trainer.model.parameters(), *trainer.objective.parameters())
    assert [id(p) for p in group] == [id(p) for p in trained]
    assert len(trainer.objective.parameters()) == 2
    train(cfg(), tmp_path / name / "a", progress=False)
    train(cfg(), tmp_path / name / "b", until=3, progress=False)
    train(None, tmp_path / name / "b", resume=True, progress=False)
    a, sa = load_checkpoint(tmp_path / name / "a")
    b, sb = load_checkpoint(tmp_path / name / "b")
    assert sa["step"] == sb["step"] == 8 and a.keys() == b.keys()
    assert {k for k in a if k.startswith("objective.")} == \
        {"objective.freqs", "objective.phases", "objective.weight", "objective.bias"}
    assert any(k.startswith("optim.") and k.split(".")[1] == str(len(group) - 1) for k in a)  # its moments
    for k in a:
        assert torch.equal(a[k], b[k]), (name, k)
    assert a["objective.bias"].abs().item() > 0  # trained (it starts at 0)


def test_a_checkpoint_of_another_objective_state_is_refused(tmp_path):
    obj = build("edm", {"learned_weighting": True})
    state = obj.state_dict()
    obj.load_state_dict({k: v.clone() for k, v in state.items()})
    with pytest.raises(DifflabError, match="holds objective state .* resume with the objective options"):
        build("edm").load_state_dict(state, "checkpoint x")
    with pytest.raises(DifflabError, match="objective state"):
        obj.load_state_dict({}, "checkpoint x")
    build("dsm").load_state_dict({})  # none saved, none held


# the value of each objective's loss for a fixed draw on a seeded MLP, and of a short training run, before the
# weighting options existed: the defaults leave them exactly so
BEFORE = {("dsm", "eps"): 105.60014924676982, ("edm", "edm"): 119.42573294785441, ("vp", "vp"): 103.0227710845075,
          ("ve", "ve"): 105.17153954203914, ("fm", "flow"): 222.1251953441477, ("fm", "edm"): 217.9049301882036,
          ("stf:edm", "edm"): 28.581477006661064, ("stf:dsm", "eps"): 77.46804483968195,
          ("stf:vp", "vp"): 86.03061311344729, ("stf:ve", "ve"): 88.47134746325068,
          ("stf:fm", "flow"): 51.84817525386593}
BEFORE_TRAINING = {"dsm": 1.8448532025019329, "edm": 2.090885639190674, "fm": 4.106442372004191,
                   "stf": 0.8593784769376119}


@pytest.mark.parametrize(("name", "precond"), sorted(BEFORE))
def test_the_defaults_leave_the_loss_as_it_was(name, precond):
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    kw = {"reference": torch.cat([x0, torch.randn(64, 2, generator=torch.Generator().manual_seed(3), dtype=F64)])} \
        if name.startswith("stf") else {}
    D = seeded_network(precond)
    values = []
    for options in ({}, {"weighting": "none", "learned_weighting": False}):
        obj = build(name, options)
        assert obj.weighting == "none" and obj.trainable() is None and obj.parameters() == [] == list(obj.state_dict())
        values.append(obj(D, x0, torch.Generator().manual_seed(2), **kw).detach())
    assert torch.equal(values[0], values[1])
    assert float(values[0].sum()) == pytest.approx(BEFORE[(name, precond)], rel=1e-12)


@pytest.mark.parametrize("name", sorted(BEFORE_TRAINING))
def test_the_defaults_leave_training_as_it_was(tmp_path, name):
    cfg = load_config(overrides=["train.steps=6", "train.batch_size=32", "model.width=16", "model.depth=1",
                                 "data.n_train=200", "train.log_every=3", "train.ckpt_every=3", "train.warmup_steps=0",
                                 "train.threads=1", f'objective.name="{name}"',
                                 *(["objective.options.reference_size=64"] if name == "stf" else [])])
    res = train(cfg, tmp_path, progress=False)
    assert res.loss == pytest.approx(BEFORE_TRAINING[name], rel=1e-6)
    assert not any(k.startswith("objective.") for k in load_checkpoint(tmp_path)[0])


# --------------------------------------------------------------------------------------------- options


def test_the_options_are_checked_and_listed():
    for name in (*BASES, "stf"):
        assert OBJECTIVES[name].accepted_options()[-3:] == list(WEIGHTING_OPTIONS), name
    for name in ("itd", "cdl", "sa"):
        with pytest.raises(DifflabError, match=f"objective {name!r} has no option 'weighting'"):
            build_objective(name, {"weighting": "min-snr"})
    with pytest.raises(DifflabError, match="unknown weighting 'min_snr'.*did you mean 'min-snr'"):
        build("edm", {"weighting": "min_snr"})
    with pytest.raises(DifflabError, match="snr_gamma applies to weighting = min-snr only"):
        build("dsm", {"snr_gamma": 5.0})
    with pytest.raises(DifflabError, match="snr_gamma must be > 0"):
        build("fm", {"weighting": "min-snr", "snr_gamma": 0.0})
    with pytest.raises(DifflabError, match="learned_weighting must be true or false"):
        build("stf:ve", {"learned_weighting": 1})
    with pytest.raises(DifflabError, match="has no option 'snr_gama'.*did you mean 'snr_gamma'"):
        build("stf:dsm", {"snr_gama": 2})
    assert build("ve", {"weighting": "min-snr"}).snr_gamma == 5.0
    cfg = load_config(overrides=['objective.name="stf"', 'objective.options.base="fm"',
                                 'objective.options.weighting="soft-min-snr"',
                                 "objective.options.learned_weighting=true"])
    assert cfg.objective.options["weighting"] == "soft-min-snr"
    text = objectives_help()
    lines = {line.split()[0]: line for line in text.replace("\n        ", " ").splitlines()}
    for name in BASES:
        assert "weighting (none | min-snr | soft-min-snr | v" in lines[name] and "learned_weighting" in lines[name]
    assert "loss weighting" in lines["stf"]


# --------------------------------------------------------------------------------------------- torchrun


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_average_the_heads_gradients_like_the_networks(tmp_path):
    args = ["--data", "dino", "--objective", "edm", "--steps", "12", "--width", "16", "--depth", "1", "--set",
            "train.batch_size=24", "--set", "data.n_train=500", "--set", "objective.options.learned_weighting=true",
            "--set", 'objective.options.weighting="min-snr"', "--quiet", "--overwrite"]
    from difflab.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0  # one process: this one (one thread, the MLP's)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--module"]
    cmd = [sys.executable, *torchrun, "difflab.cli", "train", *args, "--out", str(tmp_path / "two")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_checkpoint(tmp_path / "one")[0], load_checkpoint(tmp_path / "two")[0]
    for k in a:
        if k.startswith(("model.", "objective.")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert a["objective.bias"].abs().item() > 0
