"""How far parallel samples land from their sequential twins (the same noise, the same chain): the pathwise error a
Picard tolerance buys, in units of the data's standard deviation."""

from __future__ import annotations

import torch


def pathwise_distance(x: torch.Tensor, x_seq: torch.Tensor, scale: float) -> dict:
    """Per sample, the RMS over coordinates of x - x_seq divided by ``scale`` (the data std); x, x_seq (n, *shape).
    Returns its mean, median and max over the samples."""
    if x.shape != x_seq.shape:
        raise ValueError(f"samples of shape {tuple(x.shape)} and {tuple(x_seq.shape)} cannot be paired")
    d = ((x.double() - x_seq.double()) ** 2).reshape(len(x), -1).mean(1).sqrt() / float(scale)
    return {"mean": float(d.mean()), "median": float(d.median()), "max": float(d.max())}
