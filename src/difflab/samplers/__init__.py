"""Samplers: DDPM ancestral, DDIM(eta), EDM Heun/Euler, DPM-Solver++ 2M and the flow-matching Euler/Heun
(sequential), each a :class:`Chain` of steps.

``make_chain(name, denoiser, **options)`` builds one by name; ``sample_chain`` runs it with per-sample seeds
(``sample_by_batches``: its batches dealt to the processes under torchrun). A conditional denoiser's row-aligned
condition (``cond``, e.g. ``{"class_labels": y}``) rides with the samples' noise and reaches every denoiser call as
``D(x, sigma, **cond)``.
"""

from __future__ import annotations

import inspect
from functools import partial

from difflab.errors import DifflabError, suggest
from difflab.samplers.base import Chain, Noise, Placement, SampleStats, draw_noise, run_chain
from difflab.samplers.ddpm import ddim_chain, ddpm_chain
from difflab.samplers.dpmpp import dpmpp_chain, dpmpp_edm_chain
from difflab.samplers.edm import heun_chain
from difflab.samplers.flow import flow_euler_chain, flow_heun_chain
from difflab.samplers.picard import PicardOptions, PicardResult, PicardWarning, picard
from difflab.samplers.sampling import sample_by_batches, sample_chain

SEQUENTIAL = {
    "ddpm": ddpm_chain,
    "ddim": ddim_chain,
    "heun": heun_chain,
    "euler": partial(heun_chain, euler=True),
    "dpmpp-2m": dpmpp_chain,
    "dpmpp-2m-edm": dpmpp_edm_chain,
    "flow-euler": flow_euler_chain,
    "flow-heun": flow_heun_chain,
}


def make_chain(name: str, denoiser, **options) -> Chain:
    """A sequential sampler by name with its options (unknown names and options are refused with a hint)."""
    if name not in SEQUENTIAL:
        hint = suggest(name, [*SEQUENTIAL, *(f"picard-{s}" for s in SEQUENTIAL)])
        raise DifflabError(f"unknown sampler {name!r}{hint}: use one of {', '.join(SEQUENTIAL)}, or picard-<one of "
                           "them> for its parallel form")
    fn = SEQUENTIAL[name]
    params = inspect.signature(fn).parameters
    for key in options:
        if key not in params or key == "denoiser":
            known = [p for p in params if p not in ("denoiser", "euler", "heun")]
            # listed: what a user chooses; not the DDPM schedule, which a run supplies (no flag; Run refuses one)
            allowed = [p for p in known if p != "schedule"]
            raise DifflabError(f"sampler {name!r} has no option {key!r}{suggest(key, known)}: its options are "
                               f"{', '.join(allowed)}")
    return fn(denoiser, **options)


__all__ = [
    "Chain",
    "Noise",
    "SampleStats",
    "SEQUENTIAL",
    "ddim_chain",
    "ddpm_chain",
    "dpmpp_chain",
    "dpmpp_edm_chain",
    "draw_noise",
    "flow_euler_chain",
    "flow_heun_chain",
    "heun_chain",
    "make_chain",
    "picard",
    "PicardOptions",
    "PicardResult",
    "PicardWarning",
    "Placement",
    "run_chain",
    "sample_by_batches",
    "sample_chain",
]
