"""The chunked unbiased Gaussian-kernel MMD^2 against brute force, closed forms and its own sweep."""

import math

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.metrics import default_bandwidths, mmd, mmd_sweep, select_bandwidth


def brute_mmd(x, y, b):
    """Full kernel matrices in numpy: the definition, term by term."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)

    def k(u, v):
        sq = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return np.exp(-sq / (2 * b)) / math.sqrt(2 * math.pi * b)

    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    off_xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    off_yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return off_xx + off_yy - 2 * k(x, y).mean()


def gaussian_mmd(shift_sq, b, d):
    """Population MMD^2 of N(0, I_d) and N(mu, I_d), |mu|^2 = shift_sq, with this module's kernel."""
    e_k = (b / (b + 2)) ** (d / 2) / math.sqrt(2 * math.pi * b)  # E k(x, x') for x - x' ~ N(0, 2 I)
    return 2 * e_k * (1 - math.exp(-shift_sq / (2 * (b + 2))))


@pytest.mark.parametrize("d", [1, 2, 5])
def test_matches_brute_force(d):
    rng = np.random.default_rng(d)
    x = 0.3 * rng.standard_normal((50, d))
    y = 0.4 * rng.standard_normal((70, d)) + 0.1
    for b in (0.01, 0.03, 0.3, 3.0):
        expected = brute_mmd(x, y, b)
        assert mmd(x, y, b) == pytest.approx(expected, rel=1e-12, abs=0)


def test_high_dimensional_and_shaped_inputs_are_flattened():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 4, 3, 2))  # d = 24 takes the matrix-product path
    y = 1.1 * rng.standard_normal((40, 4, 3, 2))
    assert mmd(x, y, 5.0) == pytest.approx(brute_mmd(x, y, 5.0), rel=1e-10)
    assert mmd(x, y, 5.0) == mmd(x.reshape(30, -1), y.reshape(40, -1), 5.0)
    line = rng.standard_normal(20)  # 1-D input: points in R^1
    expected = brute_mmd(line[:, None], line[:, None] + 0.5, 0.2)
    assert mmd(line, line + 0.5, 0.2) == pytest.approx(expected, rel=1e-12)


def test_torch_and_numpy_inputs_agree():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 2)), rng.standard_normal((60, 2))
    x32 = torch.from_numpy(x).float()
    assert mmd(torch.from_numpy(x), torch.from_numpy(y)) == mmd(x, y)
    assert mmd(x32, y) == mmd(x32.double().numpy(), y)  # float32 is widened to float64
    assert isinstance(mmd(x, y), float)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunking_does_not_change_the_result(chunk):
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((37, 2)), 0.7 * rng.standard_normal((53, 2))
    bands = [0.01, 0.03, 1.0]
    whole = mmd_sweep(x, y, bands, chunk=10**9)
    np.testing.assert_allclose(mmd_sweep(x, y, bands, chunk=chunk), whole, rtol=1e-13, atol=0)


def test_sweep_equals_mmd_per_bandwidth():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((60, 3)), rng.standard_normal((45, 3)) + 0.3
    bands = np.linspace(0.001, 3, 17)
    curve = mmd_sweep(x, y, bands)
    assert curve.shape == (17,) and curve.dtype == np.float64
    np.testing.assert_allclose(curve, [mmd(x, y, float(b)) for b in bands], rtol=1e-14, atol=0)


def test_same_distribution_small_different_distribution_matches_closed_form():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2))
    shifted = rng.standard_normal((2000, 2)) + 2.0
    # Over 20 seeds at 2000 vs 2000 points and b = 0.03, the estimate had std 3.5e-4 under H0 and
    # 1.4e-3 for the shift; a biased (diagonal-included) estimator would sit 2.3e-3 too high.
    assert abs(mmd(x, y)) < 1.5e-3
    target = gaussian_mmd(8.0, 0.03, 2)  # 0.0586
    assert mmd(x, shifted) == pytest.approx(target, abs=7e-3)
    assert mmd(x, shifted) > 30 * abs(mmd(x, y))


def test_population_value_in_one_dimension():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal(3000), rng.standard_normal(3000) + 1.0
    assert mmd(x, y, 0.5) == pytest.approx(gaussian_mmd(1.0, 0.5, 1), rel=0.08)


def test_select_bandwidth_picks_the_curve_maximum():
    rng = np.random.default_rng(6)
    normal = rng.standard_normal((400, 2))
    centres = np.where(rng.random(400) < 0.5, -2.0, 2.0)[:, None] * np.array([[1.0, 0.0]])
    mixture = centres + 0.4 * rng.standard_normal((400, 2))
    sweep = default_bandwidths()
    np.testing.assert_array_equal(sweep, np.linspace(0.001, 3, 100))
    for data in (normal, mixture):
        best, curve = select_bandwidth(data, seed=0)
        assert curve.shape == (100,)
        assert best in sweep and best == sweep[np.argmax(curve)] and curve.max() == curve[np.argmax(curve)]
        # the reference is N(0, I) of the data's shape from numpy Generator(seed)
        reference = np.random.default_rng(0).standard_normal(data.shape)
        np.testing.assert_allclose(curve, mmd_sweep(data, reference, sweep), rtol=1e-14)
    best_mix, curve_mix = select_bandwidth(mixture, seed=0)
    _, curve_normal = select_bandwidth(normal, seed=0)
    assert curve_mix.max() > 10 * curve_normal.max()
    assert 0.001 < best_mix < 3.0
    best_few, curve_few = select_bandwidth(mixture, seed=3, bandwidths=[0.05, 0.5])
    assert best_few in (0.05, 0.5) and curve_few.shape == (2,)


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "fragment"),
    [
        (np.zeros((5, 2)), np.zeros((5, 3)), {}, "same trailing dimension"),
        (np.zeros((1, 2)), np.zeros((5, 2)), {}, "x has 1 point"),
        (np.zeros((5, 2)), np.zeros((1, 2)), {}, "y has 1 point"),
        (np.zeros((5, 2)), np.array([[0.0, 1.0], [np.nan, 0.0], [1, np.inf]]), {}, "y has 2 row(s) with NaN"),
        (np.array([[np.inf, 0.0]] * 3), np.zeros((5, 2)), {}, "x has 3 row(s) with NaN"),
        (np.array(["a", "b"]), np.zeros((5, 1)), {}, "x has dtype"),
        (np.zeros((5, 2)), np.zeros((5, 2), dtype=complex), {}, "y has dtype"),
        (np.float64(1.0), np.zeros((5, 1)), {}, "x is a scalar"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidth": 0.0}, "bandwidth must be > 0"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidth": -1.0}, "bandwidth must be > 0"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidth": float("nan")}, "bandwidth must be > 0"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"bandwidth": "wide"}, "bandwidth must be a number"),
        (np.zeros((5, 2)), np.zeros((5, 2)), {"chunk": 0}, "chunk must be a positive integer"),
    ],
)
def test_bad_inputs_raise_one_line_difflab_errors(x, y, kwargs, fragment):
    with pytest.raises(DifflabError) as info:
        mmd(x, y, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_bad_bandwidth_sweeps_and_data():
    x = np.zeros((5, 2))
    with pytest.raises(DifflabError, match="empty"):
        mmd_sweep(x, x, [])
    with pytest.raises(DifflabError, match="got -0.5"):
        mmd_sweep(x, x, [0.1, -0.5])
    with pytest.raises(DifflabError, match="must be numbers"):
        mmd_sweep(x, x, ["a"])
    with pytest.raises(DifflabError, match="data has 1 point"):
        select_bandwidth(np.zeros((1, 2)))
    with pytest.raises(DifflabError, match="complex"):
        mmd(torch.zeros(3, 2, dtype=torch.complex64), x)
