"""The papers' diagnostics: denoiser-error maps (CDL Fig. 1), noise classification (CDL) and the far-field gain
(parallel sampling)."""

from difflab.diagnostics.error_map import ErrorMap, eps_error_map
from difflab.diagnostics.far_field import FarField, far_field_gain
from difflab.diagnostics.noise_classification import noise_classification

__all__ = ["ErrorMap", "FarField", "eps_error_map", "far_field_gain", "noise_classification"]
