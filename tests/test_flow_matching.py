"""Flow matching against exact ground truths: the flow path and preconditioning, the fm loss at its minimum, the
time densities, the OT pairing, stable velocity targets as n grows, SA and CDL on a velocity network, the ITD
likelihood of an fm model, and training from the command line."""

import itertools
import json
import math

import pytest
import torch

from difflab.cli import main
from difflab.data.toy import Dino
from difflab.denoisers import FlowPrecond, GMMDenoiser, exact_flow_x0, flow_velocity, flow_x0
from difflab.errors import DifflabError
from difflab.metrics.nll import itd_nll
from difflab.objectives import ITDLoss, build_objective
from difflab.objectives.draws import slice_draws
from difflab.objectives.fm import ot_pairing
from difflab.objectives.stf import stf_target
from difflab.runs import Run
from difflab.schedules import flow_sigma, flow_t, flow_times, shift_t

F64 = torch.float64


class ExactVelocity(torch.nn.Module):
    """The exact velocity v*(x_t, t) = (x_t - E[x0 | x_t]) / t of an exact denoiser, as a network fed 1000 t."""

    def __init__(self, exact):
        super().__init__()
        self.exact = exact
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=F64))  # (the wrapper reads the dtype from it)

    def forward(self, x_t, c_noise, class_labels=None):
        t = c_noise / 1000
        return (x_t - exact_flow_x0(self.exact, x_t, t)) / t.reshape(-1, *([1] * (x_t.ndim - 1)))


@pytest.fixture(scope="module")
def gmm():
    return GMMDenoiser([0.3, 0.7], [[-2.0, 0.5], [1.5, -1.0]], [[0.2, 0.05], [0.1, 0.3]])


def test_the_flow_path_is_the_ve_path_rescaled():
    t = torch.linspace(0.01, 0.99, 50, dtype=F64)
    torch.testing.assert_close(flow_t(flow_sigma(t)), t, rtol=0, atol=1e-15)
    for a in (0.5, 3.0):  # the shift multiplies sigma
        torch.testing.assert_close(flow_sigma(shift_t(t, a)), a * flow_sigma(t), rtol=1e-12, atol=0)
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(8, 3, generator=g, dtype=F64), torch.randn(8, 3, generator=g, dtype=F64)
    tt = t[::7, None][:8]
    x_t = (1 - tt) * x0 + tt * n
    torch.testing.assert_close(x_t / (1 - tt), x0 + flow_sigma(tt) * n, rtol=1e-13, atol=1e-13)


def test_flow_precond_of_the_exact_velocity_is_the_exact_denoiser(gmm):
    """D(x, sigma) = c_skip x + c_out v(c_in x, 1000 t) with the exact velocity inside is the mixture's denoiser at
    every sigma, and flow_x0 / flow_velocity agree with it on the flow path (t = 1: the mean)."""
    D = FlowPrecond(ExactVelocity(gmm))
    g = torch.Generator().manual_seed(1)
    x = 3 * torch.randn(64, 2, generator=g, dtype=F64)
    for s in (0.01, 0.3, 1.0, 7.0, 200.0):
        torch.testing.assert_close(D(x, s), gmm(x, s), rtol=1e-9, atol=1e-9)
    t = torch.rand(64, generator=g, dtype=F64).clamp(0.01, 0.99)
    torch.testing.assert_close(flow_x0(D, x, t), gmm(x / (1 - t[:, None]), t / (1 - t)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow_x0(D, x, 1.0), gmm.mean.expand(64, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow_velocity(gmm, x, t), D.velocity(x, t), rtol=1e-9, atol=1e-9)
    wrong = FlowPrecond(ExactVelocity(GMMDenoiser([0.5, 0.5], gmm.means, gmm.covs)))  # other weights: another D
    assert float((wrong(x, 1.0) - gmm(x, 1.0)).abs().max()) > 1e-2


def test_the_fm_loss_is_minimal_at_the_exact_velocity(gmm):
    """L(v* + c delta) - L(v*) = c^2 E|delta|^2 - 2 c E[delta . (u - v*)]: at the minimum the linear term vanishes,
    so the excess is quadratic in c and symmetric; a wrong field (a shifted mixture) has a linear term."""
    obj = build_objective("fm")
    x0 = gmm.sample(40_000, torch.Generator().manual_seed(2))
    draws = obj.draw(x0, torch.Generator().manual_seed(3))

    def loss(field, c):
        class Net(ExactVelocity):
            def forward(self, x_t, c_noise, class_labels=None):
                return super().forward(x_t, c_noise) + c * torch.sin(x_t)  # delta = sin(x_t)

        return float(obj.loss(FlowPrecond(Net(field)), x0, draws).mean())

    base = loss(gmm, 0.0)
    plus, minus = loss(gmm, 0.2) - base, loss(gmm, -0.2) - base
    quad = 0.5 * (plus + minus)
    assert quad > 0 and abs(plus - minus) < 0.1 * quad  # the linear term is within Monte-Carlo error
    shifted = GMMDenoiser([0.3, 0.7], gmm.means + 0.3, gmm.covs)
    b2 = loss(shifted, 0.0)
    p2, m2 = loss(shifted, 0.2) - b2, loss(shifted, -0.2) - b2
    assert abs(p2 - m2) > 0.5 * (p2 + m2)  # away from the minimum the excess is lopsided
    assert b2 > base


def test_the_velocity_form_equals_the_weighted_denoiser_form(gmm):
    """|v - u|^2 = ((1 + sigma) / sigma)^2 |D - x0|^2: the fm loss of a velocity network and of the same denoiser
    seen as a plain D(x, sigma) agree."""
    obj = build_objective("fm", {"t_density": "logit-normal"})
    x0 = gmm.sample(256, torch.Generator().manual_seed(4))
    draws = obj.draw(x0, torch.Generator().manual_seed(5))

    class Half(ExactVelocity):  # a non-optimal field, so the loss is not just the conditional variance
        def forward(self, x_t, c_noise, class_labels=None):
            return 0.5 * super().forward(x_t, c_noise)

    D = FlowPrecond(Half(gmm))
    as_velocity = obj.loss(D, x0, draws)
    as_denoiser = obj.loss(lambda x, s: D(x, s), x0, draws)
    torch.testing.assert_close(as_velocity, as_denoiser, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize(("density", "shift"), [("uniform", 1.0), ("uniform", 3.0), ("logit-normal", 1.0),
                                                ("logit-normal", 3.0)])
def test_time_densities(density, shift):
    """Drawn t follow the stated density (a binned chi-square-like check); logit-normal t is log-normal sigma, and
    the shift adds log(shift) to log sigma."""
    obj = build_objective("fm", {"t_density": density, "loc": 0.2, "scale": 0.8, "shift": shift})
    t = obj.sample_t(200_000, torch.Generator().manual_seed(6))
    edges = torch.linspace(0, 1, 21, dtype=F64)
    counts = torch.histc(t, bins=20, min=0, max=1) / len(t)
    mids = torch.linspace(0.025, 0.975, 20, dtype=F64)
    fine = torch.linspace(0, 1, 20_001, dtype=F64)[1:-1]
    p = obj.density(fine)
    expected = torch.stack([p[(fine >= a) & (fine < b)].mean() * (b - a)
                            for a, b in zip(edges[:-1], edges[1:], strict=True)])
    assert float((counts - expected).abs().max()) < 0.006, (mids, counts, expected)
    if density == "logit-normal":
        ls = flow_sigma(t).log()
        assert abs(float(ls.mean()) - (0.2 + math.log(shift))) < 0.01
        assert abs(float(ls.std()) - 0.8) < 0.01


def test_ot_pairing_is_the_exact_assignment_and_draws_split_exactly():
    g = torch.Generator().manual_seed(7)
    x0, n = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    pi = ot_pairing(x0, n)

    def cost(p):
        return float(((x0 - n[list(p)]) ** 2).sum())

    best = min(itertools.permutations(range(6)), key=cost)
    assert cost(pi.tolist()) == pytest.approx(cost(best), rel=1e-12)
    obj = build_objective("fm", {"ot": True})
    x = torch.randn(512, 2, generator=g)
    draws = obj.draw(x, torch.Generator().manual_seed(8))
    plain = build_objective("fm").draw(x, torch.Generator().manual_seed(8))
    assert torch.equal(draws["t"], plain["t"])  # the same t; the same noise rows, re-paired
    assert torch.equal(draws["noise"].sort(0).values, plain["noise"].sort(0).values)
    ot_cost = ((x - draws["noise"]) ** 2).sum(1).mean()
    assert ot_cost < 0.5 * ((x - plain["noise"]) ** 2).sum(1).mean()  # far straighter pairs than independent
    half = slice_draws(draws, 256, 512)  # a process's rows see the global pairing
    assert torch.equal(half["noise"], draws["noise"][256:])
    blocks = build_objective("fm", {"ot": True, "ot_block": 128}).draw(x, torch.Generator().manual_seed(8))
    for i in range(0, 512, 128):  # each block is its own assignment: a permutation of its own noise rows
        want = plain["noise"][i:i + 128][ot_pairing(x[i:i + 128], plain["noise"][i:i + 128])]
        assert torch.equal(blocks["noise"][i:i + 128], want)
    block_cost = ((x - blocks["noise"]) ** 2).sum(1).mean()
    assert ot_cost <= block_cost < ((x - plain["noise"]) ** 2).sum(1).mean()


@pytest.mark.parametrize("t", [0.5, 0.9])
def test_stable_velocity_targets_tend_to_the_exact_field(t):
    """The stable velocity target (x_t - T) / t with n references (the row's own point among them) -> the exact
    v*(x_t, t) as n grows: its mean error ~ 0 and its mean squared error ~ C / (n - 1) (the STF theorem's rate),
    far below the conditional target's at n = 256."""
    g = GMMDenoiser([1, 1, 1], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.05, 0.05, 0.05])
    gen = torch.Generator().manual_seed(9)
    s = t / (1 - t)
    R = 600
    mse = {}
    for n in (16, 256):
        x0 = g.sample(R, gen)
        x = x0 + s * torch.randn(R, 2, generator=gen, dtype=F64)
        refs = g.sample(R * (n - 1), gen).reshape(R, n - 1, 2)
        T = torch.cat([stf_target(x[r:r + 1], torch.tensor([s], dtype=F64), torch.cat([x0[r:r + 1], refs[r]]))
                       for r in range(R)])
        err = (T - g(x, s)) / t  # the velocity target's error
        mse[n] = float((err**2).sum(1).mean())
        assert float(err.mean(0).norm()) < 4 * math.sqrt(mse[n] / R) + 1e-3  # no bias beyond Monte-Carlo error
        cfm = float((((x0 - g(x, s)) / t) ** 2).sum(1).mean())  # plain flow matching's target variance
    ratio = (mse[16] * 15) / (mse[256] * 255)
    assert 0.5 < ratio < 2.0, ratio
    assert mse[256] < cfm / 20


def test_sa_on_the_flow_grid(gmm):
    """grid = "flow": the levels are the flow-Euler times, K = 1 is the fm loss at those times, and the velocity
    errors of the exact field average to zero."""
    sa = build_objective("sa", {"grid": "flow", "K": 2, "grid_steps": 50})
    torch.testing.assert_close(sa.levels, flow_times(50)[:-1].flip(0))
    assert build_objective("sa", {"grid": "flow"}).levels[0] == pytest.approx(1e-3)  # t = k / 1000
    D = FlowPrecond(ExactVelocity(gmm))
    x0 = gmm.sample(20_000, torch.Generator().manual_seed(10))
    draws = sa.draw(x0, torch.Generator().manual_seed(11))
    err, mask = sa.errors(D, x0, draws)
    assert err.shape == (20_000, 2, 2) and bool(mask[:, 0].all())
    assert 0.01 < float((~mask[:, 1]).double().mean()) < 0.03  # only the lowest time has no step below it
    assert float(err[mask].mean(0).abs().max()) < 0.03
    one = build_objective("sa", {"grid": "flow", "K": 1, "grid_steps": 50, "lam": 0.0})
    d1 = one.draw(x0[:64], torch.Generator().manual_seed(12))
    t = one.levels[d1["t"]].to(x0.dtype)
    e = d1["eps"][:, 0]
    x_t = (1 - t[:, None]) * x0[:64] + t[:, None] * e
    want = ((e - x0[:64] - D.velocity(x_t, t)) ** 2).sum(1)
    torch.testing.assert_close(one.loss(D, x0[:64], d1), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(DifflabError, match="shift applies to the flow grid"):
        build_objective("sa", {"shift": 3.0})


def test_itd_likelihood_of_an_fm_model_on_the_exact_dino_mixture():
    """An fm model's ITD likelihood goes through its denoiser: with the exact Dino velocity inside, it is the exact
    mixture's own ITD estimate (to round-off), within 0.15 nats of the exact log-density (the estimator's
    truncation and quadrature error on the Dino's narrow components; the log-SNR range is widened to reach them);
    a perturbed field scores worse."""
    dino = Dino()
    exact = dino.denoiser()
    x = dino.eval_data(200).to(F64)
    itd = ITDLoss(loc=4.0, scale=3.0).fit(dino.train_data(4000).to(F64))
    D = FlowPrecond(ExactVelocity(exact))
    nll = itd_nll(D, x, itd, n_alpha=256)
    torch.testing.assert_close(nll, itd_nll(exact, x, itd, n_alpha=256), rtol=1e-9, atol=1e-9)
    truth = -exact.log_prob(x)
    assert abs(float(nll.mean() - truth.mean())) < 0.15, (float(nll.mean()), float(truth.mean()))

    class Off(ExactVelocity):
        def forward(self, x_t, c_noise, class_labels=None):
            return 1.1 * super().forward(x_t, c_noise)

    worse = itd_nll(FlowPrecond(Off(exact)), x, itd, n_alpha=256)
    assert float(worse.mean()) > float(nll.mean()) + 0.05


def test_fm_options_are_checked():
    for opts, msg in [({"t_density": "beta"}, "t_density"), ({"shift": 0}, "shift"), ({"scale": -1}, "scale"),
                      ({"ot": "yes"}, "ot"), ({"ot_block": -1}, "ot_block"), ({"sigma": 1}, "has no option")]:
        with pytest.raises(DifflabError, match=msg):
            build_objective("fm", opts)


def test_train_fm_from_the_cli_sample_with_flow_euler_and_fine_tune(tmp_path, capsys):
    """fm trains the MLP; the run is a flow model sampled by flow-euler by default; stf with base fm, sa on the
    flow grid and cdl fine-tune it and keep the velocity network."""
    out = tmp_path / "fm"
    common = ["--data", "dino", "--steps", "30", "--batch-size", "128", "--quiet"]
    assert main(["train", "--objective", "fm", *common, "--out", str(out)]) == 0
    run = Run.load(out)
    assert run.precond == "flow" and isinstance(run.denoiser, FlowPrecond) and run.default_sampler == "flow-euler"
    capsys.readouterr()
    assert main(["sample", str(out), "--steps", "10", "--n", "50", "--quiet", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["sampler"] == "flow-euler" and stats["steps"] == 10
    stf = ["--set", "objective.options.base='fm'", "--set", "objective.options.reference_size=256"]
    for obj, extra in [("stf", stf), ("sa", ["--set", "objective.options.grid='flow'"]), ("cdl", [])]:
        ft = tmp_path / obj
        args = ["train", "--init", str(out), "--objective", obj, "--steps", "3", "--batch-size", "64", "--quiet",
                "--out", str(ft), *extra]
        assert main(args) == 0, obj
        assert Run.load(ft).precond == "flow", obj
    plain = tmp_path / "plain-ft"  # no --objective: a flow model fine-tunes with fm
    assert main(["train", "--init", str(out), "--steps", "2", "--batch-size", "64", "--quiet", "--out",
                 str(plain)]) == 0
    assert Run.load(plain).config.objective.name == "fm"
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "--sampler flow-euler --steps 50" in info["sample_command"] and "flow matching" in info["schedule"]
    _, st = run.sample(4, 0, "flow-euler", steps=3, shift=3.0)
    assert st.extra["shift"] == 3.0 and run.sample(4, 0, "flow-euler", steps=3)[1].extra["shift"] == 1.0


@pytest.mark.parametrize("arch", ["unet", "diffusers"])
def test_fm_trains_the_unet_and_a_diffusers_unet(tmp_path, arch):
    if arch == "diffusers":
        pytest.importorskip("diffusers")
    out = tmp_path / arch
    args = ["train", "--data", "digits", "--objective", "fm", "--arch", arch, "--steps", "2", "--batch-size", "8",
            "--quiet", "--out", str(out)]
    if arch == "unet":
        args += ["--preset", "tiny"]
    else:
        args += ["--set", "model.diffusers.block_out_channels=[8, 16]", "--set", "model.diffusers.norm_num_groups=4",
                 "--set", "model.diffusers.layers_per_block=1"]
    assert main(args) == 0
    run = Run.load(out)
    assert run.precond == "flow" and run.config.model.arch == arch
    x, stats = run.sample(2, 0, "flow-euler", steps=2)
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all()) and stats.nfe_per_sample == 2


def test_guidance_on_a_flow_model(gmm, tmp_path):
    """Classifier-free guidance of a velocity network on the flow path, t = 1 included: (1 + w) cond - w uncond of
    the clean estimates; and a class-conditional fm run samples guided from the command line."""
    from difflab.conditioning import Guided

    class Labelled(ExactVelocity):
        def forward(self, x_t, c_noise, class_labels=None):
            return super().forward(x_t, c_noise) + 0.1 * class_labels.to(x_t.dtype)[:, None]

    D = FlowPrecond(Labelled(gmm))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(13), dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for t in (1.0, 0.4):
        cond, uncond = D.flow_x0(x, t, class_labels=y), D.flow_x0(x, t, class_labels=torch.full_like(y, -1))
        torch.testing.assert_close(Guided(D, 2.0).flow_x0(x, t, class_labels=y), 3 * cond - 2 * uncond, rtol=1e-12,
                                   atol=1e-12)
    out = tmp_path / "cond"
    assert main(["train", "--data", "digits", "--objective", "fm", "--preset", "tiny", "--conditional", "--steps", "2",
                 "--batch-size", "8", "--quiet", "--out", str(out)]) == 0
    run = Run.load(out)
    plain, _ = run.sample(4, 0, "flow-euler", steps=3, class_labels=3)
    guided, st = run.sample(4, 0, "flow-euler", steps=3, class_labels=3, guidance=2.0)
    assert st.extra["guidance"] == 2.0 and float((guided - plain).abs().max()) > 0
