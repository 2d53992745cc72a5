"""Independent random streams from one run seed: ``(seed, key)`` -> a 63-bit seed or a seeded torch generator.

``derive_seed(seed, key)`` is numpy's ``SeedSequence(entropy=seed, spawn_key=(key,))``: its first two 32-bit words
``lo, hi`` give ``(hi << 32 | lo) mod 2**63``. Different keys (a trainer's purposes, a sampler's sample indices)
give statistically independent streams, and the same pair always gives the same one.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, key: int, *subkeys: int) -> int:
    """The 63-bit seed of stream ``key`` (and ``subkeys``, e.g. (k, LABELS): sample k's class label) under run
    ``seed`` (non-negative ints)."""
    spawn = (int(key), *(int(s) for s in subkeys))
    lo, hi = np.random.SeedSequence(entropy=int(seed), spawn_key=spawn).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & ((1 << 63) - 1)


def generator(seed: int, key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, key)``."""
    return torch.Generator().manual_seed(derive_seed(seed, key))


__all__ = ["derive_seed", "generator"]
