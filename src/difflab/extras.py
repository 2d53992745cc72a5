"""Optional integrations (pyproject extras): imported only when used, with a one-line error naming the extra."""

from __future__ import annotations

import importlib

from difflab.errors import DifflabError, short

# module -> the extra that installs it (a module not named here: its top-level package's, else its own name)
EXTRAS = {"diffusers": "diffusers", "submitit": "cluster", "torch.utils.tensorboard": "tensorboard", "wandb": "wandb"}


def require_module(module: str, needed_by: str | None = None):
    """Import an optional dependency, or fail in one line with the install command of its extra. ``needed_by``:
    the option that needs it (e.g. ``--log wandb``), which the message then names."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module, EXTRAS.get(module.split(".")[0], module))
        if needed_by is not None:
            raise DifflabError(f"{needed_by} needs the {extra} extra: pip install 'difflab[{extra}]' "
                               f"({type(e).__name__}: {short(e, 100)})") from None
        raise DifflabError(f"this needs the optional package {module.split('.')[0]!r} ({e.__class__.__name__}: "
                           f"{e}): install it with pip install -e '.[{extra}]'") from None
