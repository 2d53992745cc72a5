"""Periodic previews during training: a picture of EMA samples with fixed seeds, so steps can be compared.

Images (C, H, W) become a PNG grid; 2-D data a scatter beside the training data (1-D: histograms).
The sampler is quick and deterministic: DDIM-50 (on the run's own DDPM schedule, the chain
``difflab sample --sampler ddim --steps 50`` draws) for a network on the DDPM schedule (eps, x0 or v), EDM Heun-18
otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch


def preview_sampler(precond: str) -> tuple[str, int]:
    """(sampler, steps) of the preview of a network of preconditioning ``precond``."""
    from difflab.models import DDPM_PRECONDS

    return ("ddim", 50) if precond in DDPM_PRECONDS else ("heun", 18)


@torch.no_grad()
def preview_samples(run, n: int, batch_size: int | None = None) -> torch.Tensor:
    """Samples 0..n-1 (seed 0), float32 (n, *shape), of a :class:`~difflab.runs.Run`'s denoiser in eval mode (its
    mode is restored after), drawn in this process alone (the trainer's first process previews); a
    class-conditional run's sample k is of class k mod K (unguided)."""
    denoiser = run.denoiser
    was_training = denoiser.training
    denoiser.eval()
    sampler, steps = preview_sampler(run.precond)
    try:
        x, _ = run.sample(n, seed=0, sampler=sampler, steps=steps, batch_size=batch_size or max(1, n),
                          dtype=torch.float32, local=True, class_labels="all" if run.num_classes else None)
    finally:
        denoiser.train(was_training)
    return x


def write_preview(run, n: int, path: Path, data=None) -> Path | None:
    """Samples 0..n-1 (seed 0) of a run drawn to ``path`` (PNG); None for data that has no picture (d > 2)."""
    shape = run.shape
    if len(shape) not in (1, 3) or (len(shape) == 1 and shape[0] > 2):
        return None
    x = preview_samples(run, n)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(shape) == 3:
        from difflab.plots import save_image_grid

        return save_image_grid(x, path)
    from difflab.plots import scatter_vs_data

    return scatter_vs_data(x, x if data is None else data[:4000], path, title=path.stem)
