"""Sample-quality metrics: the unbiased Gaussian-kernel MMD^2 and its bandwidth sweep."""

from difflab.metrics.mmd import DEFAULT_BANDWIDTH, default_bandwidths, mmd, mmd_sweep, select_bandwidth

__all__ = ["DEFAULT_BANDWIDTH", "default_bandwidths", "mmd", "mmd_sweep", "select_bandwidth"]
