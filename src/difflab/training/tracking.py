"""Experiment tracking beside ``log.jsonl`` (which stays the record): TensorBoard and Weights & Biases.

``train.log`` names the trackers. Each gets every log record's scalars at its step, the preview pictures and the
resolved config. A resumed run continues the same tracking: TensorBoard appends to RUN/tensorboard/ and hides the
events an earlier session wrote past the checkpoint; W&B resumes the run whose id RUN/wandb_id.txt keeps.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path

from difflab.atomic import write_bytes_atomic
from difflab.extras import require_module


def check_trackers(kinds) -> None:
    """Fail in one line, naming the extra to install, unless every tracker in ``kinds`` can be imported."""
    for kind in kinds:
        require_module(OPENERS[kind].module, f"--log {kind}")


class Trackers:
    """The open trackers of a run (none: every call does nothing)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def scalars(self, step: int, record: dict) -> None:
        """A log record's numbers (every key but ``step``) at ``step``."""
        values = {k: float(v) for k, v in record.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
        for t in self.trackers:
            t.scalars(step, values)

    def image(self, step: int, tag: str, image) -> None:
        """A picture (a PNG's path, or an (H, W, C) uint8 array) at ``step``."""
        for t in self.trackers:
            t.image(step, tag, image)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def open_trackers(kinds, run_dir: str | Path, cfg, start_step: int) -> Trackers:
    """Open the trackers named in ``kinds`` for a run that trains on from ``start_step`` (0: a new run, whose
    folder may hold an overwritten run's tracking: it starts afresh). ``cfg``: the resolved RunConfig."""
    opened = []
    try:
        for kind in dict.fromkeys(kinds):
            opened.append(OPENERS[kind](Path(run_dir), cfg, start_step))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


class TensorBoard:
    """Events in RUN/tensorboard/. A session from ``start_step`` writes a restart marker (``purge_step``) at
    start_step + 1: TensorBoard's reader drops the events of earlier files from that step on, as the trainer drops
    log.jsonl records past the checkpoint. The config is a text summary (tag ``config``) at the same step."""

    module = "torch.utils.tensorboard"

    def __init__(self, run_dir: Path, cfg, start_step: int):
        tb = require_module(self.module, "--log tensorboard")
        logdir = run_dir / "tensorboard"
        if start_step == 0:
            shutil.rmtree(logdir, ignore_errors=True)
        else:
            _after_event_files(logdir)
        self.writer = tb.SummaryWriter(str(logdir), purge_step=start_step + 1)
        text = json.dumps(cfg.to_dict(), indent=2)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), start_step + 1)
        self.writer.flush()

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def image(self, step: int, tag: str, image) -> None:
        import numpy as np

        if isinstance(image, str | Path):
            from PIL import Image

            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _after_event_files(logdir: Path) -> None:
    """Readers take event files in name order, which begins with the second each was created in: wait for a later
    second than any file's there, so that this session's file is read after theirs."""
    stamps = [int(p.name.split(".")[3]) for p in logdir.glob("events.out.tfevents.*")
              if p.name.split(".")[3].isdigit()]
    if stamps and max(stamps) + 1 > time.time():
        time.sleep(max(stamps) + 1 - time.time())


class WandB:
    """A W&B run (its mode from $WANDB_MODE, its project from $WANDB_PROJECT, else 'difflab') whose files go
    under RUN/wandb/. Its id is kept in RUN/wandb_id.txt: a resumed run continues it (W&B ignores a step logged
    again below its newest, so steps an interrupted session logged past the checkpoint keep their first values)."""

    module = "wandb"

    def __init__(self, run_dir: Path, cfg, start_step: int):
        self.wandb = require_module(self.module, "--log wandb")
        id_file = run_dir / "wandb_id.txt"
        if start_step == 0 or not id_file.exists():
            write_bytes_atomic(id_file, (secrets.token_hex(4) + "\n").encode())
        self.run = self.wandb.init(id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
                                   project=os.environ.get("WANDB_PROJECT", "difflab"), name=run_dir.name,
                                   config=cfg.to_dict())

    def scalars(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, tag: str, image) -> None:
        self.run.log({tag: self.wandb.Image(str(image) if isinstance(image, Path) else image)}, step=step)

    def close(self) -> None:
        self.run.finish()


OPENERS = {"tensorboard": TensorBoard, "wandb": WandB}
