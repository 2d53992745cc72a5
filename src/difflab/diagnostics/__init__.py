"""The papers' diagnostics: denoiser-error maps (CDL Fig. 1)."""

from difflab.diagnostics.error_map import ErrorMap, eps_error_map

__all__ = ["ErrorMap", "eps_error_map"]
