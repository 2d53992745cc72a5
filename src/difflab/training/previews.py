"""Periodic previews during training: a picture of EMA samples with fixed seeds, so steps can be compared.

Images (C, H, W) become a PNG grid; 2-D data a scatter beside the training data (1-D: histograms).
The sampler is quick and deterministic: DDIM-50 on the run's DDPM schedule for a discrete-time (eps) network (the
chain ``difflab sample --sampler ddim --steps 50`` draws), EDM Heun-18 otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.samplers import make_chain, sample_chain


def preview_sampler(denoiser, precond: str, schedule=None):
    """The preview chain for a network of preconditioning ``precond``.

    ``schedule``: the run's :class:`~difflab.schedules.DDPMSchedule` (``difflab.models.ddpm_schedule(cfg)``), which
    the DDIM chain of an eps network must follow; None is the default (linear, T = 1000) schedule.
    """
    if precond in ("eps", "eps-continuous"):
        return make_chain("ddim", denoiser, steps=50, schedule=schedule)
    return make_chain("heun", denoiser, steps=18)


@torch.no_grad()
def preview_samples(denoiser, precond: str, shape: tuple[int, ...], n: int, batch_size: int | None = None,
                    schedule=None) -> torch.Tensor:
    """Samples 0..n-1 (seed 0), float32 (n, *shape), of ``denoiser`` in eval mode (its mode is restored after).

    ``schedule``: the run's DDPM schedule (see :func:`preview_sampler`)."""
    was_training = denoiser.training
    denoiser.eval()
    try:
        x, _ = sample_chain(preview_sampler(denoiser, precond, schedule), n, seed=0, shape=shape,
                            batch_size=batch_size or max(1, n), dtype=torch.float32)
    finally:
        denoiser.train(was_training)
    return x


def write_preview(denoiser, precond: str, shape: tuple[int, ...], n: int, path: Path, data=None,
                  schedule=None) -> Path | None:
    """Samples 0..n-1 (seed 0) of ``denoiser`` drawn to ``path`` (PNG); None for data that has no picture (d > 2).

    ``schedule``: the run's DDPM schedule (see :func:`preview_sampler`)."""
    if len(shape) not in (1, 3) or (len(shape) == 1 and shape[0] > 2):
        return None
    x = preview_samples(denoiser, precond, shape, n, schedule=schedule)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(shape) == 3:
        from difflab.data.images import save_image_grid

        return save_image_grid(x, path)
    from difflab.plots import scatter_vs_data

    return scatter_vs_data(x, x if data is None else data[:4000], path, title=path.stem)
