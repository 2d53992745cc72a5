"""The names reports give study objectives and study samplers."""

from __future__ import annotations

from difflab.studies.common import SAMPLERS

OBJECTIVE_LABELS = {"dsm": "DSM (DDPM eps)", "itd": "ITD", "cdl": "CDL (ITD + CDL)", "cdl-ft": "DSM + CDL fine-tune",
                    "edm": "EDM", "stf": "EDM + STF (n 4096)", "sa2": "SA-2 (lambda 1)", "sa3": "SA-3 (lambda 0.3)",
                    "sa4": "SA-4 (lambda 0.2)", "fm": "FM (rectified flow)",
                    "fm-ot": "FM + OT (OT-CFM, blocks of 256)",
                    "fm-stf": "FM + STF (stable velocity, n 4096)", "fm-sa2": "FM + SA-2 (flow grid)"}
_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "heun": "Heun"}


def sampler_label(sampler: str, steps: int) -> str:
    """E.g. 'DDPM-1000', 'Heun-18', 'parallel DDPM-1000', 'parallel DDPM-1000, TAA + extrapolated start' from a
    study sampler and its step count."""
    chain, options, parallel = SAMPLERS[sampler]
    label = f"{'parallel ' if parallel is not None else ''}{_NAMES[chain]}-{steps}"
    how = [w for k, v, w in (("accel", "taa", "TAA"), ("init", "extrapolate", "extrapolated start"))
           if (parallel or {}).get(k) == v]
    clip = options.get("clip")
    return label + (f", {' + '.join(how)}" if how else "") + (f", x0 clipped to {clip:g}" if clip is not None else "")
