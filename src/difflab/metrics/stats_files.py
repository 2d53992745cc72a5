"""Feature-statistics files: ``mu`` (D,) and ``sigma`` (D, D) in float64 in an ``.npz`` (the keys of EDM's
reference files), optionally with a JSON ``meta`` entry; written atomically, read without pickles."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from difflab.atomic import write_bytes_atomic
from difflab.errors import DifflabError, require, short
from difflab.metrics.arrays import check_stats


def save_stats(path, mu, sigma, **meta) -> Path:
    """Write ``mu`` (D,) and ``sigma`` (D, D) as float64 to the .npz ``path`` (exactly that name), atomically.

    ``meta`` (JSON-serialisable values, e.g. ``dataset="digits", n=1797``) goes under the key ``meta`` as a
    JSON string; read it back with :func:`load_stats_meta`. Returns the path.
    """
    mu, sigma = check_stats(mu, sigma, "the")
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
        return check_stats(arrays["mu"], arrays["sigma"], str(p))
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


__all__ = ["load_stats", "load_stats_meta", "save_stats"]
