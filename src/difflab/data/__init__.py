"""Data sets: built-in toy sets by name, user arrays from .npy / .npz / .csv files, and image sets (folders, image
arrays, CIFAR-10, EDM dataset zips).

Every data set has ``name``, ``shape`` (per example), ``dim``, ``sample(n, seed)``, ``train_data()`` and
``eval_data()``, all returning float64 tensors of shape (n, *shape). Image sets (:class:`ImageData`) also have
``labels``, ``num_classes``, ``class_names``, ``flip``, ``sample_with_labels`` and ``stats()``.
"""

from __future__ import annotations

import re
from pathlib import Path

from difflab.data.cifar import load_cifar10
from difflab.data.images import ImageData, load_image_array, load_image_folder, parse_options
from difflab.data.toy import GMM1D, TOY_SETS, Dino, ToyData
from difflab.data.zipped import load_image_zip
from difflab.errors import DifflabError, closest, require

FILE_SUFFIXES = (".npy", ".npz", ".csv")
IMAGE_NAMES = ("digits", "digits16")
IMAGE_PREFIXES = ("folder", "images", "cifar10", "cifar10-test", "zip")
OPTIONS = {  # spec kind -> its ?key=value options and their kinds
    "digits": {"flip": "bool"}, "digits16": {"flip": "bool"}, "folder": {"size": "size", "flip": "bool"},
    "images": {"flip": "bool"}, "cifar10": {"flip": "bool"}, "cifar10-test": {"flip": "bool"},
    "zip": {"size": "size", "flip": "bool"},
}


def _image_kind(base: str, spec: str) -> tuple[str | None, str | None]:
    """(kind, path) of an image spec without its options, or (None, None) if it names no image set."""
    if base in IMAGE_NAMES:
        return base, None
    prefix, colon, rest = base.partition(":")
    if colon and prefix in IMAGE_PREFIXES:
        require(bool(rest), f"data set {spec!r} names no path: write {prefix}:PATH")
        return prefix, rest
    try:
        if base and Path(base).is_dir():
            return "folder", base
    except OSError:
        pass
    return None, None


def _load_image_set(kind: str, path: str | None, opts: dict):
    flip = opts.get("flip", False)
    if kind in IMAGE_NAMES:
        from difflab.data.digits import Digits

        return Digits(size=8 if kind == "digits" else 16, flip=flip)
    if kind == "folder":
        return load_image_folder(path, size=opts.get("size"), flip=flip)
    if kind == "images":
        return load_image_array(path, flip=flip)
    if kind == "zip":
        return load_image_zip(path, size=opts.get("size"), flip=flip)
    return load_cifar10(path, split="train" if kind == "cifar10" else "test", flip=flip)


def get_dataset(spec: str):
    """A data set by spec string.

    - a toy set by name (``dino``, ``moons``, ...), or a .npy / .npz / .csv file by path (:class:`ArrayData`);
    - ``digits`` (8x8) or ``digits16`` (16x16); ``folder:PATH`` or a directory path (a folder of images);
      ``images:PATH`` (image arrays in .npy / .npz); ``cifar10:PATH`` / ``cifar10-test:PATH`` (train / test split);
      ``zip:PATH`` (a dataset zip of EDM's ``dataset_tool.py``, labels from its dataset.json). A bare path ending
      in .zip is refused with the hint to write ``zip:PATH``: bare paths are array files or folders.

    Image sets take options after ``?``: ``flip=1`` (random horizontal flips) for all, ``size=N`` (crop and
    resize) for folders and zips, e.g. ``folder:/data/imgs?size=32&flip=1`` or ``digits16?flip=1``.
    """
    require(isinstance(spec, str) and bool(spec.strip()),
            f"data set must be a non-empty string (a name or a path), got {spec!r}")
    if spec in TOY_SETS:
        return TOY_SETS[spec]()
    base, qmark, opt_text = spec.partition("?")
    kind, path = _image_kind(base, spec)
    if kind is not None:
        opts = parse_options(opt_text, OPTIONS[kind], spec) if qmark else {}
        return _load_image_set(kind, path, opts)
    require(not (qmark and base in TOY_SETS), f"data set {base!r} takes no options; write {base!r} alone "
                                              f"(options such as ?flip=1 are for image sets)")
    m = re.match(r"([A-Za-z][\w-]+):", spec)
    if m and not Path(spec).exists():
        close = closest(m.group(1).lower(), IMAGE_PREFIXES)
        if close is not None:
            raise DifflabError(f"unknown data set prefix {m.group(1) + ':'!r} in {spec!r}: did you mean "
                               f"{close + ':'!r}? use one of {', '.join(p + ':PATH' for p in IMAGE_PREFIXES)}")
    require(Path(base).suffix.lower() != ".zip", f"{base} looks like an EDM dataset zip: give it as zip:{spec}")
    if Path(spec).suffix.lower() in FILE_SUFFIXES or Path(spec).exists() or "/" in spec:
        name = Path(spec).name.lower()
        require(not ("cifar-10" in name and name.endswith((".tar.gz", ".tgz", ".tar"))),
                f"{spec} looks like CIFAR-10: give it as cifar10:{spec} (or cifar10-test:{spec} for the test split)")
        from difflab.data.files import load_file_data

        return load_file_data(spec)
    close = closest(spec, [*TOY_SETS, *IMAGE_NAMES])
    hint = f"did you mean {close!r}? " if close is not None else ""
    raise DifflabError(
        f"unknown data set {spec!r}: {hint}use one of {', '.join(TOY_SETS)}, {', '.join(IMAGE_NAMES)}, a path to a "
        ".npy, .npz or .csv file, a folder of images, folder:PATH, images:PATH (.npy/.npz image arrays), "
        "cifar10:PATH, cifar10-test:PATH or zip:PATH (EDM dataset zips)"
    )


__all__ = ["TOY_SETS", "GMM1D", "Dino", "ImageData", "ToyData", "get_dataset", "load_cifar10", "load_image_array",
           "load_image_folder", "load_image_zip"]
