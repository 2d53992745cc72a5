import math

import pytest
import torch
from torch import nn

from difflab.data import GMM1D
from difflab.denoisers import (
    EDMPrecond,
    EmpiricalDenoiser,
    GMMDenoiser,
    VEPrecond,
    VPPrecond,
    eps_hat,
    score,
)
from difflab.errors import DifflabError
from difflab.schedules import DDPMSchedule, VPSchedule

SIGMAS = torch.tensor([0.002, 0.05, 0.3, 1.0, 3.0, 20.0, 150.0], dtype=torch.float64)


def _grid_points(d: int, n: int, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _autograd_score(den, x, sigma):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(den.log_prob(x, sigma).sum(), x)
    return g


@pytest.mark.parametrize("which", ["gauss2d", "gmm2d"])
def test_score_is_the_gradient_of_log_prob_and_tweedie_holds(which, request):
    den = request.getfixturevalue(which)
    x = _grid_points(2, 7)
    for s in SIGMAS[1:]:
        sig = s.expand(7)
        torch.testing.assert_close(den.score(x, sig), _autograd_score(den, x, sig), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(den(x, sig), x + s**2 * den.score(x, sig), rtol=1e-9, atol=1e-9)


def test_empirical_denoiser_agrees_with_autograd_and_with_a_zero_variance_mixture():
    pts = _grid_points(2, 40, seed=1)
    emp = EmpiricalDenoiser(pts)
    gmm = GMMDenoiser(torch.ones(40), pts, torch.zeros(40))
    x = _grid_points(2, 9, seed=2)
    for s in SIGMAS[1:]:
        sig = s.expand(9)
        torch.testing.assert_close(emp(x, sig), gmm(x, sig), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(emp.log_prob(x, sig), gmm.log_prob(x, sig), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(emp.score(x, sig), _autograd_score(emp, x, sig), rtol=1e-7, atol=1e-9)


def _by_chunks(den, x, sig, chunk, bug=None):
    """EmpiricalDenoiser's row-chunked evaluation written out, or with a deliberate off-by-one at every chunk
    boundary after the first: ``drop`` leaves the last data point out of the chunk, ``duplicate`` counts the first
    one twice, ``rows`` starts the chunk one row early, ``sigmas`` pairs its rows with the previous rows' sigmas."""
    xf, s2 = x.reshape(len(x), -1), sig.reshape(-1, 1) ** 2
    out = []
    for i in range(0, len(xf), chunk):
        n = len(xf[i : i + chunk])
        lo, Y = (i - 1 if i and bug == "rows" else i), den.Y
        s = s2[i - 1 : i - 1 + n] if i and bug == "sigmas" else s2[lo : lo + n]
        if i and bug == "drop":
            Y = Y[:-1]
        if i and bug == "duplicate":
            Y = torch.cat([Y[:1], Y])
        logits = (xf[lo : lo + n] @ Y.T - 0.5 * (Y**2).sum(1)[None]) / s
        out.append(torch.softmax(logits, 1) @ Y)
    return torch.cat(out)


def test_empirical_denoiser_chunks_give_the_same_answer():
    """Chunks of 4 rows against one chunk of 33. Not bit for bit: a BLAS may pick other kernels (and so another
    summation order) for another number of rows; on an Intel Xeon the largest difference is 2.8e-17. A tolerance of
    1e-12 of the values' scale is 1e4 times that round-off, and over 1e3 times below what each off-by-one at a
    chunk boundary in ``_by_chunks`` does on these inputs (checked below; in fact 1e9 times or more)."""
    pts = _grid_points(3, 50, seed=3)
    x = _grid_points(3, 33, seed=4)
    sig = torch.linspace(0.5, 1.2, 33, dtype=torch.float64)  # per-row sigmas, so a misaligned sigma shows
    full, chunked = EmpiricalDenoiser(pts), EmpiricalDenoiser(pts, chunk_elems=50 * 4)
    assert full.chunk >= 33 and chunked.chunk == 4
    want = full(x, sig)
    atol = 1e-12 * float(want.abs().max())
    torch.testing.assert_close(chunked(x, sig), want, rtol=0, atol=atol)
    torch.testing.assert_close(_by_chunks(chunked, x, sig, 4), want, rtol=0, atol=atol)  # the helper is faithful
    for bug in ("drop", "duplicate", "rows", "sigmas"):
        wrong = _by_chunks(chunked, x, sig, 4, bug)
        assert wrong.shape == want.shape and float((wrong - want).abs().max()) > 1e3 * atol, bug


def test_empirical_denoiser_returns_the_own_point_at_tiny_sigma():
    pts = _grid_points(2, 30, seed=5)
    out = EmpiricalDenoiser(pts)(pts + 1e-4, torch.full((30,), 0.002, dtype=torch.float64))
    torch.testing.assert_close(out, pts, rtol=0, atol=1e-12)


def test_gaussian_denoiser_closed_form(gauss2d):
    mu, C = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    x = _grid_points(2, 5)
    for s in SIGMAS:
        expected = mu + (C @ torch.linalg.solve(C + s**2 * torch.eye(2, dtype=torch.float64), (x - mu).T)).T
        torch.testing.assert_close(gauss2d(x, s), expected, rtol=1e-10, atol=1e-12)
    assert gauss2d.entropy() == pytest.approx(1 + math.log(2 * math.pi) + 0.5 * math.log(0.8 - 0.36), rel=1e-12)
    torch.testing.assert_close(gauss2d.cov, C)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 4.0])
def test_gmm1d_density_integrates_to_one(sigma):
    den = GMM1D().denoiser()
    x = torch.linspace(-30, 30, 60001, dtype=torch.float64)[:, None]
    p = den.log_prob(x, sigma).exp()
    assert torch.trapezoid(p, dx=1e-3).item() == pytest.approx(1.0, abs=1e-9)


def test_gmm1d_denoiser_pulls_to_the_nearest_mode():
    den = GMM1D().denoiser()
    x = torch.tensor([[-6.0], [0.0], [6.0]], dtype=torch.float64)
    d = den(x, torch.full((3,), 0.1, dtype=torch.float64))[:, 0]
    assert d[0] < -5.5 and abs(d[1]) < 1e-12 and d[2] > 5.5
    big = den(x, torch.full((3,), 1e3, dtype=torch.float64))[:, 0]  # at huge noise: the data mean, 0
    # ~ the linear regression to the mean, C / (C + sigma^2) x
    torch.testing.assert_close(big, 26 / (26 + 1e6) * x[:, 0], rtol=1e-3, atol=1e-9)


def test_mixture_samples_match_its_moments(gmm2d):
    x = gmm2d.sample(200_000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), gmm2d.mean, rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(x.T), gmm2d.cov, rtol=0, atol=0.04)


# ----------------------------------------------------------------------------------- preconditioning wrappers
# Each backbone below is written from the spec's formulas (not from the wrappers' code): it returns the network
# output F that makes the wrapper reproduce the analytic denoiser exactly.


class ExactEDM(nn.Module):
    def __init__(self, den, sd):
        super().__init__()
        self.den, self.sd, self.p = den, sd, nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_in, c_noise):
        s = (4 * c_noise).exp()[:, None]
        x = x_in * (s**2 + self.sd**2).sqrt()
        c_skip, c_out = self.sd**2 / (s**2 + self.sd**2), s * self.sd / (s**2 + self.sd**2).sqrt()
        return (self.den(x, s[:, 0]) - c_skip * x) / c_out


class ExactVE(nn.Module):
    def __init__(self, den):
        super().__init__()
        self.den, self.p = den, nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_in, c_noise):
        s = 2 * c_noise.exp()[:, None]
        return (self.den(x_in, s[:, 0]) - x_in) / s


class ExactEps(nn.Module):
    """F(x_t, t) = eps*: the sigma for t comes from a lookup supplied by the test."""

    def __init__(self, den, sigma_of_t):
        super().__init__()
        self.den, self.sigma_of_t, self.p = den, sigma_of_t, nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x_t, t):
        s = self.sigma_of_t(t)[:, None]
        x = x_t * (1 + s**2).sqrt()
        return (x - self.den(x, s[:, 0])) / s


@pytest.mark.parametrize("which", ["gmm2d", "gauss2d"])
def test_wrappers_recover_the_analytic_denoiser_from_the_exact_backbone(which, request):
    den = request.getfixturevalue(which)
    x = _grid_points(2, len(SIGMAS), seed=6)
    sched = DDPMSchedule()
    t = torch.tensor([1, 3, 40, 200, 500, 800, 1000])
    s_ddpm = sched.sigma[t]
    vp = VPSchedule()
    cases = [
        (EDMPrecond(ExactEDM(den, 0.5), sigma_data=0.5), SIGMAS),
        (VEPrecond(ExactVE(den)), SIGMAS),
        (VPPrecond(ExactEps(den, lambda tt: sched.sigma[tt.round().long()]), sched, discrete=True), s_ddpm),
        (VPPrecond(ExactEps(den, lambda tt: vp.sigma(tt / 999)), vp), SIGMAS),
    ]
    for wrapper, sig in cases:
        torch.testing.assert_close(wrapper(x, sig), den(x, sig), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat(wrapper, x, sig), (x - den(x, sig)) / sig[:, None], rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(score(wrapper, x, sig), den.score(x, sig), rtol=1e-6, atol=1e-8)


def test_wrapper_keeps_the_callers_dtype_around_a_float32_net():
    net = nn.Linear(2, 2)
    d = EDMPrecond(_CondDrop(net))
    x = torch.randn(4, 2, dtype=torch.float64)
    assert d(x, torch.full((4,), 0.5, dtype=torch.float64)).dtype == torch.float64


class _CondDrop(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, c):
        return self.net(x) + c[:, None]


def test_sigma_shape_is_checked(gauss2d):
    with pytest.raises(DifflabError, match="sigma must be a scalar or have shape"):
        gauss2d(torch.zeros(3, 2), torch.ones(4))
