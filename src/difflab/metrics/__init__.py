"""Sample-quality metrics: the unbiased Gaussian-kernel MMD^2 (here); the Frechet distance (metrics.frechet), KID
(metrics.kid), statistics files (metrics.stats_files) and feature extractors (metrics.extractors, the Inception one
in metrics.inception_extractor with its source and trust policy in metrics.inception_source, metrics.classifier,
metrics.features by name); likelihood (metrics.nll); and the pathwise distance of parallel samples to their
sequential twins (metrics.pathwise)."""

from difflab.metrics.mmd import DEFAULT_BANDWIDTH, default_bandwidths, mmd, mmd_sweep, select_bandwidth
from difflab.metrics.pathwise import pathwise_distance

__all__ = ["DEFAULT_BANDWIDTH", "default_bandwidths", "mmd", "mmd_sweep", "pathwise_distance", "select_bandwidth"]
