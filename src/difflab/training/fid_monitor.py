"""Periodic FID during training: ``train.fid_n`` EMA samples (the preview sampler, seeds 0..n-1) scored against the
reference statistics of ``difflab fid ref`` (``train.fid_ref``), every ``train.fid_every`` steps, into log.jsonl.

The features follow the reference file (its ``features`` entry; files without one, such as the EDM reference
statistics, are Inception). Everything is checked when the run starts, so a wrong path fails before training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.errors import require
from difflab.metrics.features import feature_extractor, metric_name
from difflab.metrics.frechet import feature_statistics, frechet_distance
from difflab.metrics.stats_files import load_stats, load_stats_meta
from difflab.training.previews import preview_samples


class FIDMonitor:
    """Scores a denoiser's samples against ``ref`` (an .npz of mu, sigma); ``__call__`` returns a record."""

    def __init__(self, ref: str | Path, n: int, inception: str | None = None, batch_size: int = 256,
                 shape: tuple[int, ...] | None = None, device: str | torch.device = "cpu"):
        require(ref is not None, "train.fid_every needs train.fid_ref: reference statistics from 'difflab fid ref'")
        require(shape is None or len(shape) == 3,
                f"train.fid_every needs image data (C, H, W); this data has examples of shape {shape}")
        self.mu, self.sigma = load_stats(ref)
        self.features = load_stats_meta(ref).get("features") or "inception"
        self.extract = feature_extractor(self.features, inception, device=device)
        self.name, self.n, self.batch_size = metric_name(self.features), n, batch_size

    @torch.no_grad()
    def __call__(self, run) -> dict:
        """The record for a :class:`~difflab.runs.Run` (the trainer's live EMA): its preview sampler's samples."""
        x = preview_samples(run, self.n, self.batch_size)
        feats = self.extract.extract(x.clamp(-1, 1))
        require(feats.shape[1] == self.mu.shape[0], f"the {self.features} features have {feats.shape[1]} "
                f"dimensions but the reference has {self.mu.shape[0]}: make it with the same features")
        return {self.name: frechet_distance(*feature_statistics(feats), self.mu, self.sigma), "fid_n": self.n}
