"""Multi-process helpers for torchrun (gloo on CPUs, NCCL for training on GPUs; multi-node by torchrun's flags).

difflab's data parallelism is explicit and exact: every process draws the same global minibatch and the same
objective randomness (the generators are seeded alike), computes the loss of its own slice of rows, and the
gradients are averaged with one all-reduce of a flat buffer. A run on W processes therefore matches a one-process
run with the same global batch and seeds up to floating-point summation order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

_COMM_DEVICE = torch.device("cpu")  # where collectives' tensors live: the CPU with gloo, this process's GPU with NCCL


def init_from_env(device: torch.device | str = "cpu") -> tuple[int, int]:
    """(rank, world size); joins the torchrun group when WORLD_SIZE > 1 (idempotent): NCCL when ``device`` is a
    CUDA device (the gradients live there), gloo otherwise."""
    global _COMM_DEVICE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device)
    if world > 1 and not dist.is_initialized():
        _import_group_defaults()
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's barrier and buffers use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _COMM_DEVICE = device if device.type == "cuda" else torch.device("cpu")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _import_group_defaults() -> None:
    """Import, before any group exists, the torch modules whose functions take ``group=group.WORLD`` as a default.

    Such a default is evaluated at import time. torch.distributed.nn.functional has ten of them, and torch._dynamo
    imports it, for instance on the first optimiser. If that import comes after init_process_group, the defaults
    hold the live group, and destroy_process_group cannot free it. Its gloo threads (pt_gloo_runloop,
    gloo_tcp_loop) then run on until the interpreter exits, and tearing them down there sometimes aborts the
    process, most likely when a worker thread needs the GIL during finalization: "terminate called without an
    active exception", SIGABRT, in 2 of 130 two-process training runs here. Imported first, the defaults are None."""
    try:
        import torch.distributed.nn.functional  # noqa: F401
    except ImportError:  # pragma: no cover - builds without it have no such defaults
        pass


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) when CUDA is available, else the CPU; or ``cpu``, ``cuda``,
    ``cuda:N``. A GPU that is not there is refused with one line."""
    from difflab.errors import require

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        return torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    require(torch.cuda.is_available(), f"device {name!r} asked for, but this torch build sees no GPU "
                                       f"(torch {torch.__version__}): use device cpu, or install a CUDA build")
    d = torch.device(f"cuda:{local}" if name == "cuda" else name)
    require(d.index is None or d.index < torch.cuda.device_count(),
            f"device {name!r}: only {torch.cuda.device_count()} GPU(s) are visible")
    return d


def world() -> tuple[int, int]:
    """(rank, world size) of the current group, (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def rows_of(rank: int, world_size: int, n: int) -> tuple[int, int]:
    """The contiguous slice [lo, hi) of n rows that process ``rank`` owns (sizes differ by at most one)."""
    per, extra = divmod(n, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (rank < extra)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across processes in place, through one flat buffer."""
    if world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world()[1]
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_sum(value: float) -> float:
    """A scalar summed over processes."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_COMM_DEVICE)
    dist.all_reduce(t)
    return float(t)


def all_reduce_max(value: float) -> float:
    """A scalar's maximum over processes (e.g. a wall time)."""
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_COMM_DEVICE)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the CPU summed over processes (through the collectives' device: NCCL reduces on the GPU); ``t``
    itself outside torchrun."""
    if world()[1] == 1:
        return t
    on_comm = t.to(_COMM_DEVICE)
    dist.all_reduce(on_comm)
    return on_comm.cpu()
