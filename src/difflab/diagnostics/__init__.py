"""The papers' diagnostics: denoiser-error maps (CDL Fig. 1) and the far-field gain (parallel sampling)."""

from difflab.diagnostics.error_map import ErrorMap, eps_error_map
from difflab.diagnostics.far_field import FarField, far_field_gain

__all__ = ["ErrorMap", "FarField", "eps_error_map", "far_field_gain"]
