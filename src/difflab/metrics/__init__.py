"""Sample-quality metrics: the unbiased Gaussian-kernel MMD^2 (here), Frechet distance, KID and feature extractors
(metrics.fid, metrics.classifier, metrics.features), likelihood (metrics.nll)."""

from difflab.metrics.mmd import DEFAULT_BANDWIDTH, default_bandwidths, mmd, mmd_sweep, select_bandwidth

__all__ = ["DEFAULT_BANDWIDTH", "default_bandwidths", "mmd", "mmd_sweep", "select_bandwidth"]
