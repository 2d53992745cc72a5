"""Sample-quality metrics: the unbiased Gaussian-kernel MMD^2 (here), Frechet distance, KID and feature extractors
(metrics.fid, metrics.classifier, metrics.features), likelihood (metrics.nll), and the pathwise distance of
parallel samples to their sequential twins (metrics.pathwise)."""

from difflab.metrics.mmd import DEFAULT_BANDWIDTH, default_bandwidths, mmd, mmd_sweep, select_bandwidth
from difflab.metrics.pathwise import pathwise_distance

__all__ = ["DEFAULT_BANDWIDTH", "default_bandwidths", "mmd", "mmd_sweep", "pathwise_distance", "select_bandwidth"]
