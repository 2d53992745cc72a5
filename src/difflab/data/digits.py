"""scikit-learn's 8x8 digits (1,797 images, shipped inside its wheel): a real, offline, CPU-sized image set.

Images are (1, 8, 8) (or (1, 16, 16) with ``size=16``, bilinear), scaled from [0, 16] to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch

from difflab.errors import DifflabError


class Digits:
    name = "digits"

    def __init__(self, size: int = 8):
        try:
            from sklearn.datasets import load_digits
        except ImportError:  # pragma: no cover - scikit-learn is a dependency
            raise DifflabError("the digits data set needs scikit-learn: pip install scikit-learn") from None
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float64) / 8.0 - 1.0)[:, None]  # (N, 1, 8, 8) in [-1, 1]
        if size != 8:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = x
        self.labels = torch.from_numpy(d.target.astype(np.int64))
        self.shape = tuple(x.shape[1:])
        self.dim = int(np.prod(self.shape))

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n images drawn with replacement, float64 (n, 1, s, s)."""
        idx = np.random.default_rng(seed).integers(0, len(self.images), n)
        return self.images[torch.from_numpy(idx)]

    def train_data(self, n: int | None = None, seed: int = 42) -> torch.Tensor:
        return self.images if n is None else self.sample(n, seed)

    def eval_data(self, n: int | None = None, seed: int = 1) -> torch.Tensor:
        return self.images if n is None else self.sample(n, seed)
