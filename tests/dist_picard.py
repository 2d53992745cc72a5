"""Run by test_picard.py, alone or under torchrun: Picard sampling of a fixed model, rows split across processes.

Usage: [torchrun --nproc_per_node N] python dist_picard.py OUT.pt [OPTIONS_JSON [SAMPLER]]
(extra Picard options, over tol 0.05 and window 64; the sequential sampler, 200 steps: ddpm unless named).
``"shift": true`` among the options samples test_cond_rows.py's conditional model instead: each sample's row of
:func:`shifts` added to the mixture's clean estimate, carried as the noise's condition ``shift_rows``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from difflab.denoisers import GMMDenoiser
from difflab.samplers import draw_noise, make_chain, picard


def model() -> GMMDenoiser:
    return GMMDenoiser(torch.tensor([0.5, 0.5], dtype=torch.float64),
                       torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64),
                       torch.tensor([0.3, 0.2], dtype=torch.float64))


def shifts() -> torch.Tensor:
    """The 16 samples' shifts (16, 2) of the conditional model."""
    return torch.linspace(-1, 1, 32, dtype=torch.float64).reshape(16, 2)


def main(out: str, options: dict, sampler: str = "ddpm") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    den, cond = model(), None
    if options.pop("shift", False):
        from test_cond_rows import Shifted

        den, cond = Shifted(den), {"shift_rows": shifts()}
    chain = make_chain(sampler, den, steps=200)
    rows = []
    step = chain.step
    chain.step = lambda x, j, z, *cond: rows.append(len(x)) or step(x, j, z, *cond)  # rows this process evaluates
    noise = draw_noise(4, range(16), (2,), chain.n_steps, chain.stochastic, cond=cond)
    res = picard(chain, noise, **{"tol": 0.05, "window": 64, **options})
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save({"x": res.x, "iterations": res.iterations, "sweeps": res.sweeps, "world": world, "rows": sum(rows)},
                   out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}, *sys.argv[3:4])
