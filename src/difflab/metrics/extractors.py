"""The base of the feature extractors (Inception, the small classifier): float images (N, C, H, W) in [-1, 1],
a tensor, an array or an iterable of batches, checked and fed to the network ``batch_size`` at a time, to
features (N, D) in float64."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from difflab.errors import require


class FeatureExtractor:
    """Base of the extractors: ``extract(images) -> (N, D) float64`` in batches; subclasses define ``_features``.

    ``images``: float (N, C, H, W) in [-1, 1] (tensor or numpy), or an iterable of such batches (e.g. a sampler's
    output, streamed). ``batch_size`` (default 64) and ``progress`` (a bar or plain lines on stderr, see
    :mod:`difflab.progress`; default False) can be overridden per call.
    """

    name = "features"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = False):
        require(
            isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be an integer >= 1, got {batch_size}"
        )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress

    def _features(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_batch(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x)) if x.dtype.kind in "biuf" else None
        require(isinstance(x, torch.Tensor), "images must be float tensors or arrays of shape (N, C, H, W)")
        require(
            x.is_floating_point(),
            f"images have dtype {x.dtype}; pass float images in [-1, 1] (convert 8-bit ones with x / 127.5 - 1)",
        )
        require(
            x.ndim == 4, f"images have shape {tuple(x.shape)}; pass float images of shape (N, C, H, W) in [-1, 1]"
        )
        require(bool(torch.isfinite(x).all()), "images contain NaN or inf values; check the sampler output")
        return x

    def _batches(self, images, batch_size: int) -> tuple[Iterable[torch.Tensor], int | None]:
        if isinstance(images, (torch.Tensor, np.ndarray)):
            x = self._check_batch(images)
            return (x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)), int(x.shape[0])
        require(
            isinstance(images, Iterable),
            f"images must be a tensor (N, C, H, W) or an iterable of batches, got {type(images).__name__}",
        )

        def chunks():
            for batch in images:
                b = self._check_batch(batch)
                yield from (b[i : i + batch_size] for i in range(0, b.shape[0], batch_size))

        return chunks(), None

    @torch.no_grad()
    def extract(self, images, batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """Features (N, D) float64 of float images (N, C, H, W) in [-1, 1], computed ``batch_size`` at a time."""
        from difflab.progress import progress as progress_bar

        bs = self.batch_size if batch_size is None else batch_size
        require(isinstance(bs, int) and bs >= 1, f"batch_size must be an integer >= 1, got {bs}")
        batches, total = self._batches(images, bs)
        show = self.progress if progress is None else progress
        desc = self.name if self.name.endswith("features") else f"{self.name} features"
        bar = progress_bar(total, desc, unit="image", enabled=bool(show), leave=False)
        out: list[np.ndarray] = []
        try:
            for b in batches:
                if b.shape[0] == 0:
                    continue
                f = self._features(b.to(self.device))
                require(
                    isinstance(f, torch.Tensor) and f.ndim == 2 and f.shape[0] == b.shape[0],
                    f"the {self.name} network returned {getattr(f, 'shape', type(f).__name__)} for {b.shape[0]} "
                    "images; it must return (N, D) features (check the call convention)",
                )
                out.append(f.detach().to(device="cpu", dtype=torch.float64).numpy())
                bar.update(b.shape[0])
        finally:
            bar.close()
        require(len(out) > 0, "no images were given; pass at least one image of shape (C, H, W)")
        feats = np.concatenate(out, axis=0)
        require(np.isfinite(feats).all(), f"the {self.name} network produced NaN or inf features")
        return feats


__all__ = ["FeatureExtractor"]
