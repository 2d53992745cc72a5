import pytest
import torch

from difflab.denoisers import EmpiricalDenoiser
from difflab.diagnostics.target_variance import _posterior_moments, target_variance
from difflab.errors import DifflabError
from difflab.objectives import build_objective
from difflab.objectives.stf import STFLoss, stf_target

F64 = torch.float64


def _points(n, d, seed=0, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("d", [1, 2, 16])
def test_with_the_whole_set_as_references_the_target_is_the_empirical_denoiser(d):
    Y = _points(300, d)
    x = _points(40, d, seed=1) * 1.5
    for s in (0.05, 0.3, 1.0, 5.0):
        sigma = torch.full((40,), s, dtype=F64)
        torch.testing.assert_close(stf_target(x, sigma, Y, own=False), EmpiricalDenoiser(Y)(x, sigma),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_at_tiny_sigma_the_target_is_the_own_point_exactly_without_nan(precision):
    Y = _points(512, 3 * 16 * 16, scale=3.0).float()  # image-sized, float32, large magnitudes
    sigma = torch.full((64,), 0.002)
    x = Y[:64] + sigma[:, None] * torch.randn(64, Y.shape[1])
    T = stf_target(x, sigma, Y, precision=precision)
    assert bool(torch.isfinite(T).all()) and torch.equal(T, Y[:64])


def test_float32_logits_agree_with_float64_where_references_share_the_weight():
    Y = _points(400, 3 * 16 * 16).float()
    x = Y[:32] + 0.5 * torch.randn(32, Y.shape[1])
    for s in (2.0, 20.0, 60.0):
        sigma = torch.full((32,), s)
        torch.testing.assert_close(stf_target(x, sigma, Y, precision="float32"),
                                   stf_target(x, sigma, Y, precision="float64"), rtol=0, atol=2e-3)


def test_chunking_and_shapes():
    Y = _points(200, 12).reshape(200, 3, 2, 2)
    x = Y[:20] + 0.7 * torch.randn(20, 3, 2, 2, dtype=F64)
    sigma = torch.full((20,), 0.7, dtype=F64)
    a = stf_target(x, sigma, Y)
    b = stf_target(x, sigma, Y, chunk_elems=200 * 3)  # three rows at a time
    assert a.shape == x.shape
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(DifflabError, match="must contain the minibatch"):
        stf_target(x, sigma, Y[:10])


def test_target_variance_falls_like_one_over_n_minus_one():
    """64 points in four clusters: isolated at tiny sigma, shared at intermediate sigma, one blob at large sigma."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, -3.0]], dtype=F64)
    data = centres.repeat(16, 1) + 0.3 * torch.randn(64, 2, generator=g, dtype=F64)
    tv = target_variance(data, [0.001, 0.5, 1.0, 2.0, 100.0], ref_sizes=(16, 256), n_x=128, n_draws=32)
    k = int(tv.v_dsm.argmax())
    assert k in (1, 2, 3) and tv.v_dsm[k] > 10 * max(tv.v_dsm[0], tv.v_dsm[4])  # the peak is intermediate
    ratio = tv.v_stf[16][k] / tv.v_stf[256][k]
    assert 255 / 15 / 2 < ratio < 255 / 15 * 2, ratio
    for n in (16, 256):
        assert tv.v_stf[n][k] < tv.v_dsm[k] / 5
    assert tv.bias_stf[256][k] < tv.bias_stf[16][k]  # the bias shrinks as n grows


def test_posterior_moments_are_exact():
    Y = _points(50, 2)
    x = _points(7, 2, seed=3)
    mean, trace = _posterior_moments(x, 0.8, Y)
    w = torch.softmax(-((x[:, None] - Y[None]) ** 2).sum(-1) / (2 * 0.64), dim=1)
    torch.testing.assert_close(mean, w @ Y)
    cov_tr = (w[:, :, None] * (Y[None] - mean[:, None]) ** 2).sum((1, 2))
    torch.testing.assert_close(trace, cov_tr)


@pytest.mark.parametrize("base", ["dsm", "edm", "vp", "ve"])
def test_stf_runs_on_every_base_and_equals_the_base_when_the_set_is_one_point(base):
    x0 = _points(16, 2)
    D = EmpiricalDenoiser(x0)
    obj = build_objective("stf", {"base": base, "reference_size": 64})
    ref = torch.cat([x0, _points(48, 2, seed=5)])
    loss = obj(D, x0, torch.Generator().manual_seed(0), reference=ref)
    assert loss.shape == (16,) and bool(torch.isfinite(loss).all())
    plain = build_objective(base)(D, x0[:1], torch.Generator().manual_seed(0))
    alone = obj(D, x0[:1], torch.Generator().manual_seed(0), reference=x0[:1])  # a single reference: the own point
    torch.testing.assert_close(alone, plain, rtol=1e-9, atol=1e-9)


def test_stf_options_are_checked():
    with pytest.raises(DifflabError, match="STF base must be"):
        build_objective("stf", {"base": "itd"})
    with pytest.raises(DifflabError, match="has no option 'P_meen'"):
        build_objective("stf", {"base": "edm", "P_meen": 1.0})
    obj = build_objective("stf", {"base": "edm", "P_mean": -1.0})
    assert isinstance(obj, STFLoss) and obj.base.P_mean == -1.0
