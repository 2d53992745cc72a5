"""An objective's random draws for a batch, kept apart from its computation.

``objective.draw(x0, generator)`` returns a dict of tensors whose leading dimension is the row (B); tensors of a
sub-batch (e.g. the few rows that get a CDL term) are named ``<group>_...`` and indexed by ``<group>_rows``.
Drawing for the whole batch first and computing afterwards lets a batch be split across processes, or into
chunks, and still see exactly the randomness of the unsplit batch.
"""

from __future__ import annotations

import torch


def slice_draws(draws: dict, lo: int, hi: int) -> dict:
    """The draws of rows lo..hi-1 (sub-batch rows re-indexed from 0)."""
    groups = [k[: -len("_rows")] for k in draws if k.endswith("_rows")]
    out = {}
    for g in groups:
        rows = draws[f"{g}_rows"]
        keep = (rows >= lo) & (rows < hi)
        out[f"{g}_rows"] = rows[keep] - lo
        for k, v in draws.items():
            if k.startswith(f"{g}_") and k != f"{g}_rows":
                out[k] = v[keep]
    for k, v in draws.items():
        if not any(k.startswith(f"{g}_") for g in groups):
            out[k] = v[lo:hi] if torch.is_tensor(v) and v.ndim > 0 else v
    return out
