"""User data files: .npy / .npz / .csv round trips, one-line errors, no unpickling, ArrayData sampling."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib import format as npy_format

from difflab.data.files import ArrayData, load_array, load_file_data
from difflab.errors import DifflabError


def _unpickled(marker):
    """Runs only if someone unpickles an Evil object: leaves a marker file behind."""
    Path(marker).write_text("unpickled")
    return 0


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _unpickled, (self.marker,)


def expect_error(path, fragment):
    with pytest.raises(DifflabError) as info:
        load_array(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    return message


# --- round trips -----------------------------------------------------------------------------------------


def test_npy_round_trip_and_shapes(tmp_path):
    a = np.random.default_rng(0).standard_normal((7, 3))
    np.save(tmp_path / "a.npy", a)
    out = load_array(tmp_path / "a.npy")
    assert out.dtype == torch.float64 and out.shape == (7, 3)
    np.testing.assert_array_equal(out.numpy(), a)
    np.save(tmp_path / "line.npy", np.arange(5, dtype=np.int32))  # 1-D -> (N, 1), ints -> float64
    np.testing.assert_array_equal(load_array(str(tmp_path / "line.npy")).numpy(), np.arange(5.0)[:, None])
    images = np.random.default_rng(1).random((4, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "img.npy", images)
    out = load_array(tmp_path / "img.npy")
    assert out.shape == (4, 3, 2, 2) and out.dtype == torch.float64
    np.testing.assert_array_equal(out.numpy(), images.astype(np.float64))
    np.save(tmp_path / "big_endian.npy", a.astype(">f8"))
    np.testing.assert_array_equal(load_array(tmp_path / "big_endian.npy").numpy(), a)


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"data": [[1.0]], "samples": [[2.0]], "x": [[3.0]]}, 1.0),
        ({"samples": [[2.0]], "x": [[3.0]], "other": [[4.0]]}, 2.0),
        ({"x": [[3.0]], "other": [[4.0]]}, 3.0),
        ({"whatever": [[4.0]]}, 4.0),
    ],
)
def test_npz_key_choice(tmp_path, arrays, expected):
    np.savez(tmp_path / "a.npz", **{k: np.array(v) for k, v in arrays.items()})
    assert load_array(tmp_path / "a.npz").tolist() == [[expected]]


def test_npz_compressed_and_one_dimensional(tmp_path):
    np.savez_compressed(tmp_path / "c.npz", samples=np.arange(4.0))
    assert load_array(tmp_path / "c.npz").tolist() == [[0.0], [1.0], [2.0], [3.0]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x,y\n1,2\n3.5,-4e-1\n", [[1, 2], [3.5, -0.4]]),
        ("1,2\n3.5,-4e-1\n", [[1, 2], [3.5, -0.4]]),
        ('"x","y"\r\n1,2\r\n', [[1, 2]]),
        ("\ufeffvalue\n1\n2\n3\n", [[1], [2], [3]]),
        ("5\n6\n", [[5], [6]]),
        ("# made by hand\n\nx, y\n1, 2  # first\n\n3, 4\n", [[1, 2], [3, 4]]),
        ("1,2,3\n", [[1, 2, 3]]),
    ],
)
def test_csv_with_and_without_header(tmp_path, text, expected):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode())
    out = load_array(path)
    assert out.dtype == torch.float64
    assert out.tolist() == expected


def test_dino_csv_shipped_with_the_package_loads():
    out = load_array(Path(__file__).parents[1] / "src/difflab/data/datasaurus_dino.csv")
    assert out.shape == (142, 2) and out[0].tolist() == [55.3846, 97.1795]


# --- errors ----------------------------------------------------------------------------------------------


def test_path_errors(tmp_path):
    message = expect_error(tmp_path / "nope.npy", "no such file: ")
    assert "(give a path to a .npy, .npz or .csv file, or a built-in data set name)" in message
    (tmp_path / "folder.npy").mkdir()
    expect_error(tmp_path / "folder.npy", "is a directory")
    (tmp_path / "a.txt").write_text("1,2\n")
    expect_error(tmp_path / "a.txt", "unsupported file extension '.txt'")
    (tmp_path / "noext").write_text("1,2\n")
    expect_error(tmp_path / "noext", "unsupported file extension '(none)'")
    expect_error(12, "data path must be a string or a path")


def test_corrupt_files(tmp_path):
    (tmp_path / "text.npy").write_text("1,2\n3,4\n")
    expect_error(tmp_path / "text.npy", "is not a numpy file")
    (tmp_path / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    expect_error(tmp_path / "cut.npy", "the file looks corrupt")
    np.save(tmp_path / "short.npy", np.zeros((100, 2)))
    (tmp_path / "short.npy").write_bytes((tmp_path / "short.npy").read_bytes()[:200])
    expect_error(tmp_path / "short.npy", "cannot read")
    with open(tmp_path / "huge.npy", "wb") as f:  # a header that claims 80 TB of data
        npy_format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**13,)})
        f.write(b"\0" * 64)
    expect_error(tmp_path / "huge.npy", "cannot read")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    expect_error(tmp_path / "bad.npz", "the file looks corrupt")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x81")
    expect_error(tmp_path / "binary.csv", "is not a UTF-8 text file")


def test_npz_key_errors(tmp_path):
    np.savez(tmp_path / "many.npz", a=np.ones(3), b=np.ones(3))
    message = expect_error(tmp_path / "many.npz", "holds arrays ['a', 'b'] but none is named 'data'")
    assert "'samples' or 'x'" in message
    np.savez(tmp_path / "none.npz")
    expect_error(tmp_path / "none.npz", "holds no arrays")


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.zeros((0, 3)), "holds no examples"),
        (np.zeros(0), "holds no examples"),
        (np.zeros((3, 0)), "without values"),
        (np.float64(2.0), "holds a single number"),
        (np.array(["a", "b"]), "holds string values"),
        (np.array([1 + 2j, 3]), "holds complex values"),
        (np.array([[True, False]]), "holds boolean values"),
        (np.zeros(3, dtype=[("a", "f8"), ("b", "i4")]), "holds structured (record) values"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "holds datetime values"),
    ],
)
def test_bad_arrays(tmp_path, array, fragment):
    np.save(tmp_path / "a.npy", array)
    expect_error(tmp_path / "a.npy", fragment)
    np.savez(tmp_path / "a.npz", data=array)
    expect_error(tmp_path / "a.npz", fragment)


def test_non_finite_rows_are_counted(tmp_path):
    a = np.zeros((10, 2))
    a[3, 1], a[7, 0], a[7, 1] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "a.npy", a)
    expect_error(tmp_path / "a.npy", "2 of 10 rows contain NaN or inf (first: row 3")
    (tmp_path / "a.csv").write_text("x,y\n1,2\n3,nan\n4,inf\n")
    expect_error(tmp_path / "a.csv", "2 of 3 rows contain NaN or inf (first: row 1")
    np.save(tmp_path / "over.npy", np.array([1e300], dtype=np.longdouble) ** 2)  # inf once in float64
    expect_error(tmp_path / "over.npy", "1 of 1 rows contain NaN or inf")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("x,y\n", "holds no examples"),
        ("", "holds no examples"),
        ("x,y\n1,2\n3\n", "line 3 has 1 values but the lines above have 2"),
        ("x,y\n1,2\n3,abc\n", "line 3: cannot read 'abc' as a number"),
        ("x,y\nu,v\n1,2\n", "line 2: cannot read 'u' as a number"),
        ("1,,2\n", "line 1: cannot read '' as a number"),
    ],
)
def test_bad_csv(tmp_path, text, fragment):
    (tmp_path / "a.csv").write_text(text)
    message = expect_error(tmp_path / "a.csv", fragment)
    assert str(tmp_path / "a.csv") in message


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_object_arrays_are_refused_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "marker"
    objects = np.array([Evil(str(marker)), 1], dtype=object)
    path = tmp_path / f"evil{suffix}"
    if suffix == ".npy":
        np.save(path, objects, allow_pickle=True)
    else:
        np.savez(path, data=objects)
    if suffix == ".npy":
        unsafe = np.load(path, allow_pickle=True)
    else:
        with np.load(path, allow_pickle=True) as archive:
            unsafe = archive["data"]
    assert unsafe[1] == 1 and marker.exists()  # the payload does work...
    marker.unlink()
    expect_error(path, "holds an object array (pickled Python objects), which difflab never unpickles")
    assert not marker.exists()  # ...but load_array never ran it


CSV_CHARS = "0123456789.,-+e\n\r #nainfx\"'"
PREFIXES = [b"", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"PK\x03\x04", b"PK\x05\x06", b"x,y\n", b"1,2\n"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    suffix=st.sampled_from([".npy", ".npz", ".csv"]),
    prefix=st.sampled_from(PREFIXES),
    body=st.one_of(st.binary(max_size=300), st.text(CSV_CHARS, max_size=80).map(str.encode)),
)
def test_random_bytes_give_an_array_or_a_difflab_error(suffix, prefix, body):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"f{suffix}"
        path.write_bytes(prefix + body)
        try:
            out = load_array(path)
        except DifflabError as e:
            assert "\n" not in str(e)
            return
    assert out.dtype == torch.float64 and out.dim() >= 2 and out.shape[0] >= 1 and out.numel() >= 1
    assert bool(torch.isfinite(out).all())


def test_random_valid_npy_headers_with_junk_data():
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.npy"
        for _ in range(50):
            shape = tuple(int(s) for s in rng.integers(0, 5, size=rng.integers(0, 4)))
            descr = str(rng.choice(["<f8", "<i4", "|b1", "<c16", "|O", "<U3", ">f4"]))
            with open(path, "wb") as f:
                npy_format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
                f.write(rng.bytes(int(rng.integers(0, 200))))
            try:
                out = load_array(path)
            except DifflabError:
                continue
            assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())


# --- ArrayData ---------------------------------------------------------------------------------------------


def test_array_data_attributes_and_sampling():
    a = torch.arange(30, dtype=torch.float64).reshape(5, 3, 2)
    ds = ArrayData(a, name="toy")
    assert (ds.name, ds.shape, ds.dim, len(ds)) == ("toy", (3, 2), 6, 5)
    s = ds.sample(12, seed=3)  # more rows than the array: drawn with replacement
    assert s.shape == (12, 3, 2) and s.dtype == torch.float64
    idx = np.random.default_rng(3).integers(0, 5, size=12)
    assert torch.equal(s, a[torch.from_numpy(idx)])
    assert torch.equal(ds.sample(12, seed=3), s) and not torch.equal(ds.sample(12, seed=4), s)
    assert torch.equal(ds.train_data(), a) and torch.equal(ds.eval_data(), a)
    assert torch.equal(ds.train_data(7), ds.sample(7, 42)) and torch.equal(ds.eval_data(7), ds.sample(7, 1))
    assert torch.equal(ds.train_data(4, seed=9), ds.sample(4, 9))
    assert ds.sample(np.int64(2), 0).shape == (2, 3, 2)


def test_array_data_errors():
    ds = ArrayData(np.zeros((4, 2)))
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(DifflabError, match="positive integer"):
            ds.sample(bad, 0)
    with pytest.raises(DifflabError, match="shape"):
        ArrayData(np.zeros(4))
    with pytest.raises(DifflabError, match="empty"):
        ArrayData(np.zeros((0, 2)))


def test_load_file_data(tmp_path):
    (tmp_path / "my_points.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    ds = load_file_data(str(tmp_path / "my_points.csv"))
    assert isinstance(ds, ArrayData)
    assert (ds.name, ds.shape, ds.dim) == ("my_points", (2,), 2)
    assert ds.train_data().tolist() == [[1, 2], [3, 4], [5, 6]]
    assert ds.eval_data(4).shape == (4, 2)
    with pytest.raises(DifflabError, match="no such file"):
        load_file_data(tmp_path / "missing.npz")
