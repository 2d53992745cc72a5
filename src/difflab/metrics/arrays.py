"""Turning user input (numpy, torch, nested lists) into float64 numpy arrays, with one-line errors."""

from __future__ import annotations

import numpy as np
import torch

from difflab.errors import DifflabError, require


def as_float64(a, name: str, hint: str = "") -> np.ndarray:
    """Any real array-like as a float64 numpy array; ``hint`` (e.g. " of shape (n, d)") ends the error lines."""
    if isinstance(a, torch.Tensor):
        require(not a.is_complex(), f"{name} is complex; pass real numbers{hint}")
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(a)
    except (TypeError, ValueError) as e:
        raise DifflabError(f"{name} is not an array of numbers; pass a numpy array or tensor{hint}") from e
    require(arr.dtype.kind in "biuf", f"{name} has dtype {arr.dtype}; pass real numbers{hint}")
    return np.asarray(arr, dtype=np.float64)
