"""Where the arithmetic runs: on the network's device, with the randomness drawn on the CPU and moved there.

Every random number comes from a CPU ``torch.Generator`` (per sample, per training step), so sample k and training
step s see the same numbers on any device. What runs around the network, the objectives' losses and targets and
the samplers' states and buffers, lives on the network's device: the draws and the small per-step tables are
copied there (host to device), and nothing is copied back inside a training step or a sampler sweep except the
decision that ends it (the loss value; the steps a sweep accepted), through :func:`host`.

- :func:`device_of`: the device a denoiser (or module) computes on.
- :func:`to_device`: a dict of draws (or one tensor) moved to a device.
- :func:`on`: a table (a schedule, a noise-level grid) on the device of the tensor that indexes or meets it.
- :func:`state_dtype`: the sampler state's dtype, ``--state-dtype auto | float32 | float64``.
- :func:`host`: the one way results come back to the CPU.
"""

from __future__ import annotations

import os

import torch

from difflab.errors import require

STATE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
STATE_DTYPE_ENV = "DIFFLAB_STATE_DTYPE"  # overrides the device's default state dtype (the tests run both)


def device_of(obj) -> torch.device:
    """The device ``obj`` computes on: a module's first parameter (or buffer) device; the CPU for anything else
    (the analytic denoisers, plain functions)."""
    if isinstance(obj, torch.nn.Module):
        for t in obj.parameters():
            return t.device
        for t in obj.buffers():
            return t.device
    return torch.device("cpu")


def to_device(value, device: torch.device):
    """``value`` on ``device``: a tensor, or a dict (tuple, list) whose tensors are moved (others kept as they are)."""
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if torch.is_tensor(value) and value.device != device:
        return value.to(device)
    return value


def on(table: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table`` on the device of ``like`` (a copy only when they differ)."""
    return table if table.device == like.device else table.to(like.device)


def state_dtype(name: str | torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.dtype:
    """The sampler state's dtype: ``"float32"`` or ``"float64"``, or ``"auto"`` / None for the default: the
    environment's ``DIFFLAB_STATE_DTYPE`` when set, else the device's, float64 on the CPU (as fast as float32 there,
    benchmarks/state_dtype.py) and float32 on an accelerator, whose float64 throughput is a fraction of its
    float32 one."""
    if isinstance(name, torch.dtype):
        require(name in STATE_DTYPES.values(), f"sampler state dtype must be float32 or float64, got {name}")
        return name
    if name is None or name == "auto":
        name = os.environ.get(STATE_DTYPE_ENV) or None
        if name is None:
            return torch.float64 if torch.device(device).type in ("cpu", "meta") else torch.float32
        require(name in STATE_DTYPES, f"{STATE_DTYPE_ENV} must be float32 or float64, got {name!r}")
    require(name in STATE_DTYPES, f"sampler state dtype must be auto, float32 or float64, got {name!r}")
    return STATE_DTYPES[name]


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU: the one place results come back (the tests replace it to run whole loops on ``meta``)."""
    return t.cpu()
