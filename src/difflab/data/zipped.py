"""EDM dataset zips (written by ``dataset_tool.py`` of NVlabs/edm) as :class:`~difflab.data.images.ImageData`.

Such a zip holds images (``00000/img00000000.png``, ...) and, at its root, ``dataset.json``:
``{"labels": [["00000/img00000000.png", 6], ...]}`` or ``{"labels": null}``. As EDM's loader does, the images
are the members with an image extension, sorted by name, and each label is looked up by its member's name with
backslashes turned into slashes. Hidden members (a path part starting with ``.``) and ``__MACOSX/`` are skipped.

Everything is read in memory with :mod:`zipfile` and nothing is extracted, so member names (``..``, absolute
paths) never reach the file system. Every bad input raises a one-line :class:`~difflab.errors.DifflabError` that
names the zip (and the member) and the fix, before any pixel is decoded where the problem can be seen early.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from difflab.data.files import is_count
from difflab.data.images import (
    _GREY_MODES,
    MAX_SIZE,
    ImageData,
    _bad_image,
    _check_dir,
    _decode,
    _from_uint8,
    _oriented_size,
    _supported_suffixes,
)
from difflab.errors import DifflabError, require, short

MAX_MEMBER = 64 << 20  # declared uncompressed bytes of one image
MAX_TOTAL = 16 << 30  # declared uncompressed bytes of all images together
MAX_JSON = 256 << 20  # declared uncompressed bytes of dataset.json
MAX_CLASSES = 1 << 20
FIX = "build the zip with EDM's dataset_tool.py"
_JSON_FORM = 'write it as {"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}'


class _Member(io.BytesIO):
    """The bytes of a zip member; its repr (which Pillow puts in its messages) is the member's name."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.member = name

    def __repr__(self) -> str:
        return repr(self.member)


def _clip(value, limit: int = 60) -> str:
    """``value`` as JSON text, at most ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _visible(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return not any(s == "__MACOSX" or (s.startswith(".") and s not in (".", "..")) for s in parts)


def _image_members(zf: zipfile.ZipFile, p: Path) -> list[zipfile.ZipInfo]:
    """The image members, sorted by name, after checking their declared sizes against the caps."""
    suffixes = _supported_suffixes()
    files = [i for i in zf.infolist() if not i.is_dir()]
    members = sorted((i for i in files if _visible(i.filename) and PurePosixPath(i.filename).suffix.lower()
                      in suffixes), key=lambda i: i.filename)
    if not members:
        other = [i.filename for i in files if i.filename != "dataset.json"]
        n = len(other)
        held = f"it holds {n} other file{'s' * (n != 1)}, e.g. {other[0]!r}" if other else "it holds no other files"
        raise DifflabError(f"no images found in {p} (looked for {', '.join(suffixes)} members; {held}); {FIX}")
    for i in members:
        require(i.file_size <= MAX_MEMBER, f"{p}:{i.filename} declares {i.file_size} bytes uncompressed, over the "
                                           f"{MAX_MEMBER >> 20} MiB limit for one image (the zip is damaged or a "
                                           f"zip bomb); {FIX}")
    total = sum(i.file_size for i in members)
    require(total <= MAX_TOTAL, f"{p}: its {len(members)} images declare {total / 2 ** 30:.1f} GiB uncompressed, over "
                                f"the {MAX_TOTAL >> 30} GiB limit (the zip is damaged or a zip bomb; else use "
                                f"fewer or smaller images)")
    return members


def _label_pairs(labels, where: str) -> list:
    """[(name, label)] of dataset.json's ``labels``: a list of [name, label] pairs or a name -> label object."""
    if isinstance(labels, dict):
        return list(labels.items())
    require(isinstance(labels, list), f"{where}: 'labels' is a {type(labels).__name__}, not a list of "
                                      f"[name, label] pairs ({_JSON_FORM})")
    for item in labels:
        require(isinstance(item, list) and len(item) == 2 and isinstance(item[0], str),
                f"{where}: labels entry {_clip(item)} is not a [name, label] pair "
                f"({_JSON_FORM})")
    return [tuple(item) for item in labels]


def _read_labels(zf: zipfile.ZipFile, p: Path, members: list[zipfile.ZipInfo]) -> torch.Tensor | None:
    """int64 labels (N,) of the image members from dataset.json, or None without it or with null labels."""
    try:
        info = zf.getinfo("dataset.json")
    except KeyError:
        return None
    where = f"{p}:dataset.json"
    require(info.file_size <= MAX_JSON, f"{where} declares {info.file_size} bytes uncompressed, over the "
                                        f"{MAX_JSON >> 20} MiB limit (the zip is damaged or a zip bomb); {FIX}")
    try:
        doc = json.loads(zf.read(info))
    except (ValueError, RecursionError) as e:
        raise DifflabError(f"{where} is not valid JSON: {short(e)} ({_JSON_FORM})") from e
    except Exception as e:  # a damaged member: bad CRC, truncated data, unsupported compression
        raise DifflabError(f"cannot read {where}: {short(e)} (the zip is damaged); {FIX}") from e
    require(isinstance(doc, dict) and "labels" in doc, f"{where} is not an object with a 'labels' key ({_JSON_FORM})")
    if doc["labels"] is None:
        return None
    table = {}
    for name, label in _label_pairs(doc["labels"], where):
        require(isinstance(label, int) and not isinstance(label, bool),
                f"{where}: label {_clip(label)} of {name!r} is not an integer; give "
                f"class labels 0..K-1 (label vectors are not supported)")
        require(0 <= label < MAX_CLASSES, f"{where}: label {label} of {name!r} is out of range; give class labels "
                                          f"0..K-1 (K at most {MAX_CLASSES})")
        require(name not in table, f"{where} labels {name!r} twice; give one label per image")
        table[name] = label
    names = [i.filename.replace("\\", "/") for i in members]
    missing = [n for n in names if n not in table]
    if missing:
        raise DifflabError(f"{where}: {len(missing)} of {len(names)} images have no label (first: {missing[0]!r}); "
                           f'label every image, or write {{"labels": null}} for an unlabelled set')
    extra = sorted(set(table) - set(names))
    if extra:
        raise DifflabError(f"{where} labels files that are not images in the zip ({len(extra)}, first: "
                           f"{extra[0]!r}); drop those labels or add the images")
    return torch.tensor([table[n] for n in names], dtype=torch.int64)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> _Member:
    try:
        return _Member(zf.read(info), info.filename)
    except Exception as e:  # bad CRC, truncated data, encryption, unsupported compression
        raise _bad_image(where, e) from e


def load_image_zip(path, size: int | None = None, flip: bool = False) -> ImageData:
    """The images of an EDM dataset zip, sorted by member name -> :class:`ImageData` (N, C, H, W) in [-1, 1].

    Decoded as :func:`~difflab.data.images.load_image_folder` does: RGB (C=3), or greyscale (C=1) when every image
    is; alpha dropped; with ``size`` (default None) center-cropped to a square and resized to (size, size), without
    it all images must share one size. Labels int64 (N,) with ``class_names`` "0".."K-1" come from dataset.json
    when it is there and its labels are not null; otherwise the set is unlabelled. ``flip``: default False.
    """
    from PIL import Image

    fix = "give a .zip written by EDM's dataset_tool.py"
    root = _check_dir(path, "image zip", fix)
    p = Path(path)
    require(root is None, f"{p} is a folder, not a zip ({fix}; for a folder of images use folder:PATH)")
    require(size is None or (is_count(size) and size <= MAX_SIZE),
            f"image size must be an integer from 1 to {MAX_SIZE} or None, got {size!r}")
    require(isinstance(flip, (bool, np.bool_)), f"flip must be True or False, got {flip!r}")
    try:
        zf = zipfile.ZipFile(p)
    except OSError as e:
        raise DifflabError(f"cannot read {p}: {short(e)} (check that the file is readable)") from e
    except Exception as e:  # BadZipFile, or a central directory damaged in a way zipfile does not foresee
        raise DifflabError(f"{p} is not a readable zip file: {short(e)} ({fix})") from e
    with zf:
        members = _image_members(zf, p)
        labels = _read_labels(zf, p, members)
        modes, first = set(), None
        for info in members:  # headers only: sizes and modes are checked before any pixel is decoded
            where = f"{p}:{info.filename}"
            try:
                with Image.open(_read_member(zf, info, where)) as im:
                    modes.add(im.mode)
                    wh = _oriented_size(im)
            except DifflabError:
                raise
            except Exception as e:
                raise _bad_image(where, e) from e
            if size is None:
                if first is None:
                    first = (info.filename, wh)
                require(wh == first[1], f"images in {p} differ in size: {first[0]} is {first[1][0]}x{first[1][1]} "
                                        f"but {info.filename} is {wh[0]}x{wh[1]} (width x height); give a size to "
                                        f"crop and resize them all, e.g. zip:{p}?size=32 or "
                                        f"load_image_zip(path, size=32)")
        mode = "L" if modes <= _GREY_MODES else "RGB"
        h, w = (size, size) if size is not None else (first[1][1], first[1][0])
        u8 = np.empty((len(members), 1 if mode == "L" else 3, h, w), dtype=np.uint8)
        for i, info in enumerate(members):
            where = f"{p}:{info.filename}"
            arr = _decode(_read_member(zf, info, where), mode, size, where)
            require(arr.shape[:2] == (h, w), f"image {where} decodes to {arr.shape[1]}x{arr.shape[0]}, not {w}x{h} "
                                             f"as its header said (the member looks damaged; {FIX} again)")
            u8[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return ImageData(_from_uint8(u8), labels=labels, name=p.stem or "images", flip=flip)


__all__ = ["load_image_zip"]
