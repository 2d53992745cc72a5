"""Training objectives, all with one call shape: ``objective(D, x0, generator) -> per-example loss (B,)``.

``OBJECTIVES`` is the one registry: a class subclassing :class:`Objective` and one line here make an objective
trainable by name (``difflab train --objective NAME``) and listed in ``difflab train --help``.
"""

from __future__ import annotations

import textwrap

from difflab.errors import DifflabError, suggest
from difflab.objectives.base import Objective
from difflab.objectives.cdl import CDLLoss
from difflab.objectives.dsm import DSMEps, EDMLoss, SigmaWeighted, VELoss, VPLoss
from difflab.objectives.fm import FlowMatching
from difflab.objectives.itd import ITDLoss
from difflab.objectives.sa import SALoss
from difflab.objectives.stf import STFLoss
from difflab.objectives.weighting import WEIGHTINGS, LogVarHead
from difflab.schedules import DDPMSchedule

OBJECTIVES: dict[str, type[Objective]] = {"dsm": DSMEps, "edm": EDMLoss, "vp": VPLoss, "ve": VELoss, "itd": ITDLoss,
                                          "cdl": CDLLoss, "stf": STFLoss, "sa": SALoss, "fm": FlowMatching}


def build_objective(name: str, options: dict | None = None, schedule: DDPMSchedule | None = None,
                    sigma_data: float | None = None, data=None) -> Objective:
    """An objective by name with its options; unknown names and options are refused with a hint.

    ``schedule`` goes to objectives that use the DDPM schedule, ``sigma_data`` to those that take it (unless the
    options set it); ``data`` (the training set, (N, *shape)) fits objectives that need data statistics (ITD's
    Gaussian reference) and are not fitted yet.
    """
    options = dict(options or {})
    if name not in OBJECTIVES:
        raise DifflabError(f"unknown objective {name!r}{suggest(name, OBJECTIVES)}: use one of {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    allowed = cls.accepted_options(options)  # what objective.options may set (STF: also its base's)
    for key in options:
        if key not in allowed:
            raise DifflabError(f"objective {name!r} has no option {key!r}{suggest(key, allowed)}: its options are "
                               f"{', '.join(allowed)}")
    if cls.uses_schedule and schedule is not None:
        options["schedule"] = schedule
    if cls.uses_sigma_data and sigma_data is not None:
        options.setdefault("sigma_data", sigma_data)
    try:
        obj = cls(**options)
    except TypeError as e:
        raise DifflabError(f"objective {name!r}: bad option value ({e})") from None
    if cls.needs_data and data is not None and not obj.fitted:
        obj.fit(data)
    return obj


def objectives_help(width: int = 116) -> str:
    """The registered objectives, one ``help`` entry each, wrapped to ``width`` (for ``difflab train --help``)."""
    pad = max(len(name) for name in OBJECTIVES) + 2
    lines = []
    for name, cls in OBJECTIVES.items():
        text = (cls.help or cls.__name__).replace(" | ", "\xa0|\xa0")  # no line break inside "a | b" choices
        lines.append(textwrap.fill(text, width, initial_indent=f"  {name:<{pad}} ", subsequent_indent=" " * (pad + 3),
                                   break_on_hyphens=False, break_long_words=False).replace("\xa0", " "))
    return "\n".join(lines)


__all__ = ["OBJECTIVES", "WEIGHTINGS", "CDLLoss", "DSMEps", "EDMLoss", "FlowMatching", "ITDLoss", "LogVarHead",
           "Objective", "SALoss", "STFLoss", "SigmaWeighted", "VELoss", "VPLoss", "build_objective", "objectives_help"]
