"""Checkpoints: safetensors weights plus a JSON state, written atomically; loading never unpickles.

Layout: ``RUN/checkpoints/step-00001234/{weights.safetensors, state.json}``. A checkpoint is written into a
hidden temporary folder, flushed to disk, then renamed into place in one atomic step, so a kill or a failed
write (disk full) at any moment leaves the previous checkpoints complete and loadable. The newest complete
checkpoint is the one with the highest step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.atomic import atomic_dir, atomic_file, default_mode
from difflab.errors import DifflabError, require

FORMAT_VERSION = 1
WEIGHTS, STATE = "weights.safetensors", "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def write_json_atomic(path: Path, obj, sort_keys: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (:func:`difflab.atomic.atomic_file`)."""
    with atomic_file(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=sort_keys).encode())


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` (>= 1). Returns its folder.

    ``tensors``: name -> tensor (weights, optimiser moments, RNG states as uint8). ``state``: JSON-able dict.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(final) as tmp:  # re-saving the same step (e.g. after a resume) replaces it
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
            os.chmod(tmp / WEIGHTS, default_mode())  # safetensors makes 0600 files; the others follow the umask
            (tmp / STATE).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, **state}, indent=2,
                                                sort_keys=True))
    except OSError as e:
        raise DifflabError(
            f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is kept"
        ) from None
    # Prune among the checkpoints up to this step: newer ones exist only when a run resumed from an older intact
    # checkpoint past a corrupt newest one, and pruning by count must not remove the intact ones for them.
    upto = [p for p in list_checkpoints(run_dir) if int(_STEP_DIR.match(p.name).group(1)) <= step]
    for old in upto[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class CorruptCheckpoint(DifflabError):
    """A checkpoint folder whose files are missing, unreadable or malformed (``ckpt``: the folder, ``reason``,
    ``kind``: corrupt or incomplete). The message adds the fix for a checkpoint folder given explicitly."""

    def __init__(self, ckpt: Path, reason: str, kind: str = "corrupt"):
        self.ckpt, self.reason, self.kind = Path(ckpt), reason, kind
        super().__init__(f"checkpoint {ckpt} is {kind}: {reason} (restore the file, or give the run folder to use "
                         "its newest intact checkpoint)")


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / STATE).exists() or (path / WEIGHTS).exists()


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its newest checkpoint, intact or not) or a checkpoint folder itself."""
    path = Path(path)
    require(path.exists(), f"no such run or checkpoint: {path} (give a run folder made by 'difflab train', or a "
                           "model made elsewhere: a diffusers folder, an EDM snapshot .pkl, a state-dict file)")
    if _is_checkpoint_dir(path):
        return path
    found = list_checkpoints(path)
    require(bool(found), f"{path} holds no checkpoint (expected {path}/checkpoints/step-*/): train it first")
    return found[-1]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_state(state: dict, ckpt: Path) -> None:
    """Refuse a checkpoint state whose fields have the wrong types or values (a hand-edited or damaged file)."""

    def field(name: str, ok: bool, need: str) -> None:
        if not ok:
            text = json.dumps(state[name])[:60] if name in state else "nothing (the field is missing)"
            raise CorruptCheckpoint(ckpt, f"{STATE} field {name!r} must be {need}, got {text}")

    step = state.get("step")
    field("step", _is_int(step) and step >= 0, "a non-negative integer")
    shape = state.get("shape")
    field("shape", isinstance(shape, list) and len(shape) >= 1 and all(_is_int(n) and n >= 1 for n in shape),
          "a list of positive integers (the shape of one example)")
    field("config", isinstance(state.get("config"), dict), "a JSON object (the run's configuration)")
    if "optimizer" in state:
        opt = state["optimizer"]
        field("optimizer", isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
              and all(isinstance(g, dict) for g in opt["param_groups"])
              and isinstance(opt.get("scalars", {}), dict), "a JSON object with a list of param_groups")
    if "skipped_steps" in state:
        n = state["skipped_steps"]
        field("skipped_steps", _is_int(n) and n >= 0, "a non-negative integer")
    if "grad_scaler" in state:
        field("grad_scaler", state["grad_scaler"] is None or isinstance(state["grad_scaler"], dict),
              "a JSON object")
    if "threads" in state:
        field("threads", _is_int(state["threads"]) and state["threads"] >= 1, "a positive integer")
    if "difflab_version" in state:
        field("difflab_version", isinstance(state["difflab_version"], str), "a string")
    from difflab.config import RunConfig, validate

    try:
        validate(RunConfig.from_dict(state["config"]))
    except DifflabError as e:
        raise CorruptCheckpoint(ckpt, f"{STATE} field 'config' is invalid ({e})") from None


def _read_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of one checkpoint folder; :class:`CorruptCheckpoint` for anything missing or malformed."""
    try:
        with open(ckpt / STATE) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpoint(ckpt, f"{STATE} is missing", "incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(ckpt, f"{STATE} is not valid JSON ({e})") from None
    except OSError as e:
        raise DifflabError(f"cannot read checkpoint {ckpt}: {e.strerror or e} (check its permissions)") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(ckpt, f"{STATE} is not a JSON object")
    version = state.get("format_version")
    if not _is_int(version):
        raise CorruptCheckpoint(ckpt, f"{STATE} has no format_version")
    require(
        version <= FORMAT_VERSION,
        f"checkpoint {ckpt} has format version {version}, newer than this difflab's {FORMAT_VERSION}: upgrade difflab",
    )
    check_state(state, ckpt)
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except FileNotFoundError:
        raise CorruptCheckpoint(ckpt, f"{WEIGHTS} is missing", "incomplete") from None
    except Exception as e:  # safetensors raises its own error types for malformed headers and truncation
        raise CorruptCheckpoint(ckpt, f"{WEIGHTS} cannot be read ({type(e).__name__})") from None
    return tensors, state


_WARNED: set[tuple[str, ...]] = set()  # each fallback is reported once per process


def _warn_fallback(skipped: list[CorruptCheckpoint], used: Path) -> None:
    key = (*(str(e.ckpt) for e in skipped), str(used))
    if key in _WARNED or os.environ.get("RANK", "0") != "0":  # under torchrun the first process reports
        return
    _WARNED.add(key)
    newest = skipped[0]
    others = f" and {len(skipped) - 1} older corrupt one(s)" if len(skipped) > 1 else ""
    print(f"warning: checkpoint {newest.ckpt} is {newest.kind} ({newest.reason}){others}; using {used} "
          f"(delete the corrupt one to silence this)", file=sys.stderr)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder, or of a run folder's newest intact checkpoint.

    A checkpoint folder given explicitly must be intact. For a run folder, a corrupt or incomplete newest
    checkpoint is skipped with a one-line warning on stderr in favour of the newest intact one; when none is
    intact the error names the newest one's problem and the fix.
    """
    path = Path(path)
    ckpt = resolve_checkpoint(path)
    if ckpt == path:
        return _read_checkpoint(ckpt)
    found = list_checkpoints(path)
    skipped: list[CorruptCheckpoint] = []
    for ckpt in reversed(found):
        try:
            result = _read_checkpoint(ckpt)
        except CorruptCheckpoint as e:
            skipped.append(e)
            continue
        if skipped:
            _warn_fallback(skipped, ckpt)
        return result
    newest = skipped[0]
    raise DifflabError(f"checkpoint {newest.ckpt} is {newest.kind}: {newest.reason}; no intact checkpoint is left in "
                       f"{path} ({len(found)} checked): restore the files, or train the run again with "
                       f"'difflab train --out {path} --overwrite'")


# --------------------------------------------------------------------------------------------- state packing


def pack_optimizer(opt: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser's state_dict into tensors (for safetensors) and JSON (param groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unpack_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "optim.") -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:  # JSON turns tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    for p, st in opt.state.items():  # moments in their parameter's memory layout (channels-last): fused kernels
        for name, v in st.items():  # pair the two tensors' memory element by element
            if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                st[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    """Load a state dict strictly, refusing weights from another architecture with one clear line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or extra or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra
                  else f"shape mismatch at {wrong[:3]}")
        raise DifflabError(f"checkpoint {where} does not match this model's architecture ({detail}): "
                           "use the config it was trained with")
    module.load_state_dict(tensors)
