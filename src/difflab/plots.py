"""Figures (matplotlib, Agg backend: works without a display) and PNG image grids (:func:`save_image_grid`)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from difflab.atomic import write_bytes_atomic  # noqa: E402
from difflab.data.files import is_count  # noqa: E402
from difflab.errors import DifflabError, require, short  # noqa: E402


def scatter_vs_data(samples, data, path: str | Path, title: str = "samples") -> Path:
    """Side-by-side scatter plots of 2-D samples and reference data (1-D: histograms), saved as PNG."""
    s = torch.as_tensor(samples).reshape(len(samples), -1).double().numpy()
    d = torch.as_tensor(data).reshape(len(data), -1).double().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    both = torch.from_numpy(d if len(d) else s)
    lo, hi = both.quantile(0.001, dim=0).numpy(), both.quantile(0.999, dim=0).numpy()
    pad = 0.15 * (hi - lo)
    for ax, pts, name in ((axes[0], d, f"data ({len(d)})"), (axes[1], s, f"{title} ({len(s)})")):
        if pts.shape[1] == 1:
            ax.hist(pts[:, 0], bins=80, density=True, color="C0" if ax is axes[0] else "C1")
            ax.set_xlabel("x")
            ax.set_ylabel("density")
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        else:
            ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="C0" if ax is axes[0] else "C1")
            ax.set_xlabel("x1")
            ax.set_ylabel("x2")
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_aspect("equal", adjustable="box")
        ax.set_title(name, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _label_panel(ax, i: int, j: int, r, c, row_labels, col_labels, titles, row_size: int) -> None:
    """Panel (i, j) of a table (row r, column c; c None: the data column): no ticks, column titles on the first
    row, row labels (font size ``row_size``) on the first column, ``titles[(r, c)]`` under the panel."""
    ax.set_xticks([])
    ax.set_yticks([])
    if i == 0:
        ax.set_title("data" if c is None else (col_labels or {}).get(c, c), fontsize=9)
    if j == 0:
        ax.set_ylabel((row_labels or {}).get(r, r), fontsize=row_size)
    if c is not None and titles and (r, c) in titles:
        ax.set_xlabel(titles[(r, c)], fontsize=8)


def sample_grid(panels: dict, rows: list[str], cols: list[str], data, path, row_labels=None, col_labels=None,
                titles: dict | None = None) -> Path:
    """A grid of 2-D scatter plots: ``panels[(row, col)]`` is an (n, 2) array; a first column shows ``data``.
    ``titles[(row, col)]`` is printed under each panel's column title (e.g. its MMD)."""
    d = torch.as_tensor(data).double().numpy()
    lo, hi = d.min(0), d.max(0)
    pad = 0.25 * (hi - lo)
    fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(2.6 * (len(cols) + 1), 2.6 * len(rows)),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate([None, *cols]):
            ax = axes[i][j]
            pts = d if c is None else torch.as_tensor(panels[(r, c)]).double().numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color="C0" if c is None else "C1", rasterized=True)
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_aspect("equal", adjustable="box")
            _label_panel(ax, i, j, r, c, row_labels, col_labels, titles, row_size=10)
    fig.tight_layout()
    return _save(fig, path)


def line_plot(series: dict, path, xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              hlines: dict | None = None) -> Path:
    """One line per label: ``series[label] = (x, y)``; ``hlines[label] = y`` draws dashed reference levels."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, (label, (x, y)) in enumerate(series.items()):
        ax.plot(x, y, label=label, color=f"C{i}", lw=1.5)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, ls="--", lw=1, color=f"C{i + len(series)}", label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def small_multiples(series: dict, path, xlabel: str, ylabel: str, logy: bool = False, logx: bool = False) -> Path:
    """One panel per key: ``series[panel] = {label: (x, y)}`` (e.g. loss curves per objective, one line a seed)."""
    n = len(series)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], series.items(), strict=True):
        for i, (label, (x, y)) in enumerate(lines.items()):
            ax.plot(x, y, label=label, color=f"C{i}", lw=1.2)
        if logy and all(min(y) > 0 for _, y in lines.values()):  # a loss that goes negative (ITD, CDL): linear
            ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def error_heatmaps(maps: dict, path, paths: dict | None = None, picard_paths: dict | None = None,
                   ncols: int = 2) -> Path:
    """One heat map per label of log10 |eps error| over (t, x_t); ``maps[label]`` is an ErrorMap. ``paths[label]``
    = (t, states (K_t, M)) sequential trajectories and ``picard_paths[label]`` a list of (t, states, legend name)
    Picard iterates (earliest first) are drawn over it."""
    import numpy as np

    n = len(maps)
    rows = -(-n // ncols)
    fig, axes = plt.subplots(rows, min(n, ncols), figsize=(5.4 * min(n, ncols), 4.0 * rows), squeeze=False)
    im = None
    for k, (label, m) in enumerate(maps.items()):
        ax = axes[k // ncols][k % ncols]
        z = np.log10(m.error.numpy().T + 1e-6)
        im = ax.imshow(z, origin="lower", aspect="auto", cmap="magma_r", vmin=-3, vmax=1,
                       extent=[float(m.t[0]), float(m.t[-1]), float(m.x[0]), float(m.x[-1])])
        iterates = (picard_paths or {}).get(label, [])
        for i, (t, xs, name) in enumerate(iterates):
            shade = plt.cm.winter(i / max(1, len(iterates) - 1))
            ax.plot(t, xs, color=shade, lw=0.7, alpha=0.8)
            ax.plot([], [], color=shade, lw=1.5, label=name)
        if paths and label in paths:
            t, xs = paths[label]
            ax.plot(t, xs, color="white", lw=1.1)
            ax.plot([], [], color="white", lw=1.5, label="sequential")
        ax.set_xlim(float(m.t[-1]), 0)  # sampling runs from noise (left) to data (right)
        ax.set_ylim(float(m.x[0]), float(m.x[-1]))
        if k // ncols == rows - 1 or k + ncols >= n:
            ax.set_xlabel("DDPM step t  (noise -> data)")
        if k % ncols == 0:
            ax.set_ylabel("x_t")
        else:
            ax.tick_params(labelleft=False)
        ax.set_title(label, fontsize=10)
        if k == 0:
            leg = ax.legend(fontsize=7, loc="upper right", facecolor="0.85")
            leg.get_frame().set_alpha(0.9)
    for k in range(n, rows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.subplots_adjust(hspace=0.25, wspace=0.12)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="log10 |eps_theta - eps*|", shrink=0.8)
    return _save(fig, path)


def classification_plot(results: dict, path) -> Path:
    """Accuracy and cross-entropy of implied noise classifiers against zeta: ``results[label]`` is a list of
    ``{"zeta", "accuracy", "cross_entropy"}``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (label, rows) in enumerate(results.items()):
        z = [r["zeta"] for r in rows]
        axes[0].plot(z, [r["accuracy"] for r in rows], "o-", color=f"C{i}", label=label, ms=3)
        axes[1].plot(z, [r["cross_entropy"] for r in rows], "o-", color=f"C{i}", label=label, ms=3)
    axes[0].axhline(0.5, ls="--", color="0.5", lw=1, label="chance")
    axes[1].axhline(1.0, ls="--", color="0.5", lw=1, label="chance (1 bit)")
    for ax, name in zip(axes, ("accuracy", "cross-entropy (bits)"), strict=True):
        ax.set_xlabel("zeta (log-SNR of the added noise; larger = less noise)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("clean vs noised to zeta: the classifier implied by each denoiser", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def variance_plot(curves: dict, path) -> Path:
    """One panel per data set: V_DSM and V_STF(n) against sigma, normalised to max V_DSM (log-log), STF bias dashed.
    ``curves[name]`` is a TargetVariance.to_dict()."""
    import numpy as np

    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], curves.items(), strict=True):
        sig = np.asarray(c["sigma"])
        top = max(c["v_dsm"])
        ax.plot(sig, np.asarray(c["v_dsm"]) / top, color="k", lw=2, label="V_DSM")
        for i, (k, v) in enumerate(c["v_stf"].items()):
            ax.plot(sig, np.asarray(v) / top, color=f"C{i}", lw=1.4, label=f"V_STF, n = {k}")
            ax.plot(sig, np.asarray(c["bias_stf"][k]) / top, color=f"C{i}", lw=1, ls="--",
                    label=f"STF bias, n = {k}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(1e-5, 2)
        ax.set_xlabel("noise level sigma")
        ax.set_ylabel("target variance / max V_DSM")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def image_panels(panels: dict, rows: list[str], cols: list[str], data, path, row_labels=None, col_labels=None,
                 titles: dict | None = None, ncol: int = 8) -> Path:
    """A table of image grids: ``panels[(row, col)]`` holds images (N, C, H, W) in [-1, 1]; the first column shows
    ``data`` (real images). ``titles[(row, col)]`` goes under a panel (e.g. its Frechet distance)."""
    fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(2.8 * (len(cols) + 1), 2.9 * len(rows)),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate([None, *cols]):
            ax = axes[i][j]
            tile = tile_images(torch.as_tensor(data if c is None else panels[(r, c)]), ncol)
            ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=255,
                      interpolation="nearest")
            _label_panel(ax, i, j, r, c, row_labels, col_labels, titles, row_size=9)
    fig.tight_layout()
    return _save(fig, path)


def tile_images(x: torch.Tensor, cols: int, scale: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] (clamped) -> one uint8 (rows (H s + 1) - 1, cols (W s + 1) - 1, C) array:
    ``cols`` images a row, each pixel repeated ``scale`` times, 1-pixel white gaps."""
    n, c, h, w = x.shape
    rows = math.ceil(n / cols)
    th, tw = h * scale, w * scale
    u8 = ((x.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().transpose(0, 2, 3, 1)
    u8 = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    canvas = np.full((rows * th + rows - 1, cols * tw + cols - 1, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[r * (th + 1): r * (th + 1) + th, k * (tw + 1): k * (tw + 1) + tw] = u8[i]
    return canvas


def save_image_grid(images, path, nrow: int | None = None, *, min_tile: int = 32) -> Path:
    """Write images (N, C, H, W) in [-1, 1] (clamped), C in 1, 3, 4, as one PNG grid; returns the path.

    ``nrow`` images per row (default ceil(sqrt(N))); tiles are upscaled by the smallest integer factor that makes
    each side at least ``min_tile`` pixels (default 32) and separated by 1-pixel white gaps. The file is written
    to a temporary name in the same folder and moved into place, so readers never see half a PNG.
    """
    from PIL import Image

    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach()
    require(x.dim() == 4 and x.shape[1] in (1, 3, 4) and len(x) >= 1 and x.shape[2] >= 1 and x.shape[3] >= 1,
            f"image grid needs images of shape (N, C, H, W) with C in 1, 3, 4, got {tuple(x.shape)}")
    x = x.to(device="cpu", dtype=torch.float64)
    bad = int((~torch.isfinite(x.reshape(len(x), -1)).all(1)).sum())
    require(bad == 0, f"{bad} of {len(x)} images for grid {path} contain NaN or inf; check the sampler's output")
    require(nrow is None or (is_count(nrow)), f"nrow must be a positive integer or None, got {nrow!r}")
    require(is_count(min_tile), f"min_tile must be a positive integer, got {min_tile!r}")
    p = Path(path)
    require(p.suffix.lower() == ".png", f"image grid path {p} must end in .png")
    n, c, h, w = x.shape
    cols = min(int(nrow) if nrow is not None else math.ceil(math.sqrt(n)), n)
    canvas = tile_images(x, cols, scale=max(1, math.ceil(min_tile / min(h, w))))
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # L, RGB or RGBA by shape
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        return write_bytes_atomic(p, buf.getvalue())
    except OSError as e:
        raise DifflabError(f"cannot write image grid {p}: {short(e)} (check the folder, the disk and the path)"
                           ) from e
