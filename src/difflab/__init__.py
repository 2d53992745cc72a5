"""difflab: diffusion training objectives (DSM, ITD, CDL, STF, SA) and fast samplers, sequential and parallel.

Every component meets at one interface, the denoiser ``D(x, sigma) -> x0_hat`` in sigma-space
(``x = x0 + sigma * n``): objectives train denoisers, samplers integrate them, metrics probe them.
"""

from difflab.errors import DifflabError

__version__ = "0.1.0"
__all__ = ["DifflabError", "__version__"]
