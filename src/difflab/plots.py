"""Figures (matplotlib, Agg backend: works without a display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


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
