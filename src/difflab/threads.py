"""How many CPU threads torch uses: a runtime setting (``--threads``), never part of what a run computes.

``0`` (the default) picks by load: torch's default (one per core) on an idle machine, fewer when other processes
already keep cores busy, so the network's small matrix products do not fight them for the cores. Measured on this
project's 2-core CPU, Dino MLP training: idle, 2 threads 60.4 steps/s vs 1 thread 41.8; both cores busy with other
work, 2 threads 4.9-13.7 steps/s vs 1 thread 26.6-28.1. The thread count does not change the results (the same
weights bit for bit after 100 Dino steps with 1 and 2 threads).
"""

from __future__ import annotations

import os

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # torch's own choice, read before anyone sets it


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def busy_cores(loadavg: str = "/proc/loadavg") -> int:
    """Runnable tasks other than this one right now (Linux /proc/loadavg; 0 where it cannot be read)."""
    try:
        with open(loadavg) as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def auto_threads() -> int:
    """Torch's default, capped by the cores that no other process keeps busy and by this process's share of the
    cores under torchrun (LOCAL_WORLD_SIZE processes on one machine); at least 1."""
    cores = usable_cores()
    share = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(_TORCH_DEFAULT, share, cores - busy_cores()))


def set_threads(requested: int | None) -> int:
    """Use ``requested`` torch CPU threads (0 or None: :func:`auto_threads`); returns the number set."""
    n = int(requested) if requested else auto_threads()
    torch.set_num_threads(n)
    return n
