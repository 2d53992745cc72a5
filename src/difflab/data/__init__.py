"""Data sets: built-in toy sets by name, or user arrays from .npy / .npz / .csv files.

Every data set has ``name``, ``shape`` (per example), ``dim``, ``sample(n, seed)``, ``train_data()`` and
``eval_data()``, all returning float64 tensors of shape (n, *shape).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from difflab.data.toy import GMM1D, TOY_SETS, Dino, ToyData
from difflab.errors import DifflabError

FILE_SUFFIXES = (".npy", ".npz", ".csv")


def get_dataset(spec: str):
    """A built-in set by name (``dino``, ``moons``, ...) or a data file by path."""
    if spec in TOY_SETS:
        return TOY_SETS[spec]()
    if spec == "digits":
        from difflab.data.digits import Digits

        return Digits()
    if Path(spec).suffix.lower() in FILE_SUFFIXES or Path(spec).exists() or "/" in spec:
        from difflab.data.files import load_file_data

        return load_file_data(spec)
    close = difflib.get_close_matches(spec, [*TOY_SETS, "digits"], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DifflabError(
        f"unknown data set {spec!r}: {hint}use one of {', '.join(TOY_SETS)}, digits, or a path to a .npy, .npz or "
        ".csv file"
    )


__all__ = ["TOY_SETS", "GMM1D", "Dino", "ToyData", "get_dataset"]
