"""Optional integrations (pyproject extras): imported only when used, with a one-line error naming the extra."""

from __future__ import annotations

import importlib

from difflab.errors import DifflabError

EXTRAS = {"diffusers": "diffusers"}  # module -> the extra that installs it


def require_module(module: str):
    """Import an optional dependency, or fail in one line with the install command of its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module.split(".")[0], module)
        raise DifflabError(f"this needs the optional package {module.split('.')[0]!r} ({e.__class__.__name__}: "
                           f"{e}): install it with pip install -e '.[{extra}]'") from None
