"""The base of every training objective: one call shape and the facts the trainer, the CLI and the models read.

``loss = objective(D, x0, generator) -> (B,)``: per-example losses summed over dimensions (the trainer takes the
batch mean); ``D`` is a denoiser (difflab.denoisers), ``x0`` is (B, *shape). It is ``loss(D, x0, draw(x0,
generator))``: the randomness is drawn for the whole batch first (see draws.py), so a batch can be split after it.
The draws come from the CPU generator and are moved to x0's device (the network's), where the loss is computed.

A new objective subclasses :class:`Objective`, defines ``draw`` and ``loss``, sets the class attributes that apply
and is registered with one line in ``difflab.objectives.OBJECTIVES``; ``difflab train --objective NAME`` and
``difflab train --help`` then know it.

An objective may own trainable parameters (EDM2's learned weighting head: see weighting.py) in the module that
:meth:`Objective.trainable` returns; the trainer moves it to the training device, trains its parameters with the
network's optimiser (their gradients averaged across processes like the network's) and saves and restores its
state with the run (under ``objective.`` in a checkpoint's tensors). Most objectives have none.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from difflab.devices import to_device
from difflab.errors import DifflabError, require


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
        weighting_options: the shared options it takes beside its own (``option_names``): the loss-weighting ones
            (weighting.WEIGHTING_OPTIONS) for the sigma-weighted objectives; () for the others.
    """

    precond = "edm"
    uses_schedule = False
    uses_sigma_data = False
    needs_data = False
    reference_size = 0
    help = ""
    weighting_options: tuple[str, ...] = ()

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
        """Its own keyword options: the constructor's parameters but ``schedule`` and the shared
        ``weighting_options`` (``accepted_options`` adds those)."""
        params = inspect.signature(cls).parameters.values()
        return [p.name for p in params if p.name != "schedule" and p.name not in cls.weighting_options
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @classmethod
    def accepted_options(cls, options: dict | None = None) -> list[str]:
        """Every option ``objective.options`` may set: its own (``option_names``) and the shared ones."""
        return [*cls.option_names(options), *cls.weighting_options]

    # ------------------------------------------------------------------------------------------ trainable state

    def trainable(self) -> nn.Module | None:
        """The module holding its trainable parameters (and their buffers), or None: most objectives have none."""
        return None

    def parameters(self) -> list[nn.Parameter]:
        """Its trainable parameters ([] for most), trained by the run's optimiser after the network's."""
        module = self.trainable()
        return [] if module is None else list(module.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Its trainable state by name ({} for most): what a checkpoint saves under ``objective.``."""
        module = self.trainable()
        return {} if module is None else module.state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where="the checkpoint") -> None:
        """Restore :meth:`state_dict` exactly (in place: an optimiser keeps its parameters); a state of other names
        or shapes, or one for an objective without, is refused in one line."""
        module = self.trainable()
        own = {} if module is None else module.state_dict()
        wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        if set(own) != set(tensors) or wrong:
            raise DifflabError(f"{where} holds objective state {sorted(tensors)[:3]} where this objective "
                               f"({type(self).__name__}) has {sorted(own)[:3]}"
                               + (f" (shape mismatch at {wrong[:3]})" if wrong else "")
                               + ": resume with the objective options it was trained with")
        if module is not None:
            module.load_state_dict(tensors)

    def to(self, device) -> Objective:
        """Its trainable module moved to ``device`` (in place); returns self."""
        module = self.trainable()
        if module is not None:
            module.to(device)
        return self

    @classmethod
    def precond_for(cls, options: dict | None = None) -> str:
        """The preconditioning a model trained with these options gets by default (``precond``)."""
        return cls.precond
