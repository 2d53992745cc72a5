"""How many CPU threads torch uses: a fixed count chosen by the network, never by the machine's load.

The thread count can change a run's numbers (a matrix product split over more threads adds in another order), so
it is chosen once, from the network and the cores this process may use, and recorded (``train.threads`` in
``config.json``, ``threads`` in each checkpoint's state and in sample stats). The same command on the same machine
then computes the same numbers whatever else runs there.

Defaults (``--threads 0``): **1 for the MLP** (flat data) and **the usable cores for a U-Net** (images; under
torchrun, this process's share). Measured on this project's 2-core CPU (docs/results.md): the Dino MLP trains 1.3x
faster with a second thread on a nearly idle machine (60-69 vs 47-48 steps/s) and 10x slower beside other work
(1.46 vs 15.2 steps/s), so one thread is both the reproducible and the robust choice, and it makes the MLP's
numbers independent of the machine's core count. A U-Net's convolutions use the cores of an idle machine;
beside other work pass ``--threads 1`` (a choice that is recorded, so the numbers stay reproducible).
"""

from __future__ import annotations

import os

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # torch's own choice (one per core), read before anyone sets it


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def default_threads(arch: str) -> int:
    """The thread count of a run of network ``arch`` (mlp | unet | diffusers) when none is given: 1 for the MLP;
    otherwise torch's default, capped by this process's share of the usable cores under torchrun
    (LOCAL_WORLD_SIZE processes on one machine); at least 1. It never depends on the load."""
    if arch == "mlp":
        return 1
    share = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(_TORCH_DEFAULT, share))


def threads_for(requested: int | None, arch: str) -> int:
    """``requested`` threads, or (0 or None) :func:`default_threads` of ``arch``."""
    return int(requested) if requested else default_threads(arch)


def set_threads(requested: int | None, arch: str) -> int:
    """Use :func:`threads_for` torch CPU threads; returns the number set."""
    n = threads_for(requested, arch)
    torch.set_num_threads(n)
    return n
