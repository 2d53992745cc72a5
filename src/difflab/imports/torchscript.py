"""TorchScript archives (``torch.jit.save``) read as data: the module tree's attributes and tensors, no code run.

A TorchScript ``.pt`` is a zip with one top folder holding ``code/`` (the TorchScript source, which
``torch.jit.load`` compiles and runs), ``data.pkl`` (the module tree: each module pickled as NEWOBJ of a
``__torch__.<qualified name>`` class and BUILD with a dict of its attributes, submodules and tensors) and
``data/<key>`` (each storage's raw little-endian bytes, named by a persistent id ``('storage', torch.<Type>Storage,
key, location, numel)``). :func:`read_torchscript` unpickles ``data.pkl`` with a
:class:`~difflab.unpickling.RestrictedUnpickler` that knows only inert records for ``__torch__`` classes, the tensor
rebuilder, ``collections.OrderedDict`` and ``torch.jit._pickle``'s list builders; ``code/`` is never read.

    attrs, classes = read_torchscript("inception-2015-12-05.pt")
    attrs["layers.conv.weight"]        # a tensor (32, 3, 3, 3); attrs["layers.conv.stride"] == 2
    classes["layers.pool0"]            # '__torch__.torch.nn.modules.pooling.MaxPool2d'
"""

from __future__ import annotations

import io
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from difflab.errors import DifflabError, require, short
from difflab.imports.torch_pickle import STORAGE_DTYPES, Storage, StorageType, rebuild_tensor
from difflab.unpickling import Record, Refused, RestrictedUnpickler, refusal

MAX_PICKLE_BYTES = 64 * 2**20  # data.pkl holds the tree, not the weights: larger is refused as damaged
MAX_DEPTH = 100
_QUALNAME = re.compile(r"__torch__(\.[A-Za-z_][A-Za-z0-9_]*)+")
SKIPPED = ("training", "_is_full_backward_hook")  # bookkeeping every scripted module carries


class ScriptRecord(Record):
    """Inert stand-in for one scripted object: its class's qualified name and its pickled attributes."""

    qualname = "?"

    @classmethod
    def label(cls) -> str:
        return cls.qualname


_RECORDS: dict[str, type] = {}


def _record_class(qualname: str) -> type:
    if qualname not in _RECORDS:
        _RECORDS[qualname] = type("ScriptRecord", (ScriptRecord,), {"qualname": qualname, "__module__": __name__})
    return _RECORDS[qualname]


def _list_of(kinds: tuple[type, ...]):
    def build(values):
        if not isinstance(values, list) or not all(isinstance(v, kinds) for v in values):
            raise Refused("a torch.jit._pickle list of the wrong element type")
        return list(values)

    return build


class ScriptUnpickler(RestrictedUnpickler):
    """``data.pkl`` of a TorchScript archive: records, tensors, plain lists; every other global is refused."""

    GLOBALS = {
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
        ("collections", "OrderedDict"): OrderedDict,
        ("torch.jit._pickle", "build_intlist"): _list_of((int,)),
        ("torch.jit._pickle", "build_doublelist"): _list_of((float,)),
        ("torch.jit._pickle", "build_boollist"): _list_of((bool,)),
    }
    inside = "a TorchScript module tree"

    def __init__(self, f, archive: zipfile.ZipFile, root: str):
        super().__init__(f)
        self.archive, self.root, self.storages = archive, root, {}

    def allowed(self, module, name):
        """The allow list, ``torch.<Type>Storage`` and an inert record class for any ``__torch__`` class."""
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if _QUALNAME.fullmatch(f"{module}.{name}"):
            return _record_class(f"{module}.{name}")
        return super().allowed(module, name)

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)
              and isinstance(pid[2], str) and pid[2].isdigit() and isinstance(pid[4], int) and pid[4] >= 0)
        if not ok:
            raise Refused("a persistent id that is not ('storage', type, key, location, numel)")
        _, kind, key, _, numel = pid
        if key not in self.storages:
            name = f"{self.root}/data/{key}"
            size = torch.empty(0, dtype=kind.dtype).element_size() * numel
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise ValueError(f"storage {key} ({name}) is missing") from None
            if info.file_size != size:  # checked before reading: a declared size cannot make us read more
                raise ValueError(f"storage {key} holds {info.file_size} bytes, not the {size} of {numel} elements")
            raw = self.archive.read(info)
            flat = torch.frombuffer(bytearray(raw), dtype=kind.dtype) if size else torch.empty(0, dtype=kind.dtype)
            self.storages[key] = Storage(flat)
        return self.storages[key]


def _flatten(obj, prefix: str, attrs: dict, classes: dict, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError("the module tree nests too deep (or is cyclic)")
    if isinstance(obj, ScriptRecord):
        classes[prefix] = obj.qualname
        for k, v in obj.state.items():
            if k not in SKIPPED:
                _flatten(v, f"{prefix}.{k}" if prefix else k, attrs, classes, depth + 1)
    else:
        attrs[prefix] = obj


def read_torchscript(path) -> tuple[dict[str, object], dict[str, str]]:
    """The attributes of a TorchScript archive's modules, flattened to dotted names, and each module's class.

    Returns ``(attrs, classes)``: ``attrs`` maps ``"layers.conv.weight"`` to a CPU tensor (a view of the storage
    read from the archive) and plain attributes (``"layers.conv.stride"``) to their values; ``classes`` maps each
    module's dotted name ("" for the root) to its ``__torch__`` qualified name. Raises :class:`DifflabError` for a
    file that is not such an archive, or whose tree names anything but modules, tensors and plain values.
    """
    p = Path(path)
    require(p.is_file(), f"no such file: {p}")
    try:
        archive = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as e:
        raise DifflabError(f"cannot read {p} as TorchScript ({short(e)}): a torch.jit.save file is a zip") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        require(len(pickles) == 1, f"cannot read {p} as TorchScript: no single <folder>/data.pkl inside the zip")
        info = archive.getinfo(pickles[0])
        require(info.file_size <= MAX_PICKLE_BYTES, f"{p}: its data.pkl declares {info.file_size} bytes; refused")
        root = pickles[0].split("/")[0]
        try:
            tree = ScriptUnpickler(io.BytesIO(archive.read(info)), archive, root).load()
        except Refused as e:
            raise refusal(p, e, "a TorchScript module tree holds only modules, tensors and plain values") from None
        except Exception as e:  # malformed bytes: any unpickling error, named in one line
            raise DifflabError(f"{p}: damaged TorchScript archive ({short(e)})") from None
    require(isinstance(tree, ScriptRecord), f"{p}: the TorchScript archive does not hold a module")
    attrs, classes = {}, {}
    try:
        _flatten(tree, "", attrs, classes, 0)
    except ValueError as e:
        raise DifflabError(f"{p}: damaged TorchScript archive ({e})") from None
    return attrs, classes


__all__ = ["ScriptRecord", "read_torchscript"]
