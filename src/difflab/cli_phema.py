"""``difflab phema``: rebuild a run's EMA of any length after training from its post-hoc EMA snapshots (EDM2's
power-function EMA, :mod:`difflab.training.phema`), as an exported folder that ``difflab sample``, ``difflab
info`` and ``Run.load`` read."""

from __future__ import annotations

import argparse

EPILOG = """the run must have been trained with train.phema set (e.g. --set 'train.phema=[0.05, 0.1]'): its
snapshots in RUN/phema/ are combined by least squares into the power-function EMA of relative standard deviation
--std (0 < std < 0.2887; short ~0.05, long ~0.15) at snapshot step --step (default: the last). profile_error: the
relative L2 error of the rebuilt averaging profile (0 for a tracked profile at a snapshot step).
examples:
  difflab train --data dino --steps 6000 --set 'train.phema=[0.05, 0.1]' --out runs/p
  difflab phema runs/p --std 0.07 --out runs/p-ema07
  difflab sample runs/p-ema07 --n 2000"""


def cmd_phema(a: argparse.Namespace) -> dict:
    from difflab.training.phema import export_phema

    plan = export_phema(a.run, a.std, a.out, step=a.step, overwrite=a.overwrite)
    return {"run": str(a.run), "std": plan.std, "step": plan.step, "out": str(a.out),
            "snapshots": len(plan.snapshots), "profile_error": plan.error}


def add_parser(sub) -> None:
    """The ``phema`` sub-command on the CLI's sub-parsers."""
    from difflab.cli_common import command_ends

    p = sub.add_parser("phema", help="post-hoc EMA: rebuild a run's EMA of any length from its snapshots",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder trained with train.phema (its snapshots are in RUN/phema/)")
    p.add_argument("--std", type=float, required=True,
                   help="relative standard deviation of the EMA to rebuild (EDM2's sigma_rel), e.g. 0.07")
    p.add_argument("--step", type=int, help="the snapshot step to rebuild it at   [the last]")
    p.add_argument("--out", required=True, help="folder to write (model.safetensors + run.json, as 'difflab export "
                                                "--format safetensors' writes)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    command_ends(p, cmd_phema, "the result")
