"""CIFAR-10 from a local folder or archive -> :class:`~difflab.data.images.ImageData` (N, 3, 32, 32) in [-1, 1].

- :func:`load_cifar10`: the python version (pickled batches) or the binary version (3073-byte records), from the
  extracted folder or the downloaded ``.tar.gz``; labels 0-9 and :data:`CIFAR10_CLASSES`.

The python batches are pickles, and a plain ``pickle.load`` runs whatever code a pickle names. They are read
instead with :class:`_ArrayUnpickler` (a :class:`~difflab.unpickling.RestrictedUnpickler`), whose allow list hands
out only numpy's array reconstructor, a numeric-only ``numpy.dtype`` and the two ``bytes`` builders of protocol-2
pickles; every other global and every persistent id is refused with a one-line :class:`~difflab.errors.DifflabError`,
so nothing in a batch is run.
"""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import torch

from difflab.data.images import ImageData, _check_dir, _from_uint8
from difflab.errors import DifflabError, require, short
from difflab.unpickling import BUILTINS, NUMPY_CORE, Refused, RestrictedUnpickler, numeric_dtype, refusal, under

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR_RECORD = 1 + 3 * 32 * 32


_NDARRAY = object()  # what the unpickler hands out for numpy.ndarray: only _reconstruct accepts it


def _np_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct(ndarray, (0,), b'b')``: an empty array that BUILD then fills from bytes."""
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or math.prod(shape) != 0:
        raise Refused("numpy _reconstruct with unexpected arguments")
    return np.ndarray(shape=shape, dtype=_np_dtype(dtype))


def _np_dtype(spec, align=False, copy=False):
    """:func:`~difflab.unpickling.numeric_dtype`, ``spec`` also as bytes: read with ``encoding="bytes"``, the
    Python 2 batches name their dtypes (``'u1'``, ``'b'``) as bytes."""
    return numeric_dtype(spec.decode("ascii", "replace") if isinstance(spec, bytes) else spec, align, copy)


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode(text, 'latin1')``: how protocol-2 pickles written by Python 3 store bytes."""
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise Refused("_codecs.encode of something other than a latin-1 string")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``: how protocol-2 pickles written by Python 3 store b''."""
    if args:
        raise Refused("builtins.bytes with arguments")
    return b""


class _ArrayUnpickler(RestrictedUnpickler):
    """Rebuilds dicts, lists, strings, numbers and plain numeric numpy arrays; refuses every other global."""

    GLOBALS = {**under(NUMPY_CORE, "_reconstruct", _np_reconstruct), ("numpy", "ndarray"): _NDARRAY,
               ("numpy", "dtype"): _np_dtype, **under(("_codecs", "codecs"), "encode", _latin1_bytes),
               **under(BUILTINS, "bytes", _empty_bytes)}


def _unpickle_batch(raw: bytes, where: str) -> dict:
    """A CIFAR-10 python batch (pickled dict of bytes keys) -> dict; never runs code from the pickle."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Refused as e:
        raise refusal(where, e, "difflab only rebuilds numpy arrays from CIFAR-10 batches and never runs code from "
                                "a pickle (download the original cifar-10-python.tar.gz again)") from None
    except Exception as e:  # truncated or garbled pickles raise many types
        raise DifflabError(f"cannot read {where}: {short(e)} (not a CIFAR-10 python batch; download the "
                           f"original archive again)") from None
    require(isinstance(obj, dict), f"{where} holds a {type(obj).__name__}, not a CIFAR-10 batch dict (download "
                                   f"the original archive again)")
    return obj


def _python_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 3, 32, 32), int64 (n,)) of one python-version batch."""
    d = _unpickle_batch(raw, where)
    fix = "download the original archive again"
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    require(data is not None and labels is not None, f"{where} has no 'data' and 'labels' entries ({fix})")
    require(isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072,
            f"{where}: 'data' is not a uint8 array of shape (n, 3072) ({fix})")
    try:
        y = np.asarray(labels)
    except Exception as e:
        raise DifflabError(f"{where}: 'labels' is not a list of integers ({fix})") from e
    require(y.ndim == 1 and y.dtype.kind in "iu" and len(y) == len(data),
            f"{where}: 'labels' is not {len(data)} integers ({fix})")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _binary_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, 3, 32, 32), int64 (n,)) of one binary-version batch: records of 1 label byte + 3072 CHW bytes."""
    require(len(raw) > 0 and len(raw) % _CIFAR_RECORD == 0,
            f"{where} has {len(raw)} bytes, not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records (the file "
            f"is truncated; download the original archive again)")
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def _cifar_names(split: str, binary: bool) -> list[str]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [n + ".bin" for n in names] if binary else names


def _cifar_from_folder(p: Path, split: str) -> list[tuple[str, bytes, bool]]:
    for sub in ("cifar-10-batches-py", "cifar-10-batches-bin"):  # the folder the archive was extracted into
        if (p / sub).is_dir() and not any((p / n).exists() for n in ("data_batch_1", "data_batch_1.bin")):
            p = p / sub
            break
    binary = not any((p / n).is_file() for n in ("data_batch_1", "test_batch")) and any(
        (p / n).is_file() for n in ("data_batch_1.bin", "test_batch.bin"))
    names = _cifar_names(split, binary)
    missing = [n for n in names if not (p / n).is_file()]
    require(not missing, f"{p} is not a CIFAR-10 folder: missing {', '.join(missing)} (give the extracted "
                         f"cifar-10-batches-py or cifar-10-batches-bin folder, or the .tar.gz archive)")
    out = []
    for n in names:
        try:
            out.append((str(p / n), (p / n).read_bytes(), binary))
        except OSError as e:
            raise DifflabError(f"cannot read {p / n}: {short(e)} (check that the file is readable)") from e
    return out


def _cifar_from_archive(p: Path, split: str) -> list[tuple[str, bytes, bool]]:
    fix = "give cifar-10-python.tar.gz or cifar-10-binary.tar.gz as downloaded, or the extracted folder"
    try:
        with tarfile.open(p, "r:*") as tar:
            members = tar.getmembers()
            by_name: dict[str, list] = {}
            for m in members:
                by_name.setdefault(m.name.rsplit("/", 1)[-1], []).append(m)
            binary = not any(n in by_name for n in ("data_batch_1", "test_batch"))
            names = _cifar_names(split, binary)
            missing = [n for n in names if n not in by_name]
            require(not missing, f"{p} is not a CIFAR-10 archive: it has no member {', '.join(missing)} ({fix})")
            chosen = {}
            for n in names:
                require(len(by_name[n]) == 1, f"{p} holds {len(by_name[n])} members named {n}; keep one ({fix})")
                m = by_name[n][0]
                require(m.isfile(), f"{p}: member {m.name} is not a regular file ({fix})")
                chosen[m.name] = n
            out = []
            for m in members:  # archive order: one pass through a compressed stream
                if m.name in chosen and m.isfile():
                    f = tar.extractfile(m)
                    out.append((f"{p}:{m.name}", f.read(), binary))
    except DifflabError:
        raise
    except Exception as e:  # tarfile, gzip, zlib and lzma all raise their own types on damaged archives
        raise DifflabError(f"cannot read archive {p}: {short(e)} (the file is damaged or not a tar archive; "
                           f"{fix})") from e
    return out


def load_cifar10(path, split: str = "train", flip: bool = False) -> ImageData:
    """CIFAR-10 from a local copy -> :class:`ImageData` (N, 3, 32, 32) in [-1, 1], labels 0-9, class names.

    ``path``: the extracted ``cifar-10-batches-py`` or ``cifar-10-batches-bin`` folder (or the folder holding
    it), or ``cifar-10-python.tar.gz`` / ``cifar-10-binary.tar.gz``. ``split``: ``"train"`` (data_batch_1..5,
    50,000 images) or ``"test"`` (test_batch, 10,000). The python batches are read with an unpickler that only
    rebuilds numpy arrays; anything else in them is refused, never executed.
    """
    require(split in ("train", "test"), f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    require(isinstance(flip, (bool, np.bool_)), f"flip must be True or False, got {flip!r}")
    fix = "give the cifar-10-batches-py folder or cifar-10-python.tar.gz"
    root = _check_dir(path, "CIFAR-10", fix)
    p = Path(path)
    if root is not None:
        batches = _cifar_from_folder(root, split)
    else:
        try:
            is_tar = tarfile.is_tarfile(p)
        except Exception:  # a damaged compressed stream raises instead of answering False
            is_tar = False
        require(is_tar, f"{p} is neither a CIFAR-10 folder nor a readable tar archive ({fix})")
        batches = _cifar_from_archive(p, split)
    parts = [(_binary_batch if binary else _python_batch)(raw, where) for where, raw, binary in batches]
    for (where, _, _), (_, y) in zip(batches, parts, strict=True):
        bad = y[(y < 0) | (y > 9)]
        require(len(bad) == 0, f"{where} has label {int(bad[0]) if len(bad) else 0}; CIFAR-10 labels are 0..9 "
                               f"(download the original archive again)")
    u8 = np.concatenate([x for x, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.from_numpy(np.concatenate([y for _, y in parts]))
    name = "cifar10" if split == "train" else "cifar10-test"
    return ImageData(_from_uint8(u8), labels=labels, name=name, flip=flip, class_names=CIFAR10_CLASSES)


__all__ = ["CIFAR10_CLASSES", "load_cifar10"]
