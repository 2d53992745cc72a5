"""Image data sets: float64 images (N, C, H, W) in [-1, 1], optionally labelled, with seeded horizontal flips.

- :class:`ImageData`: the data-set interface of :class:`~difflab.data.files.ArrayData` plus ``labels``,
  ``num_classes``, ``class_names``, ``flip``, :meth:`ImageData.sample_with_labels` and :meth:`ImageData.stats`.
- :func:`load_image_folder`: PNG / JPEG / BMP / WebP files found recursively; labels from first-level subfolders.
- :func:`load_image_array`: image arrays in .npy / .npz files (N, H, W), (N, C, H, W) or (N, H, W, C).
- :func:`parse_options`: the ``?key=value&...`` options of a data set spec (see :func:`difflab.data.get_dataset`).

Every bad input raises a one-line :class:`~difflab.errors.DifflabError` that names the file and the fix, before
any decoding starts where the problem can be seen early.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from difflab.data.files import ArrayData, is_count
from difflab.errors import DifflabError, closest, require, short

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARRAY_KEYS = ("images", "data", "x", "samples")  # image array of an .npz, looked up in this order
LABEL_KEYS = ("labels", "y")
MAX_ABS = 1.5  # float image arrays beyond this are taken as unscaled
MAX_SIZE = 4096
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_WIDE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # 16-bit greyscale, read as 0..65535
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


# --------------------------------------------------------------------------------------------- ImageData


class ImageData(ArrayData):
    """Images float64 (N, C, H, W) in [-1, 1] with optional int64 labels (N,); rows are drawn with replacement.

    Attributes: ``name``, ``shape`` (C, H, W), ``dim`` (C*H*W), ``images`` (= ``array``, the stored tensor),
    ``labels`` (int64 (N,) tensor or None), ``num_classes`` (0 when unlabelled), ``class_names`` (tuple of str,
    empty when unlabelled), ``flip`` (bool, default False).

    With ``flip`` each image drawn by :meth:`sample` / :meth:`train_data` is mirrored left-right with probability
    1/2. One draw ``j ~ U{0, ..., 2N-1}`` per example from ``numpy.random.default_rng(seed)`` gives the row
    ``j % N`` and the flip ``j >= N``, so draws are reproducible and the first k of an n-draw equal a k-draw.
    :meth:`eval_data` never flips.
    """

    def __init__(self, images, labels=None, name: str = "images", flip: bool = False, class_names=None):
        t = torch.as_tensor(images).detach()
        require(t.dim() == 4, f"image set {name!r} has shape {tuple(t.shape)}; give images of shape (N, C, H, W)")
        require(t.is_floating_point(), f"image set {name!r} has dtype {t.dtype}; give floats scaled to [-1, 1]")
        require(t.numel() >= 1, f"image set {name!r} is empty (shape {tuple(t.shape)}); give at least one image")
        require(isinstance(flip, (bool, np.bool_)), f"flip must be True or False, got {flip!r}")
        super().__init__(t, name=name)
        x = self.array
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(1)
        require(not bool(bad.any()), f"image set {name!r}: {int(bad.sum())} of {len(x)} images contain NaN or inf "
                                     f"(first: image {int(bad.int().argmax())}); fix or drop them")
        lo, hi = torch.aminmax(x)
        peak = max(-float(lo), float(hi))
        require(peak <= MAX_ABS, f"image set {name!r} has values up to {peak:.4g} in magnitude; scale images to "
                                 f"[-1, 1] (e.g. x / 127.5 - 1 for 0..255 pixels)")
        self.images = self.array
        self.flip = bool(flip)
        self.labels, self.num_classes, self.class_names = None, 0, ()
        if labels is not None:
            y = torch.as_tensor(labels).detach().cpu()
            require(y.dim() == 1 and len(y) == len(x), f"image set {name!r}: labels of shape {tuple(y.shape)} do "
                                                       f"not match {len(x)} images; give one label per image")
            require(not y.is_floating_point() and not y.is_complex() and y.dtype != torch.bool,
                    f"image set {name!r}: labels have dtype {y.dtype}; give integer class labels 0..K-1")
            y = y.to(torch.int64).contiguous()
            require(int(y.min()) >= 0, f"image set {name!r}: labels must be >= 0, got {int(y.min())}")
            self.labels = y
            self.num_classes = int(y.max()) + 1
            names = tuple(str(k) for k in range(self.num_classes)) if class_names is None else tuple(class_names)
            require(len(names) >= self.num_classes, f"image set {name!r}: {len(names)} class names for labels up to "
                                                    f"{self.num_classes - 1}; give one name per class")
            self.num_classes = len(names)
            self.class_names = names
        self._stats = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, flip={self.flip})")

    def _draw(self, n: int, seed: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row indices (n,), flip mask (n,) or None) from numpy Generator(seed)."""
        require(is_count(n), f"number of examples must be a positive integer, got {n!r}")
        rng, size = np.random.default_rng(seed), len(self)
        if not flip:
            return torch.from_numpy(rng.integers(0, size, size=int(n))), None
        j = rng.integers(0, 2 * size, size=int(n))
        return torch.from_numpy(j % size), torch.from_numpy(j >= size)

    def _take(self, idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        out = self.array[idx]
        if mask is not None and bool(mask.any()):
            out[mask] = out[mask].flip(-1)
        return out

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n images (n, C, H, W) drawn with replacement by Generator(seed), each flipped w.p. 1/2 if ``flip``."""
        return self._take(*self._draw(n, seed, self.flip))

    def sample_with_labels(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``sample(n, seed)``, their int64 labels (n,) or None): the same rows and flips as :meth:`sample`."""
        idx, mask = self._draw(n, seed, self.flip)
        return self._take(idx, mask), None if self.labels is None else self.labels[idx]

    def train_data(self, n: int | None = None, seed: int = 42) -> torch.Tensor:
        """``sample(n, seed)``; for n None every image once in order: the stored tensor, or with ``flip`` a new one
        whose images are each flipped w.p. 1/2 (Generator(seed))."""
        if n is not None:
            return self.sample(n, seed)
        if not self.flip:
            return self.array
        mask = torch.from_numpy(np.random.default_rng(seed).integers(0, 2, size=len(self)).astype(bool))
        return self._take(torch.arange(len(self)), mask)

    def eval_data(self, n: int | None = None, seed: int = 1) -> torch.Tensor:
        """The stored tensor if n is None, else n images drawn with replacement by Generator(seed), never flipped."""
        return self.array if n is None else self._take(*self._draw(n, seed, False))

    def stats(self) -> dict:
        """Statistics of all pixels (flips change none of them), as plain Python numbers.

        Keys: ``n``, ``dim`` (C*H*W), ``shape``, ``num_classes``, ``sigma_data`` (std of all pixel values,
        population), ``mean`` (pixel mean), ``rms`` (sqrt of mean squared pixel), ``min``, ``max``,
        ``mean_sq_norm`` (mean over images of ||x||^2), ``max_norm`` (max ||x||), ``channel_mean`` and
        ``channel_std`` (lists of C floats).
        """
        if self._stats is None:
            x, chunk = self.array, max(1, (1 << 22) // self.dim)  # ~32 MB of float64 per chunk
            c, count = x.shape[1], len(x) * x.shape[2] * x.shape[3]  # pixels per channel
            csum = torch.zeros(c, dtype=torch.float64)
            sq = torch.empty(len(x), dtype=torch.float64)
            lo, hi = float("inf"), float("-inf")
            for i in range(0, len(x), chunk):
                part = x[i: i + chunk]
                csum += part.sum((0, 2, 3))
                sq[i: i + chunk] = part.square().sum((1, 2, 3))
                a, b = torch.aminmax(part)
                lo, hi = min(lo, float(a)), max(hi, float(b))
            cmean = csum / count
            cdev = torch.zeros(c, dtype=torch.float64)  # sums of squared deviations from each channel's mean
            for i in range(0, len(x), chunk):
                cdev += (x[i: i + chunk] - cmean[None, :, None, None]).square().sum((0, 2, 3))
            mean = float(cmean.mean())
            var = float((cdev + count * (cmean - mean) ** 2).sum()) / (count * c)
            self._stats = {
                "n": len(x), "dim": self.dim, "shape": list(self.shape), "num_classes": self.num_classes,
                "sigma_data": math.sqrt(var), "mean": mean, "rms": math.sqrt(float(sq.mean()) / self.dim),
                "min": lo, "max": hi, "mean_sq_norm": float(sq.mean()), "max_norm": math.sqrt(float(sq.max())),
                "channel_mean": cmean.tolist(), "channel_std": (cdev / count).sqrt().tolist(),
            }
        return {k: list(v) if isinstance(v, list) else v for k, v in self._stats.items()}


def _from_uint8(u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) in 0..255 -> float64 tensor in [-1, 1] (x / 127.5 - 1), without big temporaries."""
    out = np.empty(u8.shape, dtype=np.float64)
    np.divide(u8, 127.5, out=out)
    out -= 1.0
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------- options


def parse_options(text: str, allowed: dict[str, str], spec: str) -> dict:
    """``"size=32&flip=1"`` -> ``{"size": 32, "flip": True}``; ``allowed`` maps option name -> kind
    (``"bool"``: 1/0/true/false/yes/no/on/off, ``"size"``: an integer 1..4096)."""
    opts: dict = {}
    for part in text.split("&"):
        key, sep, value = (s.strip() for s in part.partition("="))
        require(bool(key), f"data set {spec!r} has an empty option; write options as NAME?key=value&key=value")
        if key not in allowed:
            close = closest(key, allowed)
            hint = f"did you mean {close!r}? " if close is not None else ""
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
            raise DifflabError(f"unknown option {key!r} in data set {spec!r}: {hint}{takes}")
        require(key not in opts, f"option {key!r} is given twice in data set {spec!r}; give it once")
        require(bool(sep) and bool(value), f"option {key!r} in data set {spec!r} needs a value, e.g. {key}=1")
        if allowed[key] == "bool":
            v = value.lower()
            require(v in _TRUE | _FALSE, f"option {key}={value!r} in data set {spec!r} must be 1 or 0 (true/false)")
            opts[key] = v in _TRUE
        else:
            require(value.isdigit() and 1 <= int(value) <= MAX_SIZE,
                    f"option {key}={value!r} in data set {spec!r} must be an integer from 1 to {MAX_SIZE}")
            opts[key] = int(value)
    return opts


# --------------------------------------------------------------------------------------------- image folders


def _check_dir(path, what: str, fix: str) -> Path:
    require(isinstance(path, (str, os.PathLike)), f"{what} path must be a string or a path, got "
                                                  f"{type(path).__name__} ({fix})")
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as e:
        raise DifflabError(f"cannot access {p}: {short(e)} ({fix})") from e
    require(exists, f"no such folder or file: {p} ({fix})")
    return p if is_dir else None


def _supported_suffixes() -> tuple[str, ...]:
    from PIL import features

    return tuple(s for s in IMAGE_SUFFIXES if s != ".webp" or features.check("webp"))


def _find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (hidden files and folders skipped), sorted by their path parts."""
    suffixes = _supported_suffixes()

    def fail(err: OSError):
        raise DifflabError(f"cannot list {err.filename}: {short(err)} (check the folder's permissions)") from err

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in suffixes]
    return sorted(found, key=lambda f: f.relative_to(root).parts)


def _oriented_size(im) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: the decoder pass will report the file if it cannot be read
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _bad_image(f: Path | str, err: BaseException) -> DifflabError:
    return DifflabError(f"cannot read image {f}: {short(err)} (the file is corrupt or not an image; replace or "
                        f"remove it)")


def _decode(f, mode: str, size: int | None, where: Path | str | None = None) -> np.ndarray:
    """One image (a path or a binary file object) -> uint8 (H, W) or (H, W, 3), EXIF-oriented, center-cropped and
    resized if ``size``; errors name ``where`` (default ``f``)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(f) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE_MODES:  # 16-bit greyscale -> 8 bit
                wide = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
            if im.mode != mode:
                im = im.convert(mode)  # alpha is dropped, palettes and CMYK are expanded
            if size is not None:
                w, h = im.size
                s = min(w, h)
                box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
                im = im.crop(box) if s == size else im.resize((size, size), Image.Resampling.LANCZOS, box=box)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow raises many types on damaged files
        raise _bad_image(f if where is None else where, e) from e


def load_image_folder(path, size: int | None = None, flip: bool = False) -> ImageData:
    """Every image file under a folder (recursively, sorted) -> :class:`ImageData` (N, C, H, W) in [-1, 1].

    Images are RGB (C=3), or greyscale (C=1) when every file is greyscale; alpha is dropped. With ``size`` each
    image is center-cropped to a square and resized to (size, size) (Lanczos); without it all images must share
    one size. When every image sits in a subfolder, the sorted first-level subfolder names are the classes
    0..K-1 (``labels``, ``class_names``); otherwise the set is unlabelled.
    """
    from PIL import Image

    fix = "give a folder that holds .png, .jpg, .bmp or .webp images"
    root = _check_dir(path, "image folder", fix)
    require(root is not None, f"{Path(path)} is a file, not a folder ({fix}; for .npy/.npz arrays use images:PATH)")
    require(size is None or (is_count(size) and size <= MAX_SIZE),
            f"image size must be an integer from 1 to {MAX_SIZE} or None, got {size!r}")
    require(isinstance(flip, (bool, np.bool_)), f"flip must be True or False, got {flip!r}")
    files = _find_images(root)
    if not files:
        cifar = any((root / n).exists() for n in ("data_batch_1", "data_batch_1.bin", "cifar-10-batches-py",
                                                  "cifar-10-batches-bin"))
        hint = f"; it looks like CIFAR-10: use cifar10:{root}" if cifar else ""
        raise DifflabError(f"no images found in {root} (looked for {', '.join(_supported_suffixes())} files, "
                           f"recursively){hint}")
    modes, first = set(), None
    for f in files:  # headers only: sizes and modes are checked before any pixel is decoded
        try:
            with Image.open(f) as im:
                modes.add(im.mode)
                wh = _oriented_size(im)
        except Exception as e:
            raise _bad_image(f, e) from e
        if size is None:
            if first is None:
                first = (f, wh)
            require(wh == first[1], f"images in {root} differ in size: {first[0].relative_to(root)} is "
                                    f"{first[1][0]}x{first[1][1]} but {f.relative_to(root)} is {wh[0]}x{wh[1]} "
                                    f"(width x height); give a size to crop and resize them all, e.g. "
                                    f"folder:{root}?size=32 or load_image_folder(path, size=32)")
    mode = "L" if modes <= _GREY_MODES else "RGB"
    parts = [f.relative_to(root).parts for f in files]
    labelled = all(len(p) >= 2 for p in parts)
    class_names = tuple(sorted({p[0] for p in parts})) if labelled else None
    h, w = (size, size) if size is not None else (first[1][1], first[1][0])
    channels = 1 if mode == "L" else 3
    u8 = np.empty((len(files), channels, h, w), dtype=np.uint8)
    for i, f in enumerate(files):
        arr = _decode(f, mode, size)
        require(arr.shape[:2] == (h, w), f"image {f} decodes to {arr.shape[1]}x{arr.shape[0]}, not {w}x{h} as its "
                                         f"header said (the file looks damaged; replace or remove it)")
        u8[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    labels = None
    if labelled:
        index = {c: k for k, c in enumerate(class_names)}
        labels = torch.tensor([index[p[0]] for p in parts], dtype=torch.int64)
    name = root.resolve().name or "images"
    return ImageData(_from_uint8(u8), labels=labels, name=name, flip=flip, class_names=class_names)


# --------------------------------------------------------------------------------------------- image arrays


def _read_image_npz(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    fix = "the file looks corrupt; save it again"
    try:
        with open(p, "rb") as f:
            head = f.read(6)
            f.seek(0)
            require(head.startswith(b"\x93NUMPY") or head[:4] in (b"PK\x03\x04", b"PK\x05\x06"),
                    f"{p} is not a numpy file (no .npy or .npz signature; write it with numpy.save or savez)")
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                return loaded, None
            with loaded:
                files = list(loaded.files)
                key = next((k for k in ARRAY_KEYS if k in files), None)
                rest = [k for k in files if k not in LABEL_KEYS]
                if key is None:
                    require(len(rest) == 1, f"{p} holds arrays {sorted(files)} but none is named "
                                            f"{', '.join(ARRAY_KEYS)} (save the images under 'images', the "
                                            f"labels under 'labels')")
                    key = rest[0]
                label_key = next((k for k in LABEL_KEYS if k in files), None)
                return loaded[key], None if label_key is None else loaded[label_key]
    except DifflabError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DifflabError(f"{p} holds an object array (pickled Python objects), which difflab never unpickles "
                               f"(save numeric arrays instead)") from e
        raise DifflabError(f"cannot read {p}: {short(e)} ({fix})") from e
    except Exception as e:
        raise DifflabError(f"cannot read {p}: {short(e)} ({fix})") from e


def _to_nchw(arr: np.ndarray, p: Path) -> np.ndarray:
    layouts = "(N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1, 3, 4"
    require(arr.ndim in (3, 4), f"{p} holds an array of shape {arr.shape}; image arrays have shape {layouts}")
    if arr.ndim == 3:
        return arr[:, None]
    if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        return arr.transpose(0, 3, 1, 2)
    require(arr.shape[1] in (1, 3, 4), f"{p}: cannot tell the channel axis of shape {arr.shape}; image arrays "
                                       f"have shape {layouts}")
    return arr


def load_image_array(path, flip: bool = False, clip: bool = False) -> ImageData:
    """Images in a .npy / .npz file -> :class:`ImageData` (N, C, H, W) in [-1, 1].

    Shapes (N, H, W), (N, C, H, W) or (N, H, W, C), C in 1, 3, 4 (channels-last when the last axis is 1/3/4 and
    the second is not). uint8 (or integers within 0..255) map x -> x / 127.5 - 1; floats are kept as they are and
    must lie within [-1.5, 1.5], or with ``clip`` (a model's samples) are clipped to [-1, 1], as the FID protocol
    does. An .npz holds the images under ``images``/``data``/``x``/``samples`` (or as its only array) and optional
    int labels under ``labels`` or ``y``.
    """
    require(isinstance(flip, (bool, np.bool_)), f"flip must be True or False, got {flip!r}")
    fix = "give a .npy or .npz file of images"
    root = _check_dir(path, "image array", fix)
    p = Path(path)
    require(root is None, f"{p} is a folder, not an array file ({fix}; for a folder of images use folder:PATH)")
    require(p.suffix.lower() in (".npy", ".npz"), f"{p}: unsupported file extension {p.suffix or '(none)'!r} "
                                                 f"(save the images with numpy.save or numpy.savez)")
    arr, labels = _read_image_npz(p)
    kind = arr.dtype.kind
    require(kind in "iuf", f"{p} holds {arr.dtype} values; give uint8 pixels 0..255 or floats in [-1, 1]")
    x = _to_nchw(arr, p)
    require(x.size >= 1, f"{p} holds no images (array of shape {arr.shape}); give at least one")
    if kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        require(lo >= 0 and hi <= 255, f"{p} holds integers from {lo} to {hi}; give uint8 pixels 0..255 or floats "
                                       f"in [-1, 1]")
        images = _from_uint8(np.ascontiguousarray(x, dtype=np.uint8))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
        bad = ~torch.isfinite(images.reshape(len(images), -1)).all(1)
        require(not bool(bad.any()), f"{p}: {int(bad.sum())} of {len(images)} images contain NaN or inf (first: "
                                     f"image {int(bad.int().argmax())}); fix or drop them")
        if clip:
            images = images.clamp(-1, 1)
        lo, hi = float(images.min()), float(images.max())
        require(lo >= -MAX_ABS and hi <= MAX_ABS, f"{p} holds floats from {lo:.4g} to {hi:.4g}; scale them to "
                                                  f"[-1, 1] first (e.g. x / 127.5 - 1 for 0..255 pixels, 2 x - 1 "
                                                  f"for 0..1) or save uint8 pixels")
    y = None
    if labels is not None:
        require(labels.ndim == 1 and len(labels) == len(images) and labels.dtype.kind in "iu",
                f"{p}: labels of shape {labels.shape} and dtype {labels.dtype} do not match {len(images)} images; "
                f"save one integer label per image")
        require(len(labels) == 0 or int(labels.min()) >= 0, f"{p}: labels must be >= 0; use classes 0..K-1")
        y = torch.from_numpy(labels.astype(np.int64))
    return ImageData(images, labels=y, name=p.stem, flip=flip)


__all__ = ["ImageData", "load_image_array", "load_image_folder", "parse_options"]
