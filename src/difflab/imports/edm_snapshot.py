"""EDM network snapshots (``network-snapshot-*.pkl``) read as inert records: nothing in the file is ever run.

    den, info = load_edm_snapshot("network-snapshot-200000.pkl")   # difflab EDMPrecond(UNet), eval mode
    records = read_edm_snapshot("network-snapshot-200000.pkl")     # {'ema': {...}, 'loss_fn': {...}, ...}

EDM (NVlabs/edm) and code built on it (STF) write ``pickle.dump(dict(ema=net, loss_fn=..., augment_pipe=...,
dataset_kwargs={...}))``. An object of one of EDM's ``@persistence.persistent_class`` classes (the networks and
their layers, the loss) is pickled as the call ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, with
``meta = {'type': 'class', 'version': 6, 'module_src': <source of the defining module>, 'class_name': ...,
'state': <the object's __dict__>}``; EDM's own reconstructor ``exec``s ``module_src``. Plain torch classes inside
(``torch.nn.ModuleDict``) are pickled as NEWOBJ of the class and BUILD with its ``__dict__``; tensors as described
in :mod:`difflab.imports.torch_pickle`.

:class:`SnapshotUnpickler` hands out only: a recorder for ``_reconstruct_persistent_obj`` (keeps class name,
version and state; ``module_src`` is neither run nor kept), inert :class:`Record` classes for ``torch.nn.modules.*``
classes, ``collections.OrderedDict``, ``builtins.set``/``frozenset`` (protocols 2-3), ``dnnlib.util.EasyDict``
(EDM's dict subclass, rebuilt as a dict), numeric numpy scalars (``skip_scale=np.sqrt(0.5)``) and the tensor
rebuilders. It is a :class:`~difflab.unpickling.RestrictedUnpickler`: any other global (``os.system``,
``builtins.exec``, ...) and any persistent id is refused in one line before anything is called, and the file is
refused unexecuted.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from difflab.errors import DifflabError, require, short
from difflab.imports.edm_songunet import denoiser_from_records
from difflab.imports.torch_pickle import TENSOR_GLOBALS
from difflab.unpickling import BUILTINS, NUMPY_CORE, Refused, RestrictedUnpickler, numeric_dtype, refusal, under
from difflab.unpickling import Record as BaseRecord

MAX_DEPTH = 200  # nesting of containers and modules; deeper (or cyclic) structures are refused as damaged
_TORCH_MODULE = re.compile(r"torch\.nn\.modules\.[a-z_]+")


class Record(BaseRecord):
    """Inert stand-in for one pickled object: which class it named and its ``state`` (``__dict__``), nothing live.

    ``persistent``: one of EDM's persistent classes (``module_name`` None: EDM's record names only the class);
    otherwise a ``torch.nn.modules.*`` class given by ``module_name``/``class_name``.
    """

    module_name: str | None = None
    class_name = "?"
    persistent = False
    version = None

    @classmethod
    def label(cls) -> str:
        return f"{cls.module_name}.{cls.class_name}"


_TORCH_CLASSES: dict[tuple[str, str], type] = {}


def _torch_class(module: str, name: str) -> type | None:
    """An inert :class:`Record` subclass standing for the torch.nn class ``module.name`` (None if not one)."""
    if not (_TORCH_MODULE.fullmatch(module) and name.isidentifier()):
        return None
    key = (module, name)
    if key not in _TORCH_CLASSES:
        _TORCH_CLASSES[key] = type(name, (Record,), {"module_name": module, "class_name": name,
                                                     "__module__": __name__, "__qualname__": f"Record[{name}]"})
    return _TORCH_CLASSES[key]


def _reconstruct_persistent_obj(meta):
    """Stand-in for EDM's reconstructor: a :class:`Record` of the class name, version and state; the module source
    in ``meta`` is never executed (only its length is kept, as ``source_chars``)."""
    ok = (isinstance(meta, dict) and meta.get("type") == "class" and isinstance(meta.get("class_name"), str)
          and isinstance(meta.get("state"), (dict, type(None))))
    if not ok:
        raise Refused("a persistent-object record that is not {'type': 'class', 'class_name': ..., 'state': ...}")
    rec = Record()
    rec.__setstate__(meta.get("state") or {})
    rec.persistent, rec.class_name, rec.version = True, meta["class_name"], meta.get("version")
    name = meta.get("module_name")
    rec.module_name = name if isinstance(name, str) else None
    src = meta.get("module_src")
    rec.source_chars = len(src) if isinstance(src, str) else 0
    return rec


class _EasyDict(dict):
    """``dnnlib.util.EasyDict``: rebuilt as a plain dict (its attribute access is not needed)."""

    def __setstate__(self, state):
        if state:
            raise Refused("a dnnlib.util.EasyDict with attributes")


def _np_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar(dtype, bytes)``: a numpy number, returned as a Python int or float."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and isinstance(data, bytes)
            and len(data) == dtype.itemsize):
        raise Refused("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype=dtype)[0].item()


class SnapshotUnpickler(RestrictedUnpickler):
    """Rebuilds tensors, containers and inert :class:`Record` s of an EDM snapshot; refuses every other global."""

    GLOBALS = {
        **TENSOR_GLOBALS,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        ("collections", "OrderedDict"): OrderedDict,
        **under(BUILTINS, "set", set),
        **under(BUILTINS, "frozenset", frozenset),
        ("dnnlib.util", "EasyDict"): _EasyDict,
        ("numpy", "dtype"): numeric_dtype,
        **under(NUMPY_CORE, "scalar", _np_scalar),
    }

    def allowed(self, module, name):
        """The allow list, then an inert :class:`Record` class for any ``torch.nn.modules.*`` class."""
        found = super().allowed(module, name)
        return found if found is not None else _torch_class(module, name)


def _plain(v, depth: int = 0):
    """Records -> summaries (:func:`summarize`), dict subclasses -> dicts; tensors and plain values unchanged."""
    if depth > MAX_DEPTH:
        raise ValueError("the pickle nests too deep (or is cyclic)")
    if isinstance(v, Record):
        return summarize(v, depth + 1)
    if isinstance(v, dict):
        return {k: _plain(x, depth + 1) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x, depth + 1) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x, depth + 1) for x in v)
    return v


def _describe(rec: Record, depth: int) -> dict:
    st = rec.state
    return {"class_name": rec.class_name, "module_name": rec.module_name, "persistent": rec.persistent,
            "version": rec.version, "init_args": _plain(st.get("_init_args"), depth),
            "init_kwargs": _plain(st.get("_init_kwargs"), depth),
            "attributes": {k: _plain(v, depth) for k, v in st.items() if not k.startswith("_") and k != "training"}}


def _walk(rec: Record, prefix: str, modules: dict, tensors: dict, active: set, depth: int) -> None:
    """Fill ``modules`` (dotted name -> description) and ``tensors`` (dotted name -> tensor) as state_dict() would."""
    if id(rec) in active or depth > MAX_DEPTH:
        raise ValueError("the module tree is cyclic or nests too deep")
    active.add(id(rec))
    st = rec.state
    modules[prefix[:-1]] = _describe(rec, depth)
    transient = st.get("_non_persistent_buffers_set") or ()
    for group in ("_parameters", "_buffers"):
        entries = st.get(group) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{rec.class_name}.{group} is a {type(entries).__name__}, not a dict")
        for name, t in entries.items():
            if t is None or (group == "_buffers" and name in transient):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
            tensors[f"{prefix}{name}"] = t
    children = st.get("_modules") or {}
    if not isinstance(children, dict):
        raise ValueError(f"{rec.class_name}._modules is a {type(children).__name__}, not a dict")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise ValueError(f"submodule {prefix}{name} is a {type(child).__name__}, not a module record")
        _walk(child, f"{prefix}{name}.", modules, tensors, active, depth + 1)
    active.discard(id(rec))


def summarize(rec: Record, depth: int = 0) -> dict:
    """One record as plain data: ``class_name``, ``module_name``, ``persistent``, ``version``, ``init_args``,
    ``init_kwargs`` (None when not recorded), ``attributes`` (public entries of its state), ``modules`` (dotted
    name -> the same fields, "" for itself) and ``state_dict`` (dotted name -> tensor, the names of a real
    ``state_dict()``: parameters and persistent buffers, submodules recursively, None entries skipped)."""
    modules, tensors = {}, {}
    _walk(rec, "", modules, tensors, set(), depth)
    return {**modules[""], "modules": modules, "state_dict": tensors}


def read_edm_snapshot(path) -> dict:
    """The snapshot's top-level dict, each persistent or torch object replaced by its :func:`summarize` record.

    E.g. ``r['ema']['class_name'] == 'EDMPrecond'``, ``r['ema']['modules']['model']['init_kwargs']``,
    ``r['ema']['state_dict']['model.map_layer0.weight']``. One-line :class:`DifflabError` for a missing,
    truncated or damaged file, one without an ``'ema'`` network, or one naming any global outside the allow list.
    """
    p = Path(path)
    require(p.is_file(), f"no EDM network snapshot at {p}: give the path of a network-snapshot-*.pkl file")
    try:
        with p.open("rb") as f:
            obj = SnapshotUnpickler(f).load()
        require(isinstance(obj, dict) and isinstance(obj.get("ema"), Record),
                f"{p} holds {'a dict' if isinstance(obj, dict) else 'a ' + type(obj).__name__} with no 'ema' "
                f"network: not an EDM network snapshot (network-snapshot-*.pkl)")
        return {k: _plain(v) for k, v in obj.items()}
    except Refused as e:
        raise refusal(p, e, "an EDM snapshot is read only as tensors, containers and inert records of EDM's "
                            "classes, so the file was refused unexecuted") from None
    except DifflabError:
        raise
    except Exception as e:  # truncated or garbled pickles raise many types
        raise DifflabError(f"cannot read EDM snapshot {p}: {short(e)} (the file is truncated or damaged, or not a "
                           f"network-snapshot-*.pkl)") from None


def load_edm_snapshot(path) -> tuple:
    """(difflab denoiser, info) from an EDM ``EDMPrecond(SongUNet)`` snapshot (VP/VE preconditioning too).

    The denoiser is difflab's :class:`~difflab.denoisers.EDMPrecond` (or VP/VE) around a
    :class:`~difflab.nets.unet.UNet` holding the snapshot's EMA weights, in eval mode; ``info`` holds the EDM
    arguments, the difflab U-Net arguments, the preconditioning and the EDM tensors left out
    (see :func:`difflab.imports.edm_songunet.denoiser_from_records`).
    """
    den, info = denoiser_from_records(read_edm_snapshot(path))
    return den, {"path": str(path), **info}


def load_edm_model(path) -> tuple:
    """(denoiser, config, shape, state) of an EDM snapshot: the parts of a :class:`~difflab.runs.Run` (step 0, no
    data set) whose config rebuilds the same network (model.arch unet with the snapshot's U-Net settings, its
    preconditioning), so it can be sampled, scored, fine-tuned (``train --init``) and exported like a run."""
    import inspect

    from difflab.config import RunConfig, validate
    from difflab.errors import require
    from difflab.models import build_denoiser
    from difflab.nets.unet import UNet
    from difflab.schedules import VPSchedule
    from difflab.training.checkpoint import load_weights

    den, info = load_edm_snapshot(path)
    unet, precond = dict(info["unet"]), info["precond"]
    if precond["name"] == "vp":
        default = VPSchedule()
        require((precond["beta_d"], precond["beta_min"], precond["epsilon_t"]) ==
                (default.beta_d, default.beta_min, default.eps_t),
                f"{path}: a VP network with beta_d {precond['beta_d']}, beta_min {precond['beta_min']}: difflab's "
                "runs use EDM's defaults (19.9, 0.1)")
    channels, size = unet.pop("img_channels"), unet.pop("img_resolution")
    defaults = {k: p.default for k, p in inspect.signature(UNet).parameters.items()
                if p.default is not inspect.Parameter.empty}
    cfg = RunConfig()
    cfg.data.name = ""  # an imported model names no data set
    cfg.model.arch, cfg.model.precond = "unet", precond["name"]
    cfg.model.unet = {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **unet}.items()}
    if precond["name"] == "edm":
        cfg.model.sigma_data = float(precond["sigma_data"])
    cfg = validate(cfg)
    shape = (int(channels), int(size), int(size))
    model = build_denoiser(cfg, shape)
    load_weights(model, den.state_dict(), path)  # the config rebuilds exactly the snapshot's network
    state = {"imported": "edm-snapshot", "source": str(path), "step": 0, "shape": list(shape),
             "config": cfg.to_dict(), "edm": {k: info.get(k) for k in ("network", "backbone", "dropped")}}
    return model.eval().requires_grad_(False), cfg, shape, state
