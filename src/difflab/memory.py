"""A training run's memory, estimated before anything is allocated, against what the machine has free.

The network is built on PyTorch's ``meta`` device (shapes only, no storage), so the check itself cannot run out
of memory however large the configuration. The estimate:

- parameters x 20 bytes: float32 weights (4), their EMA (4), Adam's two moments (8) and the gradients (4); on a
  CPU, 16 more for the checkpoint (weights, EMA and moments serialised in memory while it is written);
- activations: the bytes autograd keeps for the backward pass per network input (measured by a forward pass on
  the meta device, as the difference between batches of 2 and 1 so that saved weights cancel), times the rows
  one micro-batch sends through the network (``batch_size / grad_accum`` per process, times K for SA-K, plus the
  CDL examples' density evaluations), times 1.5 for the backward pass's own temporaries.

Available memory: ``torch.cuda.mem_get_info`` on a GPU; otherwise MemAvailable of ``/proc/meminfo`` (falling
back to ``os.sysconf``), bounded by the cgroup's memory limit where one is set. The estimate is rough (float32
throughout, so bf16/fp16 runs need less); it exists to turn a certain out-of-memory crash, minutes or hours
in, into one line before the run starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from difflab.errors import DifflabError

BYTES_PER_PARAMETER = 4 + 4 + 8 + 4  # weights, EMA, Adam moments, gradients
CHECKPOINT_BYTES_PER_PARAMETER = 4 + 4 + 8  # weights, EMA and moments serialised while a checkpoint is written
BACKWARD_FACTOR = 1.5  # saved activations plus the backward pass's temporaries


def _gib(n: float) -> str:
    if n >= 100 * 2**30:
        return f"{n / 2**30:,.0f} GiB"
    return f"{n / 2**30:.3g} GiB" if n >= 2**27 else f"{n / 2**20:.3g} MiB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _inactive_file(stat_path: str, key: str) -> int:
    try:
        for line in Path(stat_path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_available() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, then v1; page cache counted as free), or None."""
    for limit_f, usage_f, stat_f, key in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
             "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is None or usage is None or limit >= 1 << 60:  # "max" or the v1 "unlimited" sentinel
            continue
        return max(0, limit - max(0, usage - _inactive_file(stat_f, key)))
    return None


def host_available() -> int | None:
    """Bytes of host memory available to this process now, or None where it cannot be told."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = None
    cg = _cgroup_available()
    if cg is not None:
        avail = cg if avail is None else min(avail, cg)
    return avail


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes available, where) on ``device``: free GPU memory for CUDA, available host memory otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free), f"free on {device}"
        except (RuntimeError, AssertionError):  # no driver: the device check elsewhere reports it
            return None, str(device)
    return host_available(), "available host memory"


def _saved_bytes(net: torch.nn.Module, shape: tuple[int, ...], rows: int) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    x = torch.zeros((rows, *shape), device="meta")
    c = torch.zeros((rows,), device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, c)
    return total


def network_size(cfg, shape: tuple[int, ...]) -> tuple[int, int]:
    """(parameters, activation bytes kept for backward per network input) of the run's network, on meta."""
    from difflab.models import build_network

    with torch.device("meta"):
        net = build_network(cfg, tuple(shape))
    n_params = sum(p.numel() for p in net.parameters())
    try:
        per_row = max(0, _saved_bytes(net, shape, 2) - _saved_bytes(net, shape, 1))
    except DifflabError:
        raise
    except Exception:  # an operation without a meta kernel: a rough per-pixel estimate instead
        per_row = _rough_bytes_per_row(cfg, shape)
    return n_params, per_row


def _rough_bytes_per_row(cfg, shape: tuple[int, ...]) -> int:
    """Activation bytes per input without a forward pass: MLP about 6 width-vectors per block; U-Net about
    256 x model_channels floats per pixel (the measured DDPM++ presets need 80 to 120)."""
    from difflab.models import arch_for

    m = cfg.model
    if arch_for(cfg, shape) == "mlp":
        return 4 * m.width * (6 * m.depth + 6)
    from difflab.nets.unet import UNET_PRESETS

    channels = {**UNET_PRESETS.get(m.preset, {}), **m.unet}.get("model_channels", 128)
    return 4 * 256 * int(channels) * math.prod(shape[1:])


def network_rows(cfg, world: int = 1) -> int:
    """Rows one micro-batch of one process sends through the network (with gradients)."""
    t, o = cfg.train, cfg.objective
    rows = math.ceil(math.ceil(t.batch_size / max(1, world)) / t.grad_accum)
    opts = o.options or {}
    if o.name == "sa":
        rows *= int(opts.get("K", 2))
    if o.name == "cdl":
        from difflab.objectives.cdl import CDLLoss

        default = CDLLoss()  # (unfitted: only its options)
        rows += 2 * int(opts.get("n_cdl", default.n_cdl)) * int(opts.get("n_alpha", default.n_alpha))
    return rows


def _resolved(cfg, shape: tuple[int, ...]):
    """cfg, or a copy with its data-dependent defaults (the batch size among them) filled in for ``shape``."""
    if cfg.train.batch_size is not None:
        return cfg
    import copy

    from difflab.models import resolve_defaults

    return resolve_defaults(copy.deepcopy(cfg), shape)


def training_estimate(cfg, shape: tuple[int, ...], device: torch.device, world: int = 1) -> dict:
    """The estimate's parts in bytes: ``parameters`` (count), ``state``, ``activations`` and ``total``."""
    cfg = _resolved(cfg, shape)
    n_params, per_row = network_size(cfg, shape)
    per_param = BYTES_PER_PARAMETER + (CHECKPOINT_BYTES_PER_PARAMETER if torch.device(device).type != "cuda" else 0)
    state = n_params * per_param
    activations = int(network_rows(cfg, world) * per_row * BACKWARD_FACTOR)
    return {"parameters": n_params, "state": state, "activations": activations, "total": state + activations}


def check_training_memory(cfg, shape: tuple[int, ...], device: str | torch.device = "cpu", world: int | None = None,
                          local_processes: int | None = None) -> dict:
    """Refuse a run whose estimated memory exceeds what ``device`` has available; returns the estimate.

    ``world``: the run's processes; ``local_processes``: those sharing this host's memory (CPU training under
    torchrun). None: torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE (1 without torchrun).
    """
    cfg = _resolved(cfg, shape)
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if local_processes is None else local_processes
    device = torch.device(device)
    est = training_estimate(cfg, shape, device, world)
    avail, where = available_bytes(device)
    share = max(1, local_processes) if device.type != "cuda" else 1
    need = est["total"] * share
    est["available"] = avail
    if avail is None or need <= avail:
        return est
    from difflab.models import arch_for

    procs = f", x {share} processes on this machine" if share > 1 else ""
    t, m = cfg.train, cfg.model
    size = (f"model.width ({m.width}) or model.depth ({m.depth})" if arch_for(cfg, tuple(shape)) == "mlp"
            else f"the U-Net (model.preset {m.preset!r}, or model.unet.model_channels)")
    raise DifflabError(
        f"this run needs about {_gib(need)} of memory ({est['parameters']:,} parameters: {_gib(est['state'])} for "
        f"weights, EMA, Adam moments and gradients; {_gib(est['activations'])} of activations for micro-batches "
        f"of {network_rows(cfg, world):,} rows{procs}) but {_gib(avail)} is {where}: lower {size} or "
        f"train.batch_size ({t.batch_size}), or raise train.grad_accum ({t.grad_accum}) to split each batch"
    )
