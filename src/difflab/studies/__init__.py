"""Studies: one command reproduces a paper's experiment and writes report.md, results.json and figures."""

from __future__ import annotations

import importlib

from difflab.errors import DifflabError, suggest
from difflab.studies.common import SAMPLERS, StudyOptions

# study name -> its module in difflab.studies, which defines run(opts) -> report path (imported when run)
STUDIES = {"dino": "dino", "gmm1d": "gmm1d", "variance": "variance", "gap": "gap", "digits": "digits",
           "guidance": "guidance", "flow": "flow", "autoguide": "autoguide", "phema": "phema"}


def run_study(name: str, opts: StudyOptions):
    """Run study ``name``; returns the path of its report.md."""
    if name not in STUDIES:
        raise DifflabError(f"unknown study {name!r}{suggest(name, STUDIES)}: use one of {', '.join(STUDIES)}")
    return importlib.import_module(f"difflab.studies.{STUDIES[name]}").run(opts)


__all__ = ["SAMPLERS", "STUDIES", "StudyOptions", "run_study"]
