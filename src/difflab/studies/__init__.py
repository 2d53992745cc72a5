"""Studies: one command reproduces a paper's experiment and writes report.md, results.json and figures."""

from __future__ import annotations

from difflab.errors import DifflabError, suggest
from difflab.studies.common import SAMPLERS, StudyOptions


def _dino(opts):
    from difflab.studies import dino

    return dino.run(opts)


def _gmm1d(opts):
    from difflab.studies import gmm1d

    return gmm1d.run(opts)


def _variance(opts):
    from difflab.studies import variance

    return variance.run(opts)


def _gap(opts):
    from difflab.studies import gap

    return gap.run(opts)


def _digits(opts):
    from difflab.studies import digits

    return digits.run(opts)


STUDIES = {"dino": _dino, "gmm1d": _gmm1d, "variance": _variance, "gap": _gap, "digits": _digits}


def run_study(name: str, opts: StudyOptions):
    """Run study ``name``; returns the path of its report.md."""
    if name not in STUDIES:
        raise DifflabError(f"unknown study {name!r}{suggest(name, STUDIES)}: use one of {', '.join(STUDIES)}")
    return STUDIES[name](opts)


__all__ = ["SAMPLERS", "STUDIES", "StudyOptions", "run_study"]
