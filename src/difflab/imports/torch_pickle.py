"""Tensors inside a plain ``pickle`` of torch objects, rebuilt without ``torch.load`` and without running code.

``pickle.dump`` of a tensor (torch 1.x and 2.x) writes a call of
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``; a parameter
wraps it in ``torch._utils._rebuild_parameter(tensor, requires_grad, hooks)``. The storage is written as
``torch.storage._load_from_bytes(b)``, ``b`` being a legacy (non-zip) ``torch.save`` of that storage: five
protocol-2 pickles (the magic number, format version 1001, system info, the storage as a persistent id
``('storage', torch.<Type>Storage, key, location, numel, None)``, the list of keys), then per key an int64 element
count and the raw little-endian bytes. torch reads ``b`` back with ``torch.load(weights_only=False)``, which runs
whatever the bytes name; :func:`load_storage_bytes` parses them here, with a
:class:`~difflab.unpickling.RestrictedUnpickler` that knows only the storage types. :data:`TENSOR_GLOBALS` maps the
four globals above to these safe stand-ins.
"""

from __future__ import annotations

import io
import math

import torch

from difflab.unpickling import Refused, RestrictedUnpickler

MAGIC, LEGACY_VERSION = 0x1950A86A20F9469CFC6C, 1001
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class Storage:
    """One rebuilt storage: ``flat``, a 1-D CPU tensor of its dtype. Only :func:`rebuild_tensor` accepts it."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


class StorageType:
    """What the legacy unpickler hands out for ``torch.FloatStorage`` and the like: just the dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _LegacyUnpickler(RestrictedUnpickler):
    """The pickles of a legacy ``torch.save``: plain values, ``torch.<Type>Storage`` and storage persistent ids."""

    inside = "a tensor's storage bytes"

    def __init__(self, f, refs: dict):
        super().__init__(f)
        self.refs = refs

    def allowed(self, module, name):
        """A fresh :class:`StorageType` for ``torch.<Type>Storage``; nothing else."""
        return StorageType(name) if module == "torch" and name in STORAGE_DTYPES else None

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
              and isinstance(pid[1], StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)
              and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None))
        if not ok:
            raise Refused("a storage persistent id that is not ('storage', type, key, location, numel, None)")
        ref = self.refs.setdefault(pid[2], _StorageRef(pid[2], pid[1].dtype, pid[4]))
        if ref.dtype != pid[1].dtype or ref.numel != pid[4]:
            raise ValueError(f"storage {pid[2]!r} is named twice with different types or sizes")
        return ref


def load_storage_bytes(b) -> Storage:
    """``torch.storage._load_from_bytes(b)``: the storage in legacy ``torch.save`` bytes, parsed without torch.load.

    Raises :class:`Refused` for any global but a storage type, ValueError for malformed or truncated bytes.
    """
    if not isinstance(b, (bytes, bytearray)):
        raise Refused(f"torch.storage._load_from_bytes of a {type(b).__name__}, not bytes")
    f, refs = io.BytesIO(b), {}

    def one():
        return _LegacyUnpickler(f, refs).load()

    if one() != MAGIC or one() != LEGACY_VERSION:
        raise ValueError("a tensor's storage bytes are not in torch's legacy save format")
    info = one()
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise ValueError("a tensor's storage bytes were written on a big-endian machine (not supported)")
    root, keys = one(), one()
    if not isinstance(root, _StorageRef) or not isinstance(keys, list) or set(keys) != set(refs):
        raise ValueError("a tensor's storage bytes hold something other than one storage")
    data = {}
    for key in keys:
        ref = refs[key]
        count = int.from_bytes(f.read(8), "little", signed=True)
        size = torch.empty(0, dtype=ref.dtype).element_size() * ref.numel
        raw = f.read(size)
        if count != ref.numel or len(raw) != size:
            raise ValueError(f"a tensor's storage bytes are truncated (storage {key!r} of {ref.numel} elements)")
        data[key] = torch.frombuffer(bytearray(raw), dtype=ref.dtype) if size else torch.empty(0, dtype=ref.dtype)
    return Storage(data[root.key])


def _ints(v, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in v):
        raise ValueError(f"a tensor's {what} is not a sequence of non-negative ints")
    return tuple(v)


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2``: the strided view of a :class:`Storage`, bounds-checked."""
    if not isinstance(storage, Storage):
        raise Refused(f"torch._utils._rebuild_tensor_v2 over a {type(storage).__name__}, not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    (offset,) = _ints((storage_offset,), "storage offset")
    if len(size) != len(stride):
        raise ValueError("a tensor's size and stride differ in length")
    flat = storage.flat
    if math.prod(size) == 0:
        return flat.new_empty(size)
    end = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if end >= flat.numel():
        raise ValueError(f"a tensor of size {size} reaches past its storage of {flat.numel()} elements")
    return flat.as_strided(size, stride, offset)  # a view: no copy, and no blow-up from a zero-stride size


def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """``torch._utils._rebuild_parameter[_with_state]``: the tensor itself (the importer needs no Parameter)."""
    if not isinstance(data, torch.Tensor):
        raise Refused(f"torch._utils._rebuild_parameter of a {type(data).__name__}, not a tensor")
    return data


TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): load_storage_bytes,
}
