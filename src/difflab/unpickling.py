"""A ``pickle.Unpickler`` that builds only what an allow-list names; everything else is refused unexecuted, in one line.

A plain ``pickle.load`` imports and calls whatever globals a pickle names. :class:`RestrictedUnpickler` looks every
global up in its subclass's ``GLOBALS`` (``(module, name) -> the safe stand-in handed out``), refuses the rest and
every persistent id with :class:`Refused` before anything is called, and :func:`refusal` turns that into the
one-line :class:`~difflab.errors.DifflabError` the readers raise. :func:`numeric_dtype` is the ``numpy.dtype``
stand-in for plain numbers. Used by :mod:`difflab.data.cifar`, :mod:`difflab.imports.edm_snapshot` and
:mod:`difflab.imports.torch_pickle`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from difflab.errors import DifflabError


class Refused(pickle.UnpicklingError):
    """A pickle named a global (or an argument) outside the allow list; the message names it."""


class RestrictedUnpickler(pickle.Unpickler):
    """Hands out only what ``GLOBALS`` (or :meth:`allowed`) names; refuses other globals and all persistent ids."""

    GLOBALS: ClassVar[Mapping[tuple[str, str], object]] = {}
    inside: ClassVar[str] = ""  # what is being read, for the refusal message ("a tensor's storage bytes")

    def allowed(self, module: str, name: str):
        """The stand-in for ``module.name``, or None to refuse it; subclasses may add rules."""
        return self.GLOBALS.get((module, name))

    def find_class(self, module, name):
        found = self.allowed(module, name) if isinstance(module, str) and isinstance(name, str) else None
        if found is None:
            raise Refused(f"the global {module}.{name}" + (f" inside {self.inside}" if self.inside else ""))
        return found

    def persistent_load(self, pid):
        raise Refused("a persistent id")


class Record:
    """Inert stand-in for one pickled object: ``state`` (what BUILD gave it, a dict of names), nothing live. A
    subclass per class named in the pickle says which (:meth:`label`); constructor arguments are refused."""

    @classmethod
    def label(cls) -> str:
        return cls.__name__

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise Refused(f"constructor arguments for {cls.label()}")
        self = super().__new__(cls)
        self.state = {}
        return self

    def __setstate__(self, state):
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise Refused(f"a state that is not a dict of names for {self.label()}")
        self.state = dict(state)


def refusal(where, refused: Refused, why: str) -> DifflabError:
    """The one-line error for a refused pickle: ``<where>: refused to unpickle <what>: <why>``."""
    return DifflabError(f"{where}: refused to unpickle {refused}: {why}")


def numeric_dtype(spec, align=False, copy=False) -> np.dtype:
    """``numpy.dtype(spec)`` for a string naming a plain number (bool, int, uint, float); no objects, no records."""
    if not isinstance(spec, str):
        raise Refused(f"numpy.dtype of a {type(spec).__name__}")
    dt = np.dtype(spec)
    if dt.kind not in "biuf" or dt.hasobject:
        raise Refused(f"numpy.dtype({spec!r}), not a plain numeric type")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1's module path, numpy 2's
BUILTINS = ("builtins", "__builtin__")  # Python 3's, Python 2's


def under(modules: tuple[str, ...], name: str, stand_in) -> dict:
    """Allow-list entries for one global that pickles name under any of several ``modules`` (numpy 1 and 2, or
    Python 2 and 3, spell its module differently), each handing out ``stand_in``."""
    return {(module, name): stand_in for module in modules}


__all__ = ["BUILTINS", "NUMPY_CORE", "Record", "Refused", "RestrictedUnpickler", "numeric_dtype", "under", "refusal"]

