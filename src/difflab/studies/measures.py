"""What studies measure on a trained run: all its samples in one block with a metric per Picard sweep, its
held-out likelihood (ITD estimate), its training-loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from difflab.runs import Run


def run_nll(run_dir: Path, x: torch.Tensor, n_alpha: int) -> dict:
    """-log p of x (N, *shape) under a run's EMA denoiser (nats, bits/dim) by the ITD estimator, with the
    Gaussian reference of the run's own training data."""
    from difflab.metrics.nll import itd_nll, nll_summary
    from difflab.objectives.itd import ITDLoss

    run = Run.load(run_dir)
    itd = ITDLoss().fit(run.training_data())
    return nll_summary(itd_nll(run.denoiser, x, itd, n_alpha=n_alpha), dim=x[0].numel())


def loss_curve(run_dir: Path) -> tuple[list, list]:
    """(steps, losses) of a run's log.jsonl (its loss records; periodic FID records are skipped)."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def sample_with_curve(run: Run, sampler: str, n: int, seed: int, parallel: dict | None = None, metric=None,
                      progress: bool = False, metric_name: str = "metric", **chain_options
                      ) -> tuple[torch.Tensor, dict]:
    """All n samples of a run in one block (so a parallel call's sweeps are the study's) and their stats record;
    with ``metric(x) -> float`` and a parallel sampler (picard-...), the metric of the end points after every
    sweep (the "metric per Picard iteration" curve, the record's ``curve``). ``progress``: report the sampling
    (steps, or sweeps and converged steps) and the curve's metric on stderr."""
    from difflab.progress import progress as progress_bar

    ends = []
    record = (lambda it, x, X: ends.append(x.clone())) if (metric and parallel is not None) else None
    x, stats = run.sample(n, seed, sampler, parallel=parallel, batch_size=n, callback=record, progress=progress,
                          local=True, **chain_options)
    curve = []
    with progress_bar(len(ends), f"{metric_name} per Picard sweep", unit="sweep", enabled=progress and bool(ends),
                      leave=False) as bar:
        for e in ends:
            curve.append(metric(e))
            bar.update(1)
    return x, {**stats.to_dict(), "curve": curve}
