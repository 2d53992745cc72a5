"""Plain state dicts of difflab's own networks (MLP, U-Net) as runs, read without running code from the file.

    run = Run.load("mlp.safetensors", config=load_config(overrides=["model.width=64"]), shape=(2,))
    x, stats = run.sample(1000, seed=0, sampler="ddim", steps=50)

(``Run.load`` calls :func:`load_state_dict_model`, which returns the parts of a run.)

Formats: ``.safetensors`` (safetensors) and ``.pt``/``.pth``/``.bin`` (``torch.load(weights_only=True)`` only: a
file that needs any Python object beyond tensors is refused, never executed). The file holds a dict of tensors,
bare or under one of the usual entries (``WRAPPERS``: {"ema": ...}, {"state_dict": ...}, ...). Names may carry the
trainer's ``ema.``/``model.`` prefix (EMA first, as :meth:`Run.load`) and may lack the preconditioning's ``net.``.
"""

from __future__ import annotations

import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.config import RunConfig, validate
from difflab.errors import DifflabError, require, short
from difflab.models import build_denoiser
from difflab.training.checkpoint import load_weights, unprefixed

SAFETENSORS, TORCH = (".safetensors",), (".pt", ".pth", ".bin")
# Entries that commonly wrap a state dict, EMA weights first; followed up to MAX_DEPTH deep
WRAPPERS = ("ema", "ema_state_dict", "model_ema", "ema_model", "state_dict", "model_state_dict", "model", "net",
            "module")
MAX_DEPTH = 3
# a difflab checkpoint's weights, and its other tensors (optimiser, generators, an objective's own parameters,
# the post-hoc EMA's tracked copies)
TRAINER, TRAINER_REST = ("ema.", "model."), ("optim.", "rng.", "objective.", "phema.")
NET = "net."  # the preconditioning wrapper's name for the backbone
SHOWN = 3  # keys shown per kind of mismatch


@dataclass(frozen=True)
class Found:
    """The tensors of a weights file and the wrapper entries walked to reach them (() for a bare state dict)."""

    tensors: dict[str, torch.Tensor]
    entry: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """E.g. "the file's ['model']['ema'] entry" or 'the whole file'."""
        return "the file's " + "".join(f"[{k!r}]" for k in self.entry) + " entry" if self.entry else "the whole file"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (name -> tensor, on the CPU) in a .safetensors, .pt, .pth or .bin file; see :func:`find`."""
    return find(path).tensors


def find(path: str | Path) -> Found:
    """The state dict of a weights file and where in it it was; one-line :class:`DifflabError` for a missing,
    empty, unreadable or hostile file or one that holds anything but a dict of tensors."""
    path = Path(path)
    suffix = path.suffix.lower()
    require(path.exists(), f"no such file: {path} (give a .safetensors, .pt, .pth or .bin weights file)")
    require(not path.is_dir(), f"{path} is a folder, not a weights file: give the .safetensors, .pt, .pth or .bin "
                               "file inside it (a difflab run folder loads with Run.load)")
    require(suffix in SAFETENSORS + TORCH, f"{path}: unknown weights format {path.suffix or '(no suffix)'!r}: "
            "difflab reads state dicts from .safetensors, .pt, .pth or .bin files (rename it if it is one of these)")
    try:
        with open(path, "rb") as f:  # readable at all: later errors are the format's
            size = f.seek(0, 2)
    except OSError as e:
        raise DifflabError(f"cannot read {path}: {e.strerror or e} (check its permissions)") from None
    require(size > 0, f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    obj = _read_safetensors(path) if suffix in SAFETENSORS else _read_torch(path)
    return _unwrap(obj, path)


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for bad headers and truncation
        raise DifflabError(f"{path} is not a readable safetensors file ({short(e, 80)}): it is truncated, corrupt or "
                           "another format; fetch it again, or give it its real suffix") from None


def _read_torch(path: Path):
    try:
        with warnings.catch_warnings():  # e.g. torch's note on pickle protocols: noise for the user
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        if isinstance(e, pickle.UnpicklingError) or "weights only load failed" in str(e).lower():
            raise DifflabError(f"refused {path}: it needs Python objects beyond tensors to load ({_refusal(e)}); "
                               "difflab never executes code from a weights file and nothing in it was run: re-save "
                               "it as a state dict in .safetensors (safetensors.torch.save_file) from a copy you "
                               "trust") from None
        raise DifflabError(f"{path} is not a readable PyTorch file ({type(e).__name__}): it is truncated, corrupt or "
                           "not written by torch.save; fetch it again") from None


def _refusal(e: BaseException) -> str:
    """What torch's safe loader refused, e.g. 'GLOBAL posix.system' (letters, digits and dots only)."""
    m = re.search(r"GLOBAL [\w.]+|Unsupported operand \d+|Unsupported class [\w.]+", str(e))
    return m.group(0) if m else "a pickle instruction torch's safe loader does not allow"


def _is_tensor(v) -> bool:
    return torch.is_tensor(v) and v.layout == torch.strided


def _unwrap(obj, path: Path) -> Found:
    """The dict of tensors in ``obj``: itself, or under the first of ``WRAPPERS`` it has (up to MAX_DEPTH deep)."""
    entry: tuple[str, ...] = ()
    for _ in range(MAX_DEPTH + 1):
        found = Found(obj, entry)
        require(isinstance(obj, dict), f"{path}: {found.where} is {_a(type(obj).__name__)}, not a dict of tensors: "
                                       "save model.state_dict()")
        if obj and all(isinstance(k, str) and _is_tensor(v) for k, v in obj.items()):
            return found
        key = next((k for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if key is None or len(entry) == MAX_DEPTH:
            break
        obj, entry = obj[key], (*entry, key)
    require(bool(obj), f"{path}: {found.where} holds no tensors: save model.state_dict() with its weights")
    k, v = next((k, v) for k, v in obj.items() if not (isinstance(k, str) and _is_tensor(v)))
    name = short(repr(k), 60)
    if not isinstance(k, str):
        problem = f"its key {name} is {_a(type(k).__name__)}, not a name"
    else:
        problem = f"its entry {name} is {'a sparse tensor' if torch.is_tensor(v) else _a(type(v).__name__)}, not a " \
                  "dense tensor"
    tensors = sum(_is_tensor(v) for v in obj.values())
    raise DifflabError(f"{path}: {found.where} is not a state dict: {problem} ({tensors} of its {len(obj)} entries "
                       f"are tensors; keys {_keys(obj)}): save model.state_dict() itself, or wrap it under one of "
                       f"{', '.join(WRAPPERS[:6])}")


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _keys(d: dict) -> str:
    shown = [short(repr(k), 40) for k in list(d)[:SHOWN]]
    return "[" + ", ".join(shown) + (f", ... {len(d) - SHOWN} more" if len(d) > SHOWN else "") + "]"


# --------------------------------------------------------------------------------------------- loading into a run


def _namings(tensors: dict[str, torch.Tensor]) -> list[tuple[str, bool, dict[str, torch.Tensor]]]:
    """(trainer prefix stripped, 'net.' added, renamed tensors) for every reading of the file's names. Stripping
    the trainer's prefix drops its other weights and state (optim., rng.); any other key stays, to be refused."""
    readings = [("", tensors)]
    for p in TRAINER:
        if any(k.startswith(p) for k in tensors):
            rest = {k: v for k, v in tensors.items() if not k.startswith(TRAINER + TRAINER_REST)}
            readings.append((p, {**unprefixed(p, tensors), **rest}))
    return [(p, add, {NET + k: v for k, v in t.items()} if add else t) for p, t in readings for add in (False, True)]


def mismatch(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> str:
    """'' when ``tensors`` fit ``own`` (a module's state dict) name for name and shape for shape; else up to
    ``SHOWN`` missing, unexpected and shape-mismatched names, e.g. "missing ['net.a']; unexpected ['net.b']"."""
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    parts = [f"{what} {names[:SHOWN]}" + (f" (+{len(names) - SHOWN} more)" if len(names) > SHOWN else "")
             for what, names in (("missing", missing), ("unexpected", extra)) if names]
    parts += [f"shape mismatch at {k}: file {tuple(tensors[k].shape)}, model {tuple(own[k].shape)}"
              for k in wrong[:SHOWN]]
    return "; ".join(parts)


def load_state_dict_model(path: str | Path, config: RunConfig, shape: tuple[int, ...]) -> tuple:
    """(denoiser, config, shape, state): difflab's network for ``config`` and per-example ``shape`` (e.g. (2,) or
    (1, 8, 8)) with the weights of a state dict file (see :func:`find`), loaded strictly, in eval mode on the CPU.

    ``state["imported"]`` records the file, the entry used, the trainer prefix stripped and whether ``net.`` was
    added. A file of another architecture is refused in one line naming missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    shape = tuple(shape)
    require(len(shape) >= 1 and all(isinstance(n, int) and n >= 1 for n in shape),
            f"shape must be the positive sizes of one example, e.g. (2,) or (1, 8, 8), got {shape}")
    cfg = validate(config)
    model = build_denoiser(cfg, shape)
    found = find(path)
    own = model.state_dict()
    prefix, added, tensors = max(_namings(found.tensors), key=lambda n: len(own.keys() & n[2].keys()))
    detail = mismatch(own, tensors)
    if detail:
        raise DifflabError(f"state dict {path} ({found.where}) does not match this model's architecture for shape "
                           f"{shape} ({detail}): use the config it was trained with (model.arch, width, depth, "
                           "input_freqs, preset, unet)")
    load_weights(model, tensors, path)
    state = {"step": 0, "imported": {"file": str(path), "entry": list(found.entry), "prefix": prefix,
                                     "added_net": added}}
    return model.eval().requires_grad_(False), cfg, shape, state
