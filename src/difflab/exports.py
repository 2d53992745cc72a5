"""Handing runs back to other tools: a diffusers pipeline folder, or weights + config for any run.

``export_diffusers(run, out)`` writes a folder that ``DDPMPipeline.from_pretrained(out)`` loads and runs: the
run's EMA UNet2DModel (``unet/``, safetensors) and a ``DDPMScheduler`` (``scheduler/``) with the run's schedule
(T, beta schedule, beta range) and parametrisation (prediction_type); it needs a run whose backbone is a diffusers
model (``model.arch = "diffusers"``, or an imported diffusers folder). ``export_safetensors(run, out)`` writes
``model.safetensors`` (the denoiser's EMA state dict) and ``run.json`` (the config and the example shape) for any
run; :meth:`difflab.runs.Run.load` reads that folder back.

Every export is written into a temporary folder beside ``out`` and renamed into place, so a crash leaves no
partial folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from difflab.errors import require
from difflab.extras import require_module

# difflab's DDPM schedule kinds and VP parametrisations -> diffusers' names (the inverse of the importer's)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "eps-continuous": "epsilon", "x0": "sample", "v": "v_prediction"}
RUN_FILE, WEIGHTS_FILE = "run.json", "model.safetensors"
FORMATS = ("diffusers", "safetensors")


def _check_out(out: Path, overwrite: bool) -> None:
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: choose a folder")
    require(overwrite or not out.exists() or not any(out.iterdir()),
            f"--out {out} is not empty: choose a new folder, or pass --overwrite to replace it")


def _publish(tmp: Path, out: Path) -> Path:
    """Move a finished temporary folder into place (replacing ``out``)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def scheduler_config(run) -> dict:
    """The DDPMScheduler keyword arguments of a run's schedule and parametrisation."""
    s, precond = run.config.schedule, run.precond
    require(precond in PREDICTION_TYPES, f"a diffusers scheduler cannot express the {precond!r} preconditioning")
    return {"num_train_timesteps": s.T, "beta_schedule": BETA_SCHEDULES[s.kind], "beta_start": s.beta_start,
            "beta_end": s.beta_end, "prediction_type": PREDICTION_TYPES[precond]}


def export_diffusers(run, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``run`` as a DDPMPipeline folder (``model_index.json``, ``unet/``, ``scheduler/``); returns ``out``."""
    out = Path(out)
    require(run.config.model.arch == "diffusers",
            f"--format diffusers needs a run whose network is a diffusers UNet2DModel (model.arch = 'diffusers'); "
            f"this one is a {run.config.model.arch!r} network: export it with --format safetensors")
    _check_out(out, overwrite)
    diffusers = require_module("diffusers")
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    scheduler = diffusers.DDPMScheduler(**scheduler_config(run))
    pipe = diffusers.DDPMPipeline(unet=run.denoiser.net.unet, scheduler=scheduler)
    pipe.save_pretrained(tmp, safe_serialization=True)
    return _publish(tmp, out)


def export_safetensors(run, out: str | Path, overwrite: bool = False) -> Path:
    """Write the denoiser's state dict (``model.safetensors``) and ``run.json`` (config, shape, step, source)."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in run.denoiser.state_dict().items()}
    save_file(tensors, str(tmp / WEIGHTS_FILE))
    meta = {"config": run.config.to_dict(), "shape": list(run.shape), "step": run.step,
            "source": None if run.path is None else str(run.path)}
    (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1))
    return _publish(tmp, out)


def export_run(run, out: str | Path, fmt: str = "diffusers", overwrite: bool = False) -> Path:
    """``export_diffusers`` or ``export_safetensors`` by ``fmt``."""
    require(fmt in FORMATS, f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    return (export_diffusers if fmt == "diffusers" else export_safetensors)(run, out, overwrite)
