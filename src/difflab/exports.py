"""Handing runs back to other tools: a diffusers pipeline folder, or weights + config for any run.

``export_diffusers(run, out)`` writes a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) with the
run's EMA UNet2DModel (safetensors) and a scheduler that expresses the run's parametrisation: a ``DDPMScheduler``
with the run's DDPM schedule (T, beta schedule, beta range) and prediction_type for the eps-family ones, a
``FlowMatchEulerDiscreteScheduler`` (num_train_timesteps 1000, ``shift`` = the run's ``schedule.shift``) for a
flow-matching (velocity) network; the preconditionings no diffusers scheduler expresses (vp, ve, edm) are refused.
It needs a run whose backbone is a diffusers model (``model.arch = "diffusers"``, or an imported diffusers folder).
``DiffusionPipeline.from_pretrained(out)`` (or ``DDPMPipeline``'s) loads and runs either, and
:meth:`difflab.runs.Run.load` reads it back as the same model.

diffusers has no unconditional flow-matching pipeline class, and a flow export names ``DDPMPipeline`` in
``model_index.json`` all the same, beside its ``FlowMatchEulerDiscreteScheduler``: ``DDPMPipeline`` is diffusers'
generic unconditional loop (x ~ N(0, I), then ``x = scheduler.step(unet(x, t).sample, t, x).prev_sample`` for t in
``scheduler.timesteps``, then x / 2 + 0.5), which with that scheduler is exactly the flow-matching Euler sampler,
difflab's flow-euler at the scheduler's shift. So ``DiffusionPipeline.from_pretrained`` gives a pipeline that
samples the model correctly, and the scheduler it builds (named in model_index.json too) says what the model is.
The alternatives mislead more: a made-up pipeline class makes ``DiffusionPipeline.from_pretrained`` fail, no
model_index.json makes the folder a pair of components only, and an SD3 pipeline class expects text encoders and
a transformer.

``export_safetensors(run, out)`` writes ``model.safetensors`` (the denoiser's EMA state dict) and ``run.json`` (the
config and the example shape) for any run; :meth:`difflab.runs.Run.load` reads that folder back.

Every export is written into a temporary folder beside ``out`` and renamed into place
(:func:`difflab.atomic.atomic_dir`), so a crash leaves no partial folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from difflab.atomic import atomic_dir
from difflab.errors import require
from difflab.extras import require_module

# difflab's DDPM schedule kinds and VP parametrisations -> diffusers' names (the inverse of the importer's)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "eps-continuous": "epsilon", "x0": "sample", "v": "v_prediction"}
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # a flow-matching (velocity) network's scheduler
RUN_FILE, WEIGHTS_FILE = "run.json", "model.safetensors"
FORMATS = ("diffusers", "safetensors")


def _check_out(out: Path, overwrite: bool) -> None:
    require(not out.exists() or out.is_dir(), f"--out {out} is a file: choose a folder")
    require(overwrite or not out.exists() or not any(out.iterdir()),
            f"--out {out} is not empty: choose a new folder, or pass --overwrite to replace it")


def scheduler_class(run) -> str:
    """The diffusers scheduler class that expresses the run's parametrisation (refused in one line if none)."""
    precond = run.precond
    require(precond in PREDICTION_TYPES or precond == "flow",
            f"a diffusers scheduler cannot express the {precond!r} preconditioning (diffusers' schedulers express "
            f"{', '.join(PREDICTION_TYPES)} and flow): export the run with --format safetensors")
    return FLOW_SCHEDULER if precond == "flow" else "DDPMScheduler"


def scheduler_config(run) -> dict:
    """The keyword arguments of the run's :func:`scheduler_class`: the DDPM schedule and prediction_type, or the
    flow-matching timestep scale and the run's default sampler shift."""
    s = run.config.schedule
    if scheduler_class(run) == FLOW_SCHEDULER:
        from difflab.denoisers import FlowPrecond

        return {"num_train_timesteps": FlowPrecond.T, "shift": s.shift}
    return {"num_train_timesteps": s.T, "beta_schedule": BETA_SCHEDULES[s.kind], "beta_start": s.beta_start,
            "beta_end": s.beta_end, "prediction_type": PREDICTION_TYPES[run.precond]}


def export_diffusers(run, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``run`` as a pipeline folder (``model_index.json`` naming DDPMPipeline, ``unet/``, ``scheduler/``: a
    DDPMScheduler, or a FlowMatchEulerDiscreteScheduler for a flow-matching run); returns ``out``."""
    out = Path(out)
    require(run.config.model.arch == "diffusers",
            f"--format diffusers needs a run whose network is a diffusers UNet2DModel (model.arch = 'diffusers'); "
            f"this one is a {run.config.model.arch!r} network: export it with --format safetensors")
    cls = scheduler_class(run)  # (refused before anything is written)
    _check_out(out, overwrite)
    diffusers = require_module("diffusers")
    scheduler = getattr(diffusers, cls)(**scheduler_config(run))
    pipe = diffusers.DDPMPipeline(unet=run.denoiser.net.unet, scheduler=scheduler)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def export_safetensors(run, out: str | Path, overwrite: bool = False) -> Path:
    """Write the denoiser's state dict (``model.safetensors``) and ``run.json`` (config, shape, step, source)."""
    from safetensors.torch import save_file

    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in run.denoiser.state_dict().items()}
    meta = {"config": run.config.to_dict(), "shape": list(run.shape), "step": run.step,
            "source": None if run.path is None else str(run.path)}
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1))
    return out


def export_run(run, out: str | Path, fmt: str = "diffusers", overwrite: bool = False) -> Path:
    """``export_diffusers`` or ``export_safetensors`` by ``fmt``."""
    require(fmt in FORMATS, f"unknown export format {fmt!r}: use {' or '.join(FORMATS)}")
    return (export_diffusers if fmt == "diffusers" else export_safetensors)(run, out, overwrite)
