"""The base of every training objective: one call shape and the facts the trainer, the CLI and the models read.

``loss = objective(D, x0, generator) -> (B,)``: per-example losses summed over dimensions (the trainer takes the
batch mean); ``D`` is a denoiser (difflab.denoisers), ``x0`` is (B, *shape). It is ``loss(D, x0, draw(x0,
generator))``: the randomness is drawn for the whole batch first (see draws.py), so a batch can be split after it.
The draws come from the CPU generator and are moved to x0's device (the network's), where the loss is computed.

A new objective subclasses :class:`Objective`, defines ``draw`` and ``loss``, sets the class attributes that apply
and is registered with one line in ``difflab.objectives.OBJECTIVES``; ``difflab train --objective NAME`` and
``difflab train --help`` then know it.
"""

from __future__ import annotations

import inspect

import torch

from difflab.devices import to_device
from difflab.errors import require


class Objective:
    """A training objective: ``draw(x0, generator) -> dict`` then ``loss(D, x0, draws) -> (B,)``.

    Class attributes (read by ``build_objective``, the trainer, ``models.precond_name`` and the CLI):
        precond: the preconditioning it trains by default: eps, eps-continuous, vp, ve or edm ("edm").
        uses_schedule: it takes the run's DDPM schedule as ``schedule=`` (False).
        uses_sigma_data: it takes the data's ``sigma_data=`` (False).
        needs_data: it is fitted to training-data statistics by ``fit(x)`` before use (False).
        reference_size: references per process the trainer draws for it (0; STF sets it from its option). Above 0
            its ``loss`` also takes ``reference=`` (n, *shape), a reference batch whose head is the minibatch; at 0
            the objective refuses one (see ``uses_reference``).
        help: one line for ``difflab train --help``: what it is and its options with their defaults ("").
    """

    precond = "edm"
    uses_schedule = False
    uses_sigma_data = False
    needs_data = False
    reference_size = 0
    help = ""

    @property
    def uses_reference(self) -> bool:
        """Whether ``loss`` takes ``reference=``: reference_size > 0."""
        return self.reference_size > 0

    @property
    def fitted(self) -> bool:
        """False only while an objective that needs data has not been fitted (those override this)."""
        return not self.needs_data

    def fit(self, x: torch.Tensor) -> Objective:
        """Fit to training data x (N, *shape); a no-op unless the objective needs data. Returns self."""
        return self

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:  # pragma: no cover
        """The batch's randomness: tensors with leading dimension B (see draws.py)."""
        raise NotImplementedError

    def loss(self, D, x0: torch.Tensor, draws: dict) -> torch.Tensor:  # pragma: no cover
        """Per-example losses (B,) of denoiser D on x0 (B, *shape) with the given draws."""
        raise NotImplementedError

    def __call__(self, D, x0: torch.Tensor, generator: torch.Generator | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        """loss(D, x0, draw(x0, generator)), (B,), on x0's device; ``reference`` only for objectives that use one."""
        draws = to_device(self.draw(x0, generator), x0.device)
        if not self.uses_reference:
            require(reference is None, f"objective {type(self).__name__} takes no reference batch: "
                                       "only those with a reference_size (STF) do")
            return self.loss(D, x0, draws)
        return self.loss(D, x0, draws, reference=reference)

    @classmethod
    def option_names(cls, options: dict | None = None) -> list[str]:
        """The keyword options ``objective.options`` may set: the constructor's parameters but ``schedule``."""
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.name != "schedule" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def precond_for(cls, options: dict | None = None) -> str:
        """The preconditioning a model trained with these options gets by default (``precond``)."""
        return cls.precond
