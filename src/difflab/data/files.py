"""User data files (.npy, .npz, .csv) as float64 tensors, and :class:`ArrayData`, a data set around one.

- ``.npy``: one array, read with ``allow_pickle=False`` (object arrays are refused, never unpickled).
- ``.npz``: the array under key ``data``, else ``samples``, else ``x``, else the file's only array; or, when the
  caller names a key (``load_array(path, key="samples")``, as ``difflab eval`` does), exactly that array.
- ``.csv``: comma-separated numbers, one example per line, at most one header line of names; ``#`` starts a
  comment.

A 1-D array of length N becomes (N, 1); arrays with more dimensions keep them: (N, *shape). Every problem
(missing file, bad type, corrupt content, empty array, non-numeric dtype, NaN or inf) raises a one-line
:class:`~difflab.errors.DifflabError` that names the file and the fix.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from difflab.errors import DifflabError, require, short

SUFFIXES = (".npy", ".npz", ".csv")
NPZ_KEYS = ("data", "samples", "x")  # looked up in this order
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_KIND_NAMES = {"b": "boolean", "c": "complex", "O": "Python object", "U": "string", "S": "byte-string",
               "V": "structured (record)", "M": "datetime", "m": "timedelta"}


def is_count(n) -> bool:
    """Whether ``n`` is a positive integer (Python or numpy; bools are not counts)."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1


def _check_path(path) -> Path:
    """An existing regular file with a supported extension, as a Path."""
    require(
        isinstance(path, (str, os.PathLike)),
        f"data path must be a string or a path, got {type(path).__name__} (give a .npy, .npz or .csv file)",
    )
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:
        msg = f"cannot access {p}: {short(e)} (give a path to a .npy, .npz or .csv file)"
        raise DifflabError(msg) from e
    require(
        exists, f"no such file: {p} (give a path to a .npy, .npz or .csv file, or a built-in data set name)"
    )
    require(not is_dir, f"{p} is a directory, not a data file (give a .npy, .npz or .csv file inside it)")
    suffix = p.suffix.lower()
    require(
        suffix in SUFFIXES,
        f"{p}: unsupported file extension {suffix or '(none)'!r} (save the data as .npy, .npz or .csv)",
    )
    return p


def _pick_npz_key(files: list[str], p: Path, key: str | None = None) -> str:
    """The key of the array to use in an .npz archive holding ``files`` (``key``: that one, or an error)."""
    if key is not None:
        require(key in files, f"{p} has no {key!r} array (it holds {', '.join(map(repr, sorted(files))) or 'none'}): "
                              f"save the array under that key, e.g. numpy.savez(path, {key}=array)")
        return key
    require(len(files) > 0, f"{p} holds no arrays (save one with numpy.savez(path, data=array))")
    for key in NPZ_KEYS:
        if key in files:
            return key
    require(
        len(files) == 1,
        f"{p} holds arrays {sorted(files)} but none is named 'data', 'samples' or 'x' "
        f"(save the array under one of those keys, or keep only one array in the file)",
    )
    return files[0]


def _read_numpy(p: Path, key: str | None = None) -> np.ndarray:
    """The array of a .npy file, or the chosen array of an .npz archive; never unpickles."""
    try:
        with open(p, "rb") as f:  # our own handle: numpy leaks its own when a zip turns out corrupt
            head = f.read(6)
            f.seek(0)
            require(
                head.startswith(_NPY_MAGIC) or head[:4] in _ZIP_MAGICS,
                f"{p} is not a numpy file (no .npy or .npz signature; write it with numpy.save or savez)",
            )
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded
            with loaded:
                key = _pick_npz_key(list(loaded.files), p, key)
                arr = loaded[key]
    except DifflabError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DifflabError(
                f"{p} holds an object array (pickled Python objects), which difflab never unpickles "
                f"(save a numeric array instead, e.g. numpy.save(path, array.astype(numpy.float64)))"
            ) from e
        raise DifflabError(f"cannot read {p}: {short(e)} (the file looks corrupt; save it again)") from e
    except Exception as e:  # any failure of numpy's parser on a damaged file is the user's input problem
        raise DifflabError(f"cannot read {p}: {short(e)} (the file looks corrupt; save it again)") from e
    require(
        isinstance(arr, np.ndarray),
        f"{p}: member {key!r} is not a numpy array (save the archive with numpy.savez(path, data=array))",
    )
    return arr


def _header_rows(text: str) -> int:
    """How many leading lines to skip: up to and including the first content line if it is not numeric."""
    for i, line in enumerate(text.split("\n")):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        for field in content.split(","):
            try:
                float(field)
            except ValueError:
                if field.strip():  # a name, not a missing value
                    return i + 1
        return 0
    return 0


def _first_bad_line(text: str, skip: int) -> str | None:
    """Where a CSV text stops being a table of numbers ("line 7: ..."; lines counted from 1), if found."""
    width = None
    for i, line in enumerate(text.split("\n")[skip:], start=skip + 1):
        content = line.split("#", 1)[0].strip()
        if not content:
            continue
        fields = content.split(",")
        for field in fields:
            try:
                float(field)
            except ValueError:
                return f"line {i}: cannot read {field.strip()[:40]!r} as a number"
        if width is not None and len(fields) != width:
            return f"line {i} has {len(fields)} values but the lines above have {width}"
        width = len(fields)
    return None


def _read_csv(p: Path) -> np.ndarray:
    """(N, d) numbers of a comma-separated file; a single non-numeric first line is taken as a header."""
    fix = "write one example per line as comma-separated numbers, with at most one header line"
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DifflabError(f"{p} is not a UTF-8 text file ({fix})") from e
    except OSError as e:
        raise DifflabError(f"cannot read {p}: {short(e)} (check that the file is readable)") from e
    skip = _header_rows(text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" is reported later as an error
            return np.loadtxt(io.StringIO(text), delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64)
    except Exception as e:  # numpy's CSV parser raises several types on malformed text
        where = _first_bad_line(text, skip) or short(e).split("; use `usecols`")[0]
        raise DifflabError(f"{p} is not a numeric CSV file: {where} ({fix})") from e


def _as_examples(arr: np.ndarray, p: Path) -> np.ndarray:
    """Check a loaded array and return it as C-contiguous float64 (N, d) or (N, *shape)."""
    kind = arr.dtype.kind
    require(
        kind in "iuf",
        f"{p} holds {_KIND_NAMES.get(kind, 'non-numeric')} values (dtype {arr.dtype}); difflab needs real "
        f"numbers (convert with array.astype(numpy.float64) and save again)",
    )
    require(arr.ndim >= 1, f"{p} holds a single number, not examples (save an array of shape (N, d))")
    if arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    require(arr.shape[0] >= 1, f"{p} holds no examples (array of shape {arr.shape}); give at least one row")
    require(arr.size >= 1, f"{p} holds examples without values (shape {arr.shape}); give at least one column")
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(arr, dtype=np.float64)
    bad = ~np.isfinite(out.reshape(out.shape[0], -1)).all(axis=1)
    count, first = int(bad.sum()), int(bad.argmax())
    require(
        count == 0,
        f"{p}: {count} of {out.shape[0]} rows contain NaN or inf (first: row {first}, counting data rows "
        f"from 0); remove or fix those rows",
    )
    return out


def load_array(path, key: str | None = None) -> torch.Tensor:
    """Read a .npy, .npz or .csv file -> float64 tensor (N, d), or (N, *shape) for arrays of more dims.

    ``key``: in an .npz, read exactly this array (refused, naming the arrays there, if absent); .npy and .csv
    files hold one array and ignore it."""
    p = _check_path(path)
    arr = _read_csv(p) if p.suffix.lower() == ".csv" else _read_numpy(p, key)
    return torch.from_numpy(_as_examples(arr, p))


class ArrayData:
    """A data set backed by one float64 array (N, *shape): sampling draws rows with replacement.

    Attributes: ``name`` (str), ``shape`` (per-example shape), ``dim`` (prod(shape)), ``array`` (the tensor).
    """

    def __init__(self, array, name: str = "data"):
        t = torch.as_tensor(array).detach()
        require(t.dim() >= 2, f"data set {name!r} has shape {tuple(t.shape)}; give an array of shape (N, d)")
        require(t.shape[0] >= 1 and t.numel() >= 1, f"data set {name!r} is empty (shape {tuple(t.shape)})")
        self.array = t.to(device="cpu", dtype=torch.float64).contiguous()
        self.name = name
        self.shape = tuple(self.array.shape[1:])
        self.dim = math.prod(self.shape)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __repr__(self) -> str:
        return f"ArrayData(name={self.name!r}, n={len(self)}, shape={self.shape})"

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n rows (n, *shape), float64, drawn with replacement by numpy Generator(seed)."""
        require(is_count(n), f"number of examples must be a positive integer, got {n!r}")
        idx = np.random.default_rng(seed).integers(0, len(self), size=int(n))
        return self.array[torch.from_numpy(idx)]

    def train_data(self, n: int | None = None, seed: int = 42) -> torch.Tensor:
        """The whole array (the stored tensor, not a copy) if n is None, else ``sample(n, seed)``."""
        return self.array if n is None else self.sample(n, seed)

    def eval_data(self, n: int | None = None, seed: int = 1) -> torch.Tensor:
        """The whole array (the stored tensor, not a copy) if n is None, else ``sample(n, seed)``."""
        return self.array if n is None else self.sample(n, seed)


def load_file_data(path) -> ArrayData:
    """:func:`load_array` wrapped as an :class:`ArrayData` named after the file's stem."""
    return ArrayData(load_array(path), name=Path(path).stem)
