"""A small CNN classifier whose penultimate features give a "classifier Frechet distance" for small image sets.

For offline sets where the Inception network does not apply (e.g. scikit-learn's 8x8 digits), train
:class:`SmallClassifier` on the labelled set once (:func:`classifier_for` caches it) and compute the Frechet
distance of its ``feature_dim`` (default 64) features with :class:`ClassifierFeatures` and
:func:`difflab.metrics.frechet.frechet_distance`. Report that number as a "classifier Frechet distance", never as FID:
it is only comparable between runs that use the same cached classifier.

Training is deterministic on the CPU for a fixed seed (same machine, same thread count); weights are stored as
safetensors plus a JSON config, never pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difflab.atomic import atomic_dir
from difflab.errors import DifflabError, require, short
from difflab.metrics.extractors import FeatureExtractor

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MAX_SIZE = 32


class SmallClassifier(nn.Module):
    """CNN for (C, H, W) images up to 32 x 32: 3 conv layers, global average pool, feature layer, linear head.

    ``features(x)`` (N, feature_dim) are the penultimate activations; ``forward(x)`` gives (N, num_classes) logits.
    Defaults: ``width=32`` channels (doubled after the stride-2 layer), ``feature_dim=64``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, feature_dim: int = 64, width: int = 32):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("feature_dim", feature_dim),
                        ("width", width)):
            require(isinstance(v, int) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        require(num_classes >= 2, f"num_classes must be >= 2, got {num_classes}; a classifier needs two labels")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "feature_dim": feature_dim,
                       "width": width}
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.heldout_accuracy: float | None = None
        self.train_seconds: float | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images (N, C, H, W) in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.body(x))


def _check_images(images, in_channels: int | None = None) -> torch.Tensor:
    """Images as a finite float32 (N, C, H, W) tensor with H, W <= 32."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    require(isinstance(images, torch.Tensor), f"images must be a tensor (N, C, H, W), got {type(images).__name__}")
    require(images.is_floating_point(), f"images have dtype {images.dtype}; pass float images in [-1, 1]")
    require(images.ndim == 4, f"images have shape {tuple(images.shape)}; pass (N, C, H, W) images in [-1, 1]")
    require(
        images.shape[2] <= MAX_SIZE and images.shape[3] <= MAX_SIZE,
        f"images are {images.shape[2]}x{images.shape[3]}; the small classifier handles up to {MAX_SIZE}x{MAX_SIZE} "
        "(use the Inception FID for larger images)",
    )
    if in_channels is not None:
        require(
            images.shape[1] == in_channels,
            f"images have {images.shape[1]} channels but the classifier expects {in_channels}; pass matching images",
        )
    require(bool(torch.isfinite(images).all()), "images contain NaN or inf values; check the data")
    return images.detach().to(device="cpu", dtype=torch.float32)


@torch.no_grad()
def accuracy(model: SmallClassifier, images, labels, batch_size: int = 512) -> float:
    """Fraction of ``images`` (N, C, H, W) whose arg-max logit equals ``labels`` (N,)."""
    x = _check_images(images, model.config["in_channels"])
    y = torch.as_tensor(labels).reshape(-1)
    require(y.shape[0] == x.shape[0], f"{y.shape[0]} labels for {x.shape[0]} images; pass one label per image")
    model.eval()
    hits = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
               for i in range(0, x.shape[0], batch_size))
    return hits / max(1, x.shape[0])


def train_classifier(
    images,
    labels,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    holdout: float = 0.2,
    feature_dim: int = 64,
    width: int = 32,
    verbose: bool = False,
) -> SmallClassifier:
    """Train a :class:`SmallClassifier` on float images (N, C, H, W) in [-1, 1] and integer labels (N,), on the CPU.

    A ``holdout`` fraction (default 0.2) chosen by ``seed`` is kept out; its accuracy is stored in
    ``model.heldout_accuracy`` (and printed if ``verbose``), the wall time in ``model.train_seconds``. AdamW
    (``lr`` 3e-3, cosine decay, ``weight_decay`` 1e-4), ``epochs`` (default 30) passes of ``batch_size`` 64.
    Deterministic for a given seed on one machine. Returns the model in eval mode.
    """
    x = _check_images(images)
    y, num_classes = _check_labels(labels, x.shape[0])
    require(isinstance(epochs, int) and epochs >= 1, f"epochs must be an integer >= 1, got {epochs!r}")
    require(0.0 <= holdout < 1.0, f"holdout must be in [0, 1), got {holdout}")
    n_hold = int(round(holdout * x.shape[0]))
    require(x.shape[0] - n_hold >= 2, f"only {x.shape[0] - n_hold} training images; pass more labelled images")

    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    hold, train = perm[:n_hold], perm[n_hold:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(x.shape[1], num_classes, feature_dim=feature_dim, width=width)
    _fit(model, x, y, train, gen, epochs, batch_size, lr, weight_decay)
    model.heldout_accuracy = accuracy(model, x[hold], y[hold]) if n_hold > 0 else None
    model.train_seconds = time.perf_counter() - start
    if verbose:
        acc = "n/a" if model.heldout_accuracy is None else f"{model.heldout_accuracy:.4f}"
        print(f"classifier: held-out accuracy {acc} on {n_hold} images, trained in {model.train_seconds:.1f} s")
    return model


def _check_labels(labels, n: int) -> tuple[torch.Tensor, int]:
    """Integer labels 0..K-1 (n,) as int64, and K >= 2."""
    y = torch.as_tensor(np.asarray(labels)).reshape(-1)
    require(y.shape[0] == n, f"{y.shape[0]} labels for {n} images; pass one label per image")
    require(not y.is_floating_point() or bool((y == y.round()).all()), "labels must be integers 0..K-1")
    y = y.to(torch.int64)
    require(int(y.min()) >= 0, f"labels must be integers >= 0, got {int(y.min())}; map classes to 0..K-1")
    num_classes = int(y.max()) + 1
    require(num_classes >= 2, "all labels are equal; the classifier needs at least two classes")
    return y, num_classes


def _fit(model: SmallClassifier, x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, gen: torch.Generator,
         epochs: int, batch_size: int, lr: float, weight_decay: float) -> None:
    """AdamW with cosine decay, cross-entropy on rows ``train`` of x (N, C, H, W) and y (N,), reshuffled by ``gen``
    every epoch; leaves the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


class ClassifierFeatures(FeatureExtractor):
    """Penultimate features (N, feature_dim) of a :class:`SmallClassifier`; same ``extract`` as the Inception one."""

    name = "classifier"

    def __init__(self, model: SmallClassifier, device: str | torch.device = "cpu", batch_size: int = 512,
                 progress: bool = False):
        require(isinstance(model, SmallClassifier), f"model must be a SmallClassifier, got {type(model).__name__}")
        super().__init__(device=device, batch_size=batch_size, progress=progress)
        self.model = model.eval().to(self.device)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        c = self.model.config["in_channels"]
        require(images.shape[1] == c, f"images have {images.shape[1]} channels but the classifier expects {c}")
        return self.model.features(images.to(torch.float32))


def save_classifier(path_dir, model: SmallClassifier, **meta) -> Path:
    """Write ``model.safetensors`` and ``config.json`` (architecture, accuracy, ``meta``) into folder ``path_dir``."""
    from safetensors.torch import save_file

    require(isinstance(model, SmallClassifier), f"model must be a SmallClassifier, got {type(model).__name__}")
    d = Path(path_dir)
    require(not d.is_file(), f"{d} is a file; pass a folder for the classifier")
    d.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "SmallClassifier", **model.config, "heldout_accuracy": model.heldout_accuracy,
              "meta": meta}
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DifflabError(f"classifier metadata is not JSON-serialisable ({e}); pass numbers and strings") from e
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(d / WEIGHTS_FILE))
    (d / CONFIG_FILE).write_text(text + "\n")
    return d


def load_classifier(path_dir) -> SmallClassifier:
    """Load a classifier written by :func:`save_classifier` (eval mode, CPU)."""
    from safetensors.torch import load_file

    d = Path(path_dir)
    require(d.is_dir(), f"no classifier folder at {d}; train one with train_classifier and save_classifier")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        require((d / f).is_file(), f"{d} has no {f}; it is not a saved classifier (delete it to retrain)")
    try:
        config = json.loads((d / CONFIG_FILE).read_text())
        keys = ("in_channels", "num_classes", "feature_dim", "width")
        model = SmallClassifier(**{k: config[k] for k in keys})
    except (ValueError, KeyError, TypeError) as e:
        msg = f"{d / CONFIG_FILE} is not a valid classifier config ({e}); delete the folder to retrain"
        raise DifflabError(msg) from e
    try:
        state = load_file(str(d / WEIGHTS_FILE))
        model.load_state_dict(state)
    except Exception as e:  # safetensors raises its own error types
        raise DifflabError(f"cannot load {d / WEIGHTS_FILE} ({short(e)}); delete the folder to retrain") from e
    model.heldout_accuracy = config.get("heldout_accuracy")
    model.meta = config.get("meta", {})
    return model.eval()


def _labelled_data(dataset_name: str):
    from difflab.data import get_dataset

    ds = get_dataset(dataset_name)
    require(
        getattr(ds, "labels", None) is not None and getattr(ds, "images", None) is not None,
        f"data set {dataset_name!r} has no class labels; the classifier Frechet distance needs a labelled image "
        "set such as digits (pass images= and labels= to classifier_for)",
    )
    return ds.images, ds.labels


def classifier_for(dataset_name: str, cache_dir, images=None, labels=None, seed: int = 0, epochs: int = 30,
                   verbose: bool = False) -> SmallClassifier:
    """The classifier for a labelled image set, trained on first use and cached under ``cache_dir``.

    Images and labels come from ``difflab.data.get_dataset(dataset_name)`` (e.g. ``"digits"``) unless given.
    The cache folder name holds a hash of the data, seed and epochs, so a changed set is never served a stale model.
    """
    if images is None or labels is None:
        images, labels = _labelled_data(dataset_name)
    x = _check_images(images)
    y = np.asarray(torch.as_tensor(labels).reshape(-1).to(torch.int64))
    h = hashlib.sha256()
    h.update(x.numpy().tobytes())
    h.update(y.tobytes())
    h.update(json.dumps({"shape": list(x.shape), "seed": seed, "epochs": epochs}).encode())
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(dataset_name)).stem) or "data"
    cache = Path(cache_dir)
    require(not cache.is_file(), f"cache_dir {cache} is a file; pass a folder")
    target = cache / f"classifier-{stem}-{h.hexdigest()[:12]}"
    if target.is_dir():
        return load_classifier(target)
    model = train_classifier(x, y, epochs=epochs, seed=seed, verbose=verbose)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target, replace=False) as tmp:  # fails if another process already cached it
            save_classifier(tmp, model, dataset=str(dataset_name), seed=seed, epochs=epochs,
                            n_images=int(x.shape[0]))
    except OSError:
        if not target.is_dir():
            raise
    return load_classifier(target)


__all__ = [
    "ClassifierFeatures",
    "SmallClassifier",
    "accuracy",
    "classifier_for",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]
