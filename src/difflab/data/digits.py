"""scikit-learn's 8x8 digits (1,797 images, shipped inside its wheel): a real, offline, CPU-sized image set.

Images are (1, 8, 8) (or (1, 16, 16) with ``size=16``, bilinear), scaled from [0, 16] to [-1, 1]; labels 0-9.
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.data.images import ImageData
from difflab.errors import DifflabError, require


class Digits(ImageData):
    """The digits as an :class:`~difflab.data.images.ImageData`: ``images`` float64 (1797, 1, s, s), ``labels``
    int64 (1797,), ``class_names`` "0".."9"; named ``digits`` (size 8, default) or ``digits16`` (size 16)."""

    def __init__(self, size: int = 8, flip: bool = False):
        require(size in (8, 16) and not isinstance(size, bool), f"digits size must be 8 or 16, got {size!r}")
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover - scikit-learn is a dependency
            raise DifflabError("the digits data set needs scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float64) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8) in [-1, 1]
        if size != 8:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        super().__init__(x, labels=torch.from_numpy(d.target.astype(np.int64)),
                         name="digits" if size == 8 else f"digits{size}", flip=flip,
                         class_names=[str(k) for k in range(10)])
