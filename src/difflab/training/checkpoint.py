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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj, sort_keys: bool = True) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=sort_keys)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` (>= 1). Returns its folder.

    ``tensors``: name -> tensor (weights, optimiser moments, RNG states as uint8). ``state``: JSON-able dict.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        with open(tmp / STATE, "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "step": step, **state}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DifflabError(
            f"could not write checkpoint {final} ({e.strerror or e}); the previous checkpoint is kept"
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (its newest checkpoint) or a checkpoint folder itself."""
    path = Path(path)
    require(path.exists(), f"no such run or checkpoint: {path} (give a run folder made by 'difflab train')")
    if (path / STATE).exists() or (path / WEIGHTS).exists():
        return path
    found = list_checkpoints(path)
    require(bool(found), f"{path} holds no checkpoint (expected {path}/checkpoints/step-*/): train it first")
    return found[-1]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint folder or a run's newest checkpoint; clear errors for anything malformed."""
    ckpt = resolve_checkpoint(path)
    try:
        with open(ckpt / STATE) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise DifflabError(f"checkpoint {ckpt} is incomplete: {STATE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DifflabError(f"checkpoint {ckpt} is corrupt: {STATE} is not valid JSON ({e})") from None
    require(isinstance(state, dict), f"checkpoint {ckpt} is corrupt: {STATE} is not a JSON object")
    version = state.get("format_version")
    require(isinstance(version, int), f"checkpoint {ckpt} is corrupt: {STATE} has no format_version")
    require(
        version <= FORMAT_VERSION,
        f"checkpoint {ckpt} has format version {version}, newer than this difflab's {FORMAT_VERSION}: upgrade difflab",
    )
    try:
        tensors = load_file(str(ckpt / WEIGHTS))
    except FileNotFoundError:
        raise DifflabError(f"checkpoint {ckpt} is incomplete: {WEIGHTS} is missing") from None
    except Exception as e:  # safetensors raises its own error types for malformed headers and truncation
        raise DifflabError(f"checkpoint {ckpt} is corrupt: {WEIGHTS} cannot be read ({type(e).__name__})") from None
    return tensors, state


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


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
