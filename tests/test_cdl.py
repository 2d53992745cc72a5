import math

import pytest
import torch

from difflab.conditioning import Bound, cond_rows, rearrange
from difflab.data import GMM1D
from difflab.diagnostics import noise_classification
from difflab.errors import DifflabError
from difflab.objectives import build_objective
from difflab.objectives.cdl import CDLLoss
from difflab.objectives.density_ratio import log_density_ratio, mse_pair, noise_to, remap

F64 = torch.float64


def closed_form_ratio(den, x, zeta):
    """log p(x) - log p_zeta(x) for an analytic mixture: p_zeta(x) = p_s(x / sqrt(a)) / a^(d/2), s^2 = (1-a)/a."""
    a = torch.sigmoid(torch.as_tensor(zeta, dtype=F64))
    s = ((1 - a) / a).sqrt()
    d = x[0].numel()
    return den.log_prob(x, 0.0) - (den.log_prob(x / a.sqrt(), s.expand(len(x))) - 0.5 * d * a.log())


def test_remap_identity():
    alpha = torch.linspace(-25, 25, 101, dtype=F64)
    for zeta in (-8.0, -1.0, 0.0, 3.0, 12.0):
        ap, r = remap(alpha, torch.full_like(alpha, zeta))
        expected = torch.sigmoid(alpha) * torch.sigmoid(torch.tensor(zeta, dtype=F64))
        torch.testing.assert_close(torch.sigmoid(ap), expected, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(r, (torch.sigmoid(-alpha) / torch.sigmoid(-ap)).sqrt(), rtol=1e-12, atol=0)
        assert bool((ap <= alpha).all())  # pushing through the channel again can only lower the SNR


@pytest.mark.parametrize("which", ["gauss2d", "gmm1d"])
def test_quadrature_ratio_matches_the_closed_form(which, request):
    den = GMM1D().denoiser() if which == "gmm1d" else request.getfixturevalue(which)
    d = den.dim
    g = torch.Generator().manual_seed(0)
    x = den.sample(6, g) + 0.5 * torch.randn(6, d, generator=g, dtype=F64)  # on and a little off the data
    if which == "gmm1d":
        x = torch.cat([x, torch.tensor([[0.0], [9.0]], dtype=F64)])  # between the modes and beyond one
    for zeta in (-4.0, 0.0, 2.0, 6.0):
        est = log_density_ratio(den, x, zeta, n_alpha=160, quadrature=True)
        torch.testing.assert_close(est, closed_form_ratio(den, x, zeta), rtol=0, atol=1e-3)


def test_monte_carlo_ratio_is_unbiased_within_its_standard_error():
    den = GMM1D().denoiser()
    x = torch.tensor([[-5.3], [0.5], [4.0]], dtype=F64)
    truth = closed_form_ratio(den, x, 1.0)
    reps = torch.stack([log_density_ratio(den, x, 1.0, n_alpha=256, generator=torch.Generator().manual_seed(i))
                        for i in range(40)])
    se = reps.std(0) / math.sqrt(len(reps))
    assert bool(((reps.mean(0) - truth).abs() < 4 * se + 1e-3).all()), (reps.mean(0), truth, se)


def test_common_random_numbers_cut_the_estimator_variance():
    den = GMM1D().denoiser()
    x = torch.tensor([[-5.0], [2.0]], dtype=F64)

    def spread(common):
        reps = torch.stack([log_density_ratio(den, x, 2.0, n_alpha=64, common_noise=common,
                                              generator=torch.Generator().manual_seed(i)) for i in range(30)])
        return reps.std(0)

    assert bool((spread(True) < 0.5 * spread(False)).all())


def test_both_estimates_come_from_one_batched_denoiser_call():
    den = GMM1D().denoiser()
    calls = []

    def counting(x, s):
        calls.append(len(x))
        return den(x, s)

    x = torch.randn(5, 1, dtype=F64)
    mse_pair(counting, x, torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64), torch.randn(5, 1, dtype=F64))
    assert calls == [10]


def test_cdl_loss_of_the_exact_denoiser_is_below_a_perturbed_ones():
    den = GMM1D().denoiser()
    x = den.sample(512, torch.Generator().manual_seed(0))
    obj = CDLLoss(n_cdl=512, n_alpha=64, std_weight=0.0).fit(x)
    draws = obj.draw(x, torch.Generator().manual_seed(1))
    rows = draws["cdl_rows"]
    assert sorted(rows.tolist()) == list(range(512))
    exact = obj.cdl_terms(den, x[rows], draws).mean()
    for bad in (lambda y, s: 0.9 * den(y, s), lambda y, s: den(y, s) + 0.3):
        worse = obj.cdl_terms(bad, x[rows], draws).mean()
        assert worse > exact + 0.01, (worse, exact)
    assert exact < math.log(2)  # better than chance


def test_noise_classification_of_the_exact_denoiser():
    den = GMM1D().denoiser()
    x = den.sample(400, torch.Generator().manual_seed(3))
    strong, mid, weak = noise_classification(den, x, [-6.0, -2.0, 2.0], n_alpha=64)
    # Measured (this seed, ratio nodes): accuracy / cross-entropy in bits 0.988 / 0.049, 0.950 / 0.205, 0.556 / 0.987
    # (the reference's iid nodes: 0.984 / 0.061, 0.946 / 0.204, 0.555 / 0.984); the Bayes classifier (closed-form
    # logits, 200k points): 0.990 / 0.039, 0.949 / 0.187, 0.561 / 0.983. The Monte-Carlo logits' noise costs a
    # little cross-entropy, never much less than the Bayes value. (The failing variants below were measured with
    # the iid nodes.)
    # Heavily noised points are easy to spot; a flipped logit sign or swapped labels (0.016 / 14.7), or a channel
    # with its sigmoids swapped (0.500 / 8.1), fail here.
    assert strong["accuracy"] > 0.97 and strong["cross_entropy"] < 0.1
    # The tight one: the logits' scale matters. A missing 1/2 in the estimator (logits x 2: 0.278), an extra one
    # (x 1/2: 0.252), noised points without their noise term (0.123), a flipped sign (7.9), the sigmoids swapped
    # (3.5) or nats for bits (0.141) all fall outside.
    assert mid["accuracy"] > 0.92 and 0.17 < mid["cross_entropy"] < 0.24
    # Barely noised: near chance, but below it; a flipped sign (0.445 / 1.051), logits x 2 (1.000) or the sigmoids
    # swapped (0.790 / 0.735) fail.
    assert 0.5 < weak["accuracy"] < 0.62 and 0.97 < weak["cross_entropy"] < 0.995


def test_cdl_objective_options_and_defaults():
    x2 = torch.randn(1000, 2, dtype=F64)
    obj = build_objective("cdl", {"n_cdl": 4, "n_alpha": 16}, data=x2)
    assert (obj.zeta_min, obj.zeta_max) == pytest.approx((obj.itd.loc - 9, obj.itd.loc + 9))
    img = CDLLoss().fit(torch.randn(100, 3, 4, 4, dtype=F64))
    assert (img.n_cdl, img.n_alpha, img.cdl_weight, img.nodes) == (2, 16, 4.0, "ratio")  # since 2026-12-07
    assert (img.zeta_loc, img.zeta_scale, img.zeta_min, img.zeta_max) == (10.5, 1.5, 6.0, 15.0)
    z = img.sample_zeta(10_000, torch.Generator().manual_seed(0))
    assert z.min() >= 6 and z.max() <= 15
    loss = obj(lambda y, s: y * 0.5, x2[:32].float(), torch.Generator().manual_seed(0))
    assert loss.shape == (32,) and bool(torch.isfinite(loss).all())
    with pytest.raises(DifflabError, match="n_alpha"):
        build_objective("cdl", {"n_alpha": 0})
    with pytest.raises(DifflabError, match="quadrature over eps"):
        log_density_ratio(lambda y, s: y, torch.zeros(2, 5, dtype=F64), 0.0, quadrature=True)


def test_noise_to_is_the_vp_channel():
    """sqrt(sigmoid(zeta)) x + sqrt(sigmoid(-zeta)) eta, zeta per row: swapped sigmoids or a lost eta term fail."""
    g = torch.Generator().manual_seed(0)
    x, eta = torch.randn(4, 3, 2, 2, generator=g, dtype=F64), torch.randn(4, 3, 2, 2, generator=g, dtype=F64)
    root_sig = lambda v: math.sqrt(1 / (1 + math.exp(-v)))  # noqa: E731
    out = noise_to(x, torch.full((4,), 2.0, dtype=F64), eta)
    torch.testing.assert_close(out, root_sig(2.0) * x + root_sig(-2.0) * eta, rtol=1e-14, atol=0)
    zetas = [-3.0, 0.5, 2.0, 7.0]
    expected = torch.stack([root_sig(z) * x[i] + root_sig(-z) * eta[i] for i, z in enumerate(zetas)])
    torch.testing.assert_close(noise_to(x, torch.tensor(zetas, dtype=F64), eta), expected, rtol=1e-14, atol=0)


def test_memory_estimate_counts_the_cdl_rows_of_the_defaults():
    from difflab.config import load_config
    from difflab.memory import network_rows

    cfg = load_config(overrides=['objective.name="cdl"', "train.batch_size=128"])
    assert network_rows(cfg) == 128 + 2 * 2 * 16
    cfg = load_config(overrides=['objective.name="cdl"', "train.batch_size=128", "objective.options.n_alpha=32"])
    assert network_rows(cfg) == 128 + 2 * 2 * 32


@pytest.mark.parametrize("labelled", [False, True])
def test_one_batched_call_gives_the_itd_term_plus_the_cdl_terms(labelled):
    den = GMM1D().denoiser()
    x = den.sample(64, torch.Generator().manual_seed(0))
    obj = CDLLoss(n_cdl=6).fit(x)
    draws = obj.draw(x, torch.Generator().manual_seed(1))
    calls = []

    def net(y, s, class_labels=None):
        calls.append((len(y), None if class_labels is None else class_labels.tolist()))
        return den(y, s) * (1.0 if class_labels is None else 1 + 0.01 * class_labels[:, None].to(y.dtype))

    labels = torch.arange(64) % 3
    D = Bound(net, {"class_labels": labels}) if labelled else net
    merged = obj.loss(D, x, draws)
    assert [c[0] for c in calls] == [64 + 6 * 16 * 2]  # one call: the batch, then k x n_alpha x 2 ratio rows
    if labelled:  # each ratio row carries its CDL row's label
        rows = draws["cdl_rows"]
        assert calls[0][1] == labels.tolist() + labels[rows].repeat_interleave(16).repeat(2).tolist()
    rows = draws["cdl_rows"]
    expected = obj.itd.loss(D, x, draws)
    expected[rows] += obj.cdl_weight * obj.cdl_terms(rearrange(D, lambda c: cond_rows(c, rows)), x[rows], draws)
    torch.testing.assert_close(merged, expected, rtol=1e-12, atol=1e-12)
