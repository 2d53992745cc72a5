"""Training objectives, all with one call shape: ``objective(D, x0, generator) -> per-example loss (B,)``."""

from __future__ import annotations

import difflib
import inspect

from difflab.errors import DifflabError
from difflab.objectives.cdl import CDLLoss
from difflab.objectives.dsm import DSMEps, EDMLoss, SigmaWeighted, VELoss, VPLoss
from difflab.objectives.itd import ITDLoss
from difflab.objectives.sa import SALoss
from difflab.objectives.stf import STF_BASES, STFLoss
from difflab.schedules import DDPMSchedule

OBJECTIVES = {"dsm": DSMEps, "edm": EDMLoss, "vp": VPLoss, "ve": VELoss, "itd": ITDLoss, "cdl": CDLLoss,
              "stf": STFLoss, "sa": SALoss}


def objective_options(name: str, options: dict | None = None) -> list[str]:
    """The keyword options an objective accepts (what ``objective.options`` may set); STF also takes its base's."""
    if name == "stf":
        base = (options or {}).get("base", "edm")
        return ["base", "reference_size", *(objective_options(base) if base in STF_BASES else [])]
    params = inspect.signature(OBJECTIVES[name]).parameters
    return [p for p in params if p not in ("schedule", "options")]


def build_objective(name: str, options: dict | None = None, schedule: DDPMSchedule | None = None,
                    sigma_data: float | None = None, data=None):
    """An objective by name with its options; unknown names and options are refused with a hint.

    ``data`` (the training set, (N, *shape)) fits objectives that need data statistics (ITD's Gaussian reference).
    """
    options = dict(options or {})
    if name not in OBJECTIVES:
        close = difflib.get_close_matches(name, list(OBJECTIVES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DifflabError(f"unknown objective {name!r}{hint}: use one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    allowed = objective_options(name, options)
    for key in options:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise DifflabError(f"objective {name!r} has no option {key!r}{extra}: its options are {', '.join(allowed)}")
    params = inspect.signature(cls).parameters
    if cls in (DSMEps, STFLoss, SALoss) and schedule is not None:  # the DDPM schedule (VPLoss has its own)
        options["schedule"] = schedule
    if "sigma_data" in params and sigma_data is not None:
        options.setdefault("sigma_data", sigma_data)
    try:
        obj = cls(**options)
    except TypeError as e:
        raise DifflabError(f"objective {name!r}: bad option value ({e})") from None
    if getattr(obj, "needs_data", False) and data is not None and getattr(obj, "lam", None) is None:
        obj.fit(data)
    return obj


__all__ = ["OBJECTIVES", "CDLLoss", "DSMEps", "EDMLoss", "ITDLoss", "SALoss", "STFLoss", "SigmaWeighted",
           "VELoss", "VPLoss", "build_objective", "objective_options"]
