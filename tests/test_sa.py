import pytest
import torch

from difflab.denoisers import GMMDenoiser, VPPrecond
from difflab.diagnostics.gap import estimation_gap
from difflab.errors import DifflabError
from difflab.nets import MLP
from difflab.objectives import DSMEps, build_objective
from difflab.objectives.sa import SALoss, gap_coefficients, tau_weights
from difflab.schedules import DDPMSchedule, edm_sigma_steps

F64 = torch.float64


def _den():
    return GMMDenoiser(torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
                       torch.tensor([0.1, 0.2], dtype=F64))


def test_k1_is_one_plus_lambda_times_l_simple():
    den = _den()
    x0 = den.sample(64, torch.Generator().manual_seed(0))
    sa = SALoss(K=1, lam=0.7)
    draws = sa.draw(x0, torch.Generator().manual_seed(1))
    err, _ = sa.errors(den, x0, draws)
    simple = err[:, 0].pow(2).sum(1)
    torch.testing.assert_close(sa.loss(den, x0, draws), 1.7 * simple, rtol=1e-12, atol=0)
    # and L_simple itself is the DSM-eps loss of the same t and noise
    dsm = DSMEps()
    d = {"sigma": DDPMSchedule().sigma[draws["t"]], "noise": draws["eps"][:, 0]}
    torch.testing.assert_close(dsm.loss(den, x0, d), simple, rtol=1e-9, atol=1e-12)


def test_the_mask_drops_exactly_the_terms_below_step_one():
    den = _den()
    x0 = den.sample(3, torch.Generator().manual_seed(0))
    sa = SALoss(K=4, lam=1.0)
    draws = {"t": torch.tensor([1, 2, 900]), "eps": torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(2),
                                                                   dtype=F64)}
    err, mask = sa.errors(den, x0, draws)
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False], [True] * 4]
    expected = err[:, 0].pow(2).sum(1) + (mask[:, :, None] * err).sum(1).pow(2).sum(1) / 16
    torch.testing.assert_close(sa.loss(den, x0, draws), expected)
    manual_t1 = err[0, 0].pow(2).sum() * (1 + 1 / 16)  # only its own step remains
    torch.testing.assert_close(sa.loss(den, x0, draws)[0], manual_t1)


def test_tau_weights_match_the_direct_gap_recursion():
    sched = DDPMSchedule()
    c, g = gap_coefficients(sched)
    for t in (3, 50, 400, 1000):
        K = 4
        tau = tau_weights(sched, torch.tensor([t]), K, normalise=False)[0]
        low = max(t - K + 1, 1)  # the window's lowest valid step
        # D_low = c_low e_low + gamma_low D_{low+1} ...: the coefficient of e_s, by running the recursion on unit e_s
        for k in range(K):
            s = t - k
            if s < 1:
                assert tau[k] == 0
                continue
            coef = torch.tensor(0.0, dtype=F64)
            for step in range(t, low - 1, -1):  # D_step = c_step e_step + gamma_step D_{step+1}
                coef = (c[step] if step == s else 0.0) + g[step] * coef
            torch.testing.assert_close(tau[k], coef, rtol=1e-10, atol=0)
    w = tau_weights(sched, torch.tensor([400]), 4)
    assert abs(float(w.mean()) - 1) < 1e-12 and float(w.max() / w.min()) < 1.05  # equal within 5% for s >= 50


def test_batched_evaluation_equals_k_separate_passes_in_loss_and_gradient():
    torch.manual_seed(0)
    model = VPPrecond(MLP(2, width=16, depth=1), DDPMSchedule())
    x0 = torch.randn(8, 2)
    sa = SALoss(K=3, lam=0.5)
    draws = sa.draw(x0, torch.Generator().manual_seed(3))
    loss = sa.loss(model, x0, draws).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    # K separate passes, one per step k
    sched = DDPMSchedule()
    errs = []
    for k in range(3):
        s = (draws["t"] - k).clamp(min=1)
        sig = sched.sigma[s].float()
        x = x0 + sig[:, None] * draws["eps"][:, k]
        errs.append(draws["eps"][:, k] - model.eps(x, sig))
    mask = ((draws["t"][:, None] - torch.arange(3)[None]) >= 1).float()
    summed = sum(mask[:, k, None] * errs[k] for k in range(3))
    loss2 = (errs[0].pow(2).sum(1) + 0.5 * summed.pow(2).sum(1) / 9).mean()
    grads2 = torch.autograd.grad(loss2, list(model.parameters()))
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_exact_denoiser_has_zero_gap_in_expectation_and_a_biased_one_does_not():
    den = _den()
    x0 = den.sample(2000, torch.Generator().manual_seed(0))
    exact = estimation_gap(den, x0, t0=100)
    biased = estimation_gap(lambda x, s: den(x, s) + 0.05, x0, t0=100)
    assert exact["step"][0] == 100 and exact["step"][-1] == 1
    assert biased["gap"][-1] > 5 * exact["gap"][-1]


def test_sa_options():
    with pytest.raises(DifflabError, match="normaliser"):
        build_objective("sa", {"normaliser": "K3"})
    obj = build_objective("sa", {"K": 3, "lam": 0.3, "tau": True})
    x0 = _den().sample(16, torch.Generator().manual_seed(0))
    assert obj(_den(), x0, torch.Generator().manual_seed(0)).shape == (16,)


def test_continuous_time_sa_uses_neighbours_on_the_edm_grid():
    den = _den()
    x0 = den.sample(8, torch.Generator().manual_seed(0))
    sa = SALoss(K=3, lam=1.0, grid="edm", grid_steps=10)
    assert torch.equal(sa.levels, torch.flip(edm_sigma_steps(10)[:-1], (0,)))
    draws = {"t": torch.tensor([0, 1, 9, 5, 2, 3, 4, 6]), "eps": torch.randn(8, 3, 2, dtype=F64)}
    err, mask = sa.errors(den, x0, draws)
    assert mask[0].tolist() == [True, False, False] and mask[1].tolist() == [True, True, False]
    # the k-th error is the eps error at grid level t - k (one level less noise per k)
    k, row = 1, 2
    s = sa.levels[8]
    x = x0[row] + s * draws["eps"][row, k]
    expected = draws["eps"][row, k] - (x - den(x[None], s.reshape(1))[0]) / s
    torch.testing.assert_close(err[row, k], expected)
    with pytest.raises(DifflabError, match="DDPM grid only"):
        SALoss(grid="edm", tau=True)
