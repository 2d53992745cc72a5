"""Image data sets: digits, image folders, CIFAR-10 (python and binary, folder and archive), image arrays, the
get_dataset specs, seeded flips, stats, the restricted unpickler and PNG grids."""

import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, features

from difflab.data import get_dataset
from difflab.data.cifar import CIFAR10_CLASSES, load_cifar10
from difflab.data.digits import Digits
from difflab.data.files import ArrayData
from difflab.data.images import IMAGE_SUFFIXES, ImageData, load_image_array, load_image_folder
from difflab.errors import DifflabError
from difflab.plots import save_image_grid


def expect_error(fragments, fn, *args, **kwargs):
    """Call fn, expect a one-line DifflabError whose message holds every fragment."""
    with pytest.raises(DifflabError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for fragment in [fragments] if isinstance(fragments, str) else fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module")
def digits():
    return Digits(), Digits(size=16)


# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_labels(digits):
    d8, d16 = digits
    assert d8.images.shape == (1797, 1, 8, 8) and d16.images.shape == (1797, 1, 16, 16)
    assert d8.shape == (1, 8, 8) and d8.dim == 64 and d16.shape == (1, 16, 16) and d16.dim == 256
    assert d8.name == "digits" and d16.name == "digits16" and len(d8) == 1797
    for d in digits:
        assert d.images.dtype == torch.float64 and float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
        assert d.labels.dtype == torch.int64 and d.labels.shape == (1797,)
        assert torch.equal(torch.unique(d.labels), torch.arange(10))
        assert d.num_classes == 10 and d.class_names == tuple("0123456789")
        assert d.train_data() is d.images and d.eval_data() is d.images
    # 8x8 values are k/8 - 1 for k in 0..16; label counts are scikit-learn's
    assert torch.equal(d8.images * 8 + 1 - (d8.images * 8 + 1).round(), torch.zeros_like(d8.images))
    assert torch.bincount(d8.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # bilinear 2x (align_corners=False): corners copy, pixel (1, 1) is 3/4, 1/4 of pixels 0 and 1 per axis
    a, b = d8.images[5, 0], d16.images[5, 0]
    assert float(b[0, 0]) == float(a[0, 0]) and float(b[15, 15]) == float(a[7, 7])
    w = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert float(b[1, 1]) == pytest.approx(float(w @ a[:2, :2] @ w), abs=1e-12)
    # the draws of the old Digits class: rows by numpy Generator(seed).integers(0, N, n)
    idx = np.random.default_rng(7).integers(0, 1797, 50)
    assert torch.equal(d8.sample(50, 7), d8.images[idx]) and torch.equal(d8.train_data(50, seed=7), d8.images[idx])
    assert torch.equal(d8.eval_data(50), d8.images[np.random.default_rng(1).integers(0, 1797, 50)])
    expect_error("digits size must be 8 or 16", Digits, size=12)


def test_stats_match_direct_computation(digits):
    for d in digits:
        s, x = d.stats(), d.images
        assert s["n"] == 1797 and s["dim"] == d.dim and s["num_classes"] == 10
        assert s["sigma_data"] == pytest.approx(float(x.std(correction=0)), rel=1e-12)
        assert s["mean"] == pytest.approx(float(x.mean()), rel=1e-12)
        assert s["mean_sq_norm"] == pytest.approx(float(x.square().sum((1, 2, 3)).mean()), rel=1e-12)
        assert s["rms"] ** 2 * s["dim"] == pytest.approx(s["mean_sq_norm"], rel=1e-12)
        assert s["channel_std"] == [pytest.approx(s["sigma_data"], rel=1e-12)]
    assert digits[0].stats()["sigma_data"] == pytest.approx(0.7520984, abs=1e-6)
    # a set with known moments: channel 0 is all +1, channel 1 half -1 half +1
    x = torch.ones(4, 2, 3, 3, dtype=torch.float64)
    x[:2, 1] = -1
    s = ImageData(x).stats()
    assert s["channel_mean"] == [1.0, 0.0] and s["channel_std"] == [0.0, 1.0] and s["mean"] == 0.5
    assert s["sigma_data"] == pytest.approx(np.sqrt(0.75)) and s["mean_sq_norm"] == 18.0
    assert s["max_norm"] == pytest.approx(np.sqrt(18)) and s["min"] == -1.0 and s["max"] == 1.0
    x = torch.rand(1500, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    x[:, 2] = x[:, 2] * 0.5 + 0.25  # large images are summed in chunks: same numbers
    s, per_channel = ImageData(x).stats(), x.transpose(0, 1).reshape(3, -1)
    assert s["sigma_data"] == pytest.approx(float(x.std(correction=0)), rel=1e-10)
    assert s["channel_mean"] == pytest.approx(per_channel.mean(1).tolist(), abs=1e-12)
    assert s["channel_std"] == pytest.approx(per_channel.std(1, correction=0).tolist(), rel=1e-10)
    assert s["mean_sq_norm"] == pytest.approx(float(x.square().sum((1, 2, 3)).mean()), rel=1e-12)
    assert s["max_norm"] == pytest.approx(float(x.square().sum((1, 2, 3)).max().sqrt()), rel=1e-12)


# --------------------------------------------------------------------------------------------- flips


def coded_set(n=10, flip=True):
    """Image i (1, 1, 2) is [c, -c] with c = (i + 1) / 20: its row and whether it was flipped can be read back."""
    c = torch.arange(1, n + 1, dtype=torch.float64) / 20
    return ImageData(torch.stack([c, -c], 1)[:, None, None, :], labels=torch.arange(n) % 3, flip=flip)


def decode(batch):
    left = batch[:, 0, 0, 0]
    return (left.abs() * 20).round().long() - 1, left < 0


def test_flips_are_seeded_and_about_half():
    ds = coded_set()
    a, b, c = ds.sample(4000, seed=5), ds.sample(4000, seed=5), ds.sample(4000, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ds.sample(30, seed=5), a[:30])  # one draw per example: prefixes agree
    rows, flipped = decode(a)
    assert 0.46 < flipped.double().mean() < 0.54
    assert torch.bincount(rows, minlength=10).min() > 300  # every row drawn, about 400 each
    j = np.random.default_rng(5).integers(0, 20, 4000)  # the documented scheme: row j % N, flip j >= N
    assert torch.equal(rows, torch.from_numpy(j % 10)) and torch.equal(flipped, torch.from_numpy(j >= 10))
    images, labels = ds.sample_with_labels(4000, seed=5)
    assert torch.equal(images, a) and torch.equal(labels, rows % 3)
    # eval draws never flip; train_data() flips each image once in order, train_data(n) is sample(n)
    assert not bool(decode(ds.eval_data(500))[1].any())
    rows, flipped = decode(ds.train_data())
    assert torch.equal(rows, torch.arange(10)) and 0 < int(flipped.sum()) < 10
    assert torch.equal(ds.train_data(), ds.train_data()) and torch.equal(ds.train_data(100, seed=5), a[:100])
    plain = coded_set(flip=False)
    assert not bool(decode(plain.sample(500, 0))[1].any()) and plain.train_data() is plain.images
    expect_error("positive integer", ds.sample, 0, 1)


def test_flipped_digits_are_mirror_images(digits):
    d = Digits(size=16, flip=True)
    x = d.sample(400, seed=3)
    j = np.random.default_rng(3).integers(0, 2 * 1797, 400)
    src = digits[1].images[j % 1797]
    flip = torch.from_numpy(j >= 1797)
    assert torch.equal(x[flip], src[flip].flip(-1)) and torch.equal(x[~flip], src[~flip])
    assert 150 < int(flip.sum()) < 250


# --------------------------------------------------------------------------------------------- image folders


def write(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, **kwargs)


def solid(h, w, rgb):
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (h, w, 3)).copy()


def test_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 256, (3, 4, 3)), rng.integers(0, 256, (3, 4, 3))
    write(tmp_path / "dogs" / "z.png", b)
    write(tmp_path / "cats" / "b.png", a)
    write(tmp_path / "cats" / "a.jpg", solid(3, 4, (200, 40, 90)), quality=100)
    (tmp_path / "cats" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (3, 3, 3, 4) and ds.shape == (3, 3, 4) and ds.dim == 36
    assert ds.class_names == ("cats", "dogs") and ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(ds.images[1].numpy(), a.transpose(2, 0, 1) / 127.5 - 1)  # cats/b.png
    np.testing.assert_array_equal(ds.images[2].numpy(), b.transpose(2, 0, 1) / 127.5 - 1)  # dogs/z.png
    jpeg = ds.images[0].numpy()  # cats/a.jpg: a solid colour survives JPEG within a few levels
    np.testing.assert_allclose(jpeg, (np.array([200, 40, 90]) / 127.5 - 1)[:, None, None] + 0 * jpeg, atol=4 / 127.5)
    assert ds.name == tmp_path.name and float(ds.images.min()) >= -1 and float(ds.images.max()) <= 1
    _, labels = ds.sample_with_labels(5, seed=0)
    assert torch.equal(labels, ds.labels[np.random.default_rng(0).integers(0, 3, 5)])


def test_folder_greyscale_rgb_and_unlabelled(tmp_path):
    g1, g2 = np.arange(12).reshape(3, 4) * 20, np.full((3, 4), 7)
    write(tmp_path / "grey" / "g1.png", g1)
    write(tmp_path / "grey" / "sub" / "g2.bmp", g2)
    ds = load_image_folder(tmp_path / "grey")  # g1 sits at the top level: unlabelled
    assert ds.images.shape == (2, 1, 3, 4) and ds.labels is None and ds.num_classes == 0 and ds.class_names == ()
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), g1 / 127.5 - 1)
    np.testing.assert_array_equal(ds.images[1, 0].numpy(), g2 / 127.5 - 1)
    assert ds.sample_with_labels(3, 0)[1] is None
    write(tmp_path / "grey" / "zz.png", solid(3, 4, (10, 20, 30)))  # one RGB file: every image becomes RGB
    ds = load_image_folder(tmp_path / "grey")
    assert ds.images.shape == (3, 3, 3, 4)
    np.testing.assert_array_equal(ds.images[0].numpy(), np.stack([g1] * 3) / 127.5 - 1)
    np.testing.assert_array_equal(ds.images[2, :, 0, 0].numpy(), np.array([10, 20, 30]) / 127.5 - 1)
    wide = np.array([[0, 257 * 100], [65535, 257 * 7 + 100]], dtype=np.uint16)  # 16-bit greyscale -> 8 bits
    write16 = tmp_path / "deep" / "a.png"
    write16.parent.mkdir()
    Image.fromarray(wide).save(write16)
    assert load_image_folder(tmp_path / "deep").images[0, 0].tolist() == [[-1.0, 100 / 127.5 - 1], [1.0, 7 / 127.5 - 1]]
    if ".webp" in IMAGE_SUFFIXES and features.check("webp"):
        write(tmp_path / "webp" / "a.webp", solid(2, 3, (9, 99, 199)), lossless=True)
        np.testing.assert_array_equal(load_image_folder(tmp_path / "webp").images[0, :, 1, 2].numpy(),
                                      np.array([9, 99, 199]) / 127.5 - 1)
    write(tmp_path / "rgba" / "a.png", np.dstack([solid(2, 2, (1, 2, 3)), np.zeros((2, 2))]))  # alpha dropped
    rgba = load_image_folder(tmp_path / "rgba").images
    assert rgba.shape == (1, 3, 2, 2) and rgba[0, :, 1, 1].tolist() == (np.array([1, 2, 3]) / 127.5 - 1).tolist()


def test_folder_resize_and_center_crop(tmp_path):
    wide = np.tile(np.arange(6, dtype=np.uint8) * 40, (4, 1))  # (4, 6): columns 0, 40, ..., 200
    write(tmp_path / "a" / "wide.png", wide)
    write(tmp_path / "a" / "tall.png", np.full((9, 5), 100))  # a different size: fine once resized
    ds = load_image_folder(tmp_path / "a", size=4)
    assert ds.images.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(ds.images[1, 0].numpy(), np.tile(wide[0, 1:5], (4, 1)) / 127.5 - 1)  # crop only
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), np.full((4, 4), 100 / 127.5 - 1))  # solid stays solid
    small = load_image_folder(tmp_path / "a", size=2, flip=True)
    assert small.images.shape == (2, 1, 2, 2) and small.flip
    left, right = small.images[1, 0, 0].tolist()  # the crop's left half is darker after downsampling
    assert left < right
    ds = get_dataset(f"folder:{tmp_path / 'a'}?size=3&flip=1")
    assert ds.images.shape == (2, 1, 3, 3) and ds.flip


def test_folder_errors(tmp_path):
    write(tmp_path / "mixed" / "a.png", np.zeros((3, 4)))
    write(tmp_path / "mixed" / "b.png", np.zeros((3, 5)))
    expect_error(["differ in size", "a.png is 4x3", "b.png is 5x3", "size=32"], load_image_folder,
                 tmp_path / "mixed")
    assert load_image_folder(tmp_path / "mixed", size=3).images.shape == (2, 1, 3, 3)
    (tmp_path / "empty").mkdir()
    expect_error(["no images found", "empty"], load_image_folder, tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("hi")
    expect_error("no images found", load_image_folder, tmp_path / "text")
    expect_error("no such folder", load_image_folder, tmp_path / "missing")
    expect_error("is a file, not a folder", load_image_folder, tmp_path / "mixed" / "a.png")
    write(tmp_path / "bad" / "ok.png", np.zeros((3, 4)))
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    expect_error(["broken.png", "corrupt"], load_image_folder, tmp_path / "bad")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "bad" / "broken.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine
    expect_error(["broken.png", "corrupt"], load_image_folder, tmp_path / "bad", size=3)
    expect_error("image size must be an integer", load_image_folder, tmp_path / "mixed", size=0)


# --------------------------------------------------------------------------------------------- CIFAR-10


def fake_cifar(n_per_batch=2, n_test=3, seed=0):
    """Batches as CIFAR-10 has them: name -> (uint8 (n, 3072) CHW rows, labels)."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: (rng.integers(0, 256, (n_test if name == "test_batch" else n_per_batch, 3072), dtype=np.uint8),
                   rng.integers(0, 10, n_test if name == "test_batch" else n_per_batch).tolist()) for name in names}


def write_cifar_python(root, batches):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        d = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES]}, 2))
    (folder / "readme.html").write_text("<html></html>")
    return folder


def write_cifar_binary(root, batches):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], data], 1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n")
    return folder


def tar_gz(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


def expected(batches, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    data = np.concatenate([batches[n][0] for n in names]).reshape(-1, 3, 32, 32)
    return data / 127.5 - 1, sum((batches[n][1] for n in names), [])


@pytest.mark.parametrize("version", ["python", "binary"])
def test_cifar10_folder_and_archive_round_trip(tmp_path, version):
    batches = fake_cifar()
    folder = (write_cifar_python if version == "python" else write_cifar_binary)(tmp_path / "x", batches)
    archive = tar_gz(folder, tmp_path / f"cifar-10-{version}.tar.gz")
    for source in (folder, archive, folder.parent):
        for split, n in (("train", 10), ("test", 3)):
            ds = load_cifar10(source, split=split)
            x, y = expected(batches, split)
            assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.float64
            np.testing.assert_array_equal(ds.images.numpy(), x)
            assert ds.labels.tolist() == y and ds.class_names == CIFAR10_CLASSES and ds.num_classes == 10
            assert ds.name == ("cifar10" if split == "train" else "cifar10-test")
    ds = get_dataset(f"cifar10-test:{archive}?flip=1")
    assert ds.flip and ds.name == "cifar10-test" and len(ds) == 3
    assert torch.equal(get_dataset(f"cifar10:{folder}").images, load_cifar10(folder).images)


def python2_pickle(data, labels):
    """The bytes Python 2's cPickle.dump(d, f, 2) writes for {'data': uint8 array, 'labels': small ints}: str
    keys and buffers as BINSTRINGs, the array rebuilt by numpy.core.multiarray._reconstruct as numpy 1.x did."""
    def s(b):
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def k(i):
        return b"K" + bytes([i])

    n, m = data.shape
    out = b"\x80\x02}(" + s(b"data")
    out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + k(0) + b"\x85" + s(b"b") + b"\x87R"
    out += b"(" + k(1) + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", m) + b"\x86"
    out += b"cnumpy\ndtype\n" + s(b"u1") + k(0) + k(1) + b"\x87R"
    out += b"(" + k(3) + s(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + k(0) + b"tb"
    out += b"\x89" + s(data.tobytes()) + b"tb"
    out += s(b"labels") + b"](" + b"".join(k(v) for v in labels) + b"eu."
    return out


def test_cifar10_reads_python2_pickles(tmp_path):
    batches = fake_cifar(n_test=4, seed=1)
    folder = write_cifar_python(tmp_path, batches)
    data, labels = batches["test_batch"]
    (folder / "test_batch").write_bytes(python2_pickle(data, labels))
    ds = load_cifar10(folder, split="test")
    np.testing.assert_array_equal(ds.images.numpy(), data.reshape(-1, 3, 32, 32) / 127.5 - 1)
    assert ds.labels.tolist() == labels


def sentinel_command(path):
    return f"touch {path}"


class Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class EvalEvil:
    def __reduce__(self):
        return eval, ("1 + 1",)


def test_cifar10_refuses_malicious_pickles(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    folder = write_cifar_python(tmp_path / "c", fake_cifar())
    payloads = {
        "bare": pickle.dumps(Evil(sentinel_command(sentinel)), protocol=2),
        "nested": pickle.dumps({b"data": Evil(sentinel_command(sentinel)), b"labels": [0]}, protocol=2),
        "protocol 4": pickle.dumps([1, 2, Evil(sentinel_command(sentinel))], protocol=4),
        "eval": pickle.dumps({b"labels": EvalEvil()}, protocol=2),
    }
    for what, payload in payloads.items():
        (folder / "test_batch").write_bytes(payload)
        msg = expect_error(["test_batch", "refused to unpickle", "never runs code"], load_cifar10, folder, "test")
        assert ("system" in msg) if what != "eval" else ("eval" in msg)
        assert not sentinel.exists(), what
    archive = tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    expect_error("refused to unpickle", load_cifar10, archive, "test")
    assert not sentinel.exists()
    # an object array is not a plain numeric array: refused too
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.array([1, "a"], dtype=object), b"labels": []}, 2))
    expect_error(["refused to unpickle numpy.dtype('O8')", "not a plain numeric type"], load_cifar10, folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, 2))
    expect_error("not a uint8 array of shape (n, 3072)", load_cifar10, folder, "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, 2))
    expect_error("has label 10", load_cifar10, folder, "test")
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(U\x04data")  # truncated
    expect_error(["cannot read", "test_batch"], load_cifar10, folder, "test")


def test_cifar10_layout_errors(tmp_path):
    batches = fake_cifar()
    py = write_cifar_python(tmp_path / "p", batches)
    (py / "data_batch_3").unlink()
    expect_error(["not a CIFAR-10 folder", "missing data_batch_3"], load_cifar10, py)
    assert len(load_cifar10(py, split="test")) == 3  # the test split does not need data_batch_3
    archive = tar_gz(py, tmp_path / "cifar-10-python.tar.gz")
    expect_error(["not a CIFAR-10 archive", "data_batch_3"], load_cifar10, archive)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    expect_error(["not a CIFAR-10 archive", "data_batch_1.bin"], load_cifar10, tar_gz(other, tmp_path / "o.tar.gz"))
    expect_error("not a CIFAR-10 folder", load_cifar10, other)
    (tmp_path / "junk.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    expect_error("neither a CIFAR-10 folder nor a readable tar archive", load_cifar10, tmp_path / "junk.tar.gz")
    expect_error("no such folder or file", load_cifar10, tmp_path / "nowhere")
    expect_error("split must be 'train' or 'test'", load_cifar10, py, split="val")
    binary = write_cifar_binary(tmp_path / "b", batches)
    (binary / "test_batch.bin").write_bytes((binary / "test_batch.bin").read_bytes()[:-1])
    expect_error(["test_batch.bin", "3073-byte"], load_cifar10, binary, "test")
    # the folder loader points a CIFAR folder given as a folder of images at the cifar10: prefix
    expect_error("use cifar10:", get_dataset, str(binary))


# --------------------------------------------------------------------------------------------- image arrays


def test_image_arrays_in_every_layout(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (5, 3, 5, 6), dtype=np.uint8)
    want = nchw / 127.5 - 1
    np.savez(tmp_path / "chw.npz", images=nchw, labels=np.array([0, 1, 2, 1, 0]))
    np.savez(tmp_path / "hwc.npz", x=nchw.transpose(0, 2, 3, 1), y=np.arange(5, dtype=np.int32))
    np.save(tmp_path / "hw.npy", nchw[:, 0])
    np.save(tmp_path / "float.npy", want.astype(np.float32))
    np.save(tmp_path / "ints.npy", nchw.astype(np.int64))
    np.savez(tmp_path / "only.npz", whatever=nchw[:, :1].transpose(0, 2, 3, 1))
    a = load_image_array(tmp_path / "chw.npz")
    np.testing.assert_array_equal(a.images.numpy(), want)
    assert a.labels.tolist() == [0, 1, 2, 1, 0] and a.num_classes == 3 and a.name == "chw"
    b = load_image_array(tmp_path / "hwc.npz", flip=True)
    np.testing.assert_array_equal(b.images.numpy(), want)
    assert b.labels.tolist() == [0, 1, 2, 3, 4] and b.flip
    c = load_image_array(tmp_path / "hw.npy")
    np.testing.assert_array_equal(c.images.numpy(), want[:, :1])
    assert c.labels is None and c.num_classes == 0
    np.testing.assert_array_equal(load_image_array(tmp_path / "float.npy").images.numpy(), want.astype(np.float32))
    np.testing.assert_array_equal(load_image_array(tmp_path / "ints.npy").images.numpy(), want)
    np.testing.assert_array_equal(load_image_array(tmp_path / "only.npz").images.numpy(), want[:, :1])
    # prefix images: gives ImageData; the bare path stays with ArrayData, values untouched
    assert isinstance(get_dataset(f"images:{tmp_path / 'hwc.npz'}?flip=1"), ImageData)
    plain = get_dataset(str(tmp_path / "hw.npy"))
    assert type(plain) is ArrayData and torch.equal(plain.array, torch.from_numpy(nchw[:, 0].astype(np.float64)))


def test_image_array_errors(tmp_path):
    def save(name, **arrays):
        np.savez(tmp_path / name, **arrays) if name.endswith(".npz") else np.save(tmp_path / name, arrays["a"])
        return tmp_path / name

    wide = np.zeros((2, 1, 4, 4))
    expect_error(["big.npy", "floats from 255 to 255", "scale them to [-1, 1]"], load_image_array,
                 save("big.npy", a=wide + [255]))
    nan = np.zeros((3, 1, 2, 2))
    nan[2, 0, 1, 1] = np.nan
    expect_error(["nan.npy", "1 of 3 images contain NaN", "image 2"], load_image_array, save("nan.npy", a=nan))
    expect_error(["ints.npy", "integers from -1 to 3"], load_image_array,
                 save("ints.npy", a=np.full((2, 4, 4), -1) + [0, 0, 0, 4]))
    expect_error(["cube.npy", "cannot tell the channel axis"], load_image_array,
                 save("cube.npy", a=np.zeros((2, 5, 5, 5))))
    expect_error(["flat.npy", "image arrays have shape"], load_image_array, save("flat.npy", a=np.zeros((4, 6))))
    expect_error(["lab.npz", "labels of shape (3,)"], load_image_array,
                 save("lab.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.arange(3)))
    expect_error(["two.npz", "none is named"], load_image_array, save("two.npz", a=np.zeros((2, 4, 4)), b=np.zeros(2)))
    expect_error(["obj.npy", "never unpickles"], load_image_array, save("obj.npy", a=np.array([None, 1])))
    expect_error("no such folder or file", load_image_array, tmp_path / "missing.npy")
    (tmp_path / "x.csv").write_text("1,2\n")
    expect_error("unsupported file extension '.csv'", load_image_array, tmp_path / "x.csv")
    (tmp_path / "fake.npy").write_bytes(b"hello world")
    expect_error(["fake.npy", "not a numpy file"], load_image_array, tmp_path / "fake.npy")


# --------------------------------------------------------------------------------------------- get_dataset


def test_get_dataset_dispatch_and_options(tmp_path, digits):
    write(tmp_path / "imgs" / "k" / "a.png", np.zeros((5, 5)))
    write(tmp_path / "imgs" / "k" / "b.png", np.full((5, 5), 255))
    d = get_dataset("digits")
    assert isinstance(d, Digits) and d.shape == (1, 8, 8) and not d.flip
    assert get_dataset("digits16?flip=1").shape == (1, 16, 16) and get_dataset("digits16?flip=true").flip
    assert not get_dataset("digits16?flip=0").flip
    f = get_dataset(f"folder:{tmp_path / 'imgs'}")
    assert f.images.shape == (2, 1, 5, 5) and f.class_names == ("k",) and f.labels.tolist() == [0, 0]
    g = get_dataset(str(tmp_path / "imgs") + "?size=2")  # a bare directory is a folder of images
    assert g.images.shape == (2, 1, 2, 2) and g.images[1].tolist() == [[[1.0, 1.0], [1.0, 1.0]]]
    spec = f"folder:{tmp_path / 'imgs'}"
    expect_error(["unknown option 'flp'", "did you mean 'flip'"], get_dataset, spec + "?flp=1")
    expect_error(["unknown option 'size'", "takes flip"], get_dataset, "digits16?size=8")
    expect_error(["unknown option 'size'", "takes flip"], get_dataset, f"cifar10:{tmp_path}?size=8")
    expect_error("must be 1 or 0", get_dataset, spec + "?flip=2")
    expect_error("integer from 1 to 4096", get_dataset, spec + "?size=0")
    expect_error("integer from 1 to 4096", get_dataset, spec + "?size=big")
    expect_error("given twice", get_dataset, spec + "?flip=1&flip=0")
    expect_error("needs a value", get_dataset, spec + "?flip")
    expect_error("empty option", get_dataset, spec + "?size=2&")
    expect_error("names no path", get_dataset, "folder:")
    expect_error("'dino' takes no options", get_dataset, "dino?flip=1")
    expect_error("did you mean 'cifar10:'", get_dataset, "cifar:/data/cifar")
    expect_error("did you mean 'images:'", get_dataset, "image:/data/a.npz")
    expect_error("no such folder or file", get_dataset, f"folder:{tmp_path / 'nothing'}")
    expect_error("no such folder or file", get_dataset, f"images:{tmp_path / 'nothing.npz'}")
    msg = expect_error(["did you mean 'digits'", "digits16", "folder:PATH", "cifar10:PATH"], get_dataset, "digit")
    assert "images:PATH" in msg and "moons" in msg
    expect_error("did you mean 'digits16'", get_dataset, "digits61")
    expect_error("no such file", get_dataset, "data/none.npy")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"x")
    expect_error("cifar10:", get_dataset, str(tmp_path / "cifar-10-python.tar.gz"))


# --------------------------------------------------------------------------------------------- grids


def test_save_image_grid_sizes_pixels_and_atomicity(tmp_path):
    x = torch.zeros(5, 1, 8, 8, dtype=torch.float64)
    x[0], x[1], x[4] = 3.0, -1.0, 0.5  # 3.0 is clamped to white
    out = save_image_grid(x, tmp_path / "grids" / "g.png")
    im = Image.open(out)
    assert im.mode == "L" and im.size == (3 * 32 + 2, 2 * 32 + 1)  # 3 per row, 8 px x 4, 1-px gaps
    a = np.asarray(im)
    assert (a[:32, :32] == 255).all() and (a[:32, 33:65] == 0).all() and (a[:32, 66:98] == 128).all()
    assert (a[:, 32] == 255).all() and (a[32, :] == 255).all()  # the gaps
    assert (a[33:, 33:65] == round(1.5 * 127.5)).all() and (a[33:, 66:] == 255).all()  # image 4, empty tile
    assert sorted(p.name for p in out.parent.iterdir()) == ["g.png"]  # no temporary left behind
    rgb = np.random.default_rng(0).uniform(-1, 1, (3, 3, 40, 20))
    im = Image.open(save_image_grid(rgb, tmp_path / "rgb.png", nrow=3))
    assert im.mode == "RGB" and im.size == (3 * 40 + 2, 80)  # 20 px wide tiles doubled to 40
    np.testing.assert_array_equal(np.asarray(im)[:2, :2], np.round((rgb[0, :, 0, 0] + 1) * 127.5)[None, None]
                                  .repeat(2, 0).repeat(2, 1))
    assert Image.open(save_image_grid(x[:1, :, :, :], tmp_path / "one.png", min_tile=8)).size == (8, 8)
    bad = x.clone()
    bad[2, 0, 0, 0] = float("nan")
    expect_error("1 of 5 images", save_image_grid, bad, tmp_path / "nan.png")
    assert not (tmp_path / "nan.png").exists()
    expect_error("must end in .png", save_image_grid, x, tmp_path / "g.jpg")
    expect_error("shape (N, C, H, W)", save_image_grid, x[:, 0], tmp_path / "g2.png")
    expect_error("nrow must be a positive integer", save_image_grid, x, tmp_path / "g3.png", nrow=0)


def test_written_files_get_the_usual_mode(tmp_path):
    """Grids and stats files are written atomically through a temporary file, yet readable like any new file."""
    from difflab.metrics.stats_files import save_stats

    umask = os.umask(0o022)
    try:
        grid = save_image_grid(torch.zeros(4, 1, 8, 8), tmp_path / "g.png")
        stats = save_stats(tmp_path / "s.npz", np.zeros(3), np.eye(3))
    finally:
        os.umask(umask)
    assert (grid.stat().st_mode & 0o777) == 0o644 and (stats.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "s.npz"]  # no temporary file left
