"""diffusers model folders as runs: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a
``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with a scheduler config beside
it (``scheduler_config.json`` in the folder, or ``../scheduler/``).

The network is loaded with diffusers' own ``UNet2DModel.from_pretrained`` from local files only and from
safetensors only (a pickled ``.bin`` is refused: loading it could run code). The scheduler config's class
(``_class_name``) says how to read it, and any other class is refused in one line:

- a DDPM-family scheduler (:data:`DDPM_SCHEDULERS`: DDPM, DDIM, PNDM, DPM-Solver, Euler, Heun, LMS, UniPC, DEIS,
  KDPM2, ...), whose config is a DDPM beta schedule and what the network predicts, each fed the 0-based training
  timestep: it gives the run's DDPM schedule (``num_train_timesteps``, ``beta_schedule``, ``beta_start``,
  ``beta_end``; keys it lacks take that class's own defaults, as diffusers would) and the network's parametrisation
  (``prediction_type``: epsilon, sample or v_prediction -> difflab's eps, x0 or v preconditioning);
- ``FlowMatchEulerDiscreteScheduler`` or ``FlowMatchHeunDiscreteScheduler``: a flow-matching velocity network
  v(x_t, 1000 t) on x_t = (1 - t) x0 + t n (difflab's ``flow`` preconditioning); the scheduler's ``shift`` becomes
  the run's ``schedule.shift``, the default shift of the flow-euler / flow-heun samplers, which then step the
  scheduler's own grid. Options those samplers do not reproduce (:data:`FLOW_REFUSED`) and another
  ``num_train_timesteps`` than 1000 are refused in one line naming the key,

so every difflab sampler and objective sees the model as its scheduler would.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

from difflab.config import RunConfig, validate
from difflab.denoisers import FlowPrecond
from difflab.errors import DifflabError, require, short
from difflab.extras import require_module

SCHEDULE_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
UNET_CLASS = "UNet2DModel"
# diffusers' schedulers whose config is a DDPM beta schedule (num_train_timesteps, beta_schedule, beta_start,
# beta_end, trained_betas) with the network's prediction_type, all of the same meaning, and that feed the network
# the 0-based training timestep (checked in diffusers' source; EulerDiscrete's timestep_type "continuous" and the
# use_flow_sigmas of the multistep solvers are refused below). LCM and TCD (distilled models) are not among them.
DDPM_SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
FLOW_T = FlowPrecond.T  # the timestep scale of difflab's flow-matching networks: they see 1000 t
# FlowMatchEulerDiscreteScheduler options difflab's flow samplers do not reproduce (refused when set, i.e. truthy,
# as diffusers tests them), with the fix. (FlowMatchHeunDiscreteScheduler has num_train_timesteps and shift only.)
FLOW_REFUSED = {
    "use_dynamic_shifting": "set it to false and shift to the shift to sample with (exp(mu) for a resolution's mu; "
                            "difflab's flow samplers take one fixed shift)",
    "use_karras_sigmas": "set it to false (difflab's flow samplers step diffusers' default shifted-linear grid)",
    "use_exponential_sigmas": "set it to false (difflab's flow samplers step diffusers' default shifted-linear grid)",
    "use_beta_sigmas": "set it to false (difflab's flow samplers step diffusers' default shifted-linear grid)",
    "invert_sigmas": "difflab imports flow networks that see the timestep 1000 t at noise level t (invert_sigmas "
                     "false); an inverted-schedule (Mochi-style) model cannot be imported",
    "shift_terminal": "remove it (null) (difflab's flow grid ends at diffusers' default, shift(1 / 1000))",
    "stochastic_sampling": "set it to false (difflab's flow samplers solve the deterministic ODE: flow-euler, "
                           "flow-heun)",
}
# the DDPM-family keys a config may lack, at DDPMScheduler's defaults (used where diffusers lacks the class)
DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                 "prediction_type": "epsilon"}


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DifflabError(f"cannot read {path} ({short(e)}): a diffusers folder needs valid JSON configs") from None
    require(isinstance(d, dict), f"{path} is not a JSON object: a diffusers folder needs valid JSON configs")
    return d


def is_diffusers_folder(path: str | Path) -> bool:
    """A pipeline folder (model_index.json) or a folder whose config.json is a diffusers model's (_class_name)."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        return True
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "_class_name" in json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def find_parts(path: str | Path) -> tuple[Path, Path]:
    """(the UNet2DModel folder, the scheduler config file) of a pipeline or model folder."""
    p = Path(path)
    if (p / "model_index.json").is_file():
        index = _read_json(p / "model_index.json")
        unet = index.get("unet")
        require(isinstance(unet, list) and len(unet) == 2 and unet[1] == UNET_CLASS,
                f"{p}: the pipeline's unet is {unet!r}; difflab imports pipelines whose unet is a {UNET_CLASS}")
        unet_dir, sched = p / "unet", p / "scheduler" / "scheduler_config.json"
    else:
        cls = _read_json(p / "config.json").get("_class_name")
        require(cls == UNET_CLASS, f"{p} holds a diffusers {cls}: difflab imports a {UNET_CLASS} (or a pipeline of "
                                   "one)")
        unet_dir = p
        sched = next((c for c in (p / "scheduler_config.json", p.parent / "scheduler" / "scheduler_config.json")
                      if c.is_file()), p / "scheduler_config.json")
    require(sched.is_file(), f"{p}: no scheduler config ({sched}): a diffusers model needs its scheduler's "
                             "scheduler_config.json beside it (the noise schedule and prediction type it was trained "
                             "with)")
    require((unet_dir / "config.json").is_file(), f"{p}: no {unet_dir / 'config.json'} (the {UNET_CLASS} config)")
    return unet_dir, sched


def scheduler_class(sched: dict, where: Path) -> str:
    """The scheduler config's class (``_class_name``), if difflab understands it (refused in one line if not)."""
    cls = sched.get("_class_name")
    understood = f"{', '.join(DDPM_SCHEDULERS)} (a DDPM beta schedule) or {' or '.join(FLOW_SCHEDULERS)} (flow " \
                 "matching)"
    require(cls is not None, f"{where} names no scheduler class (_class_name): difflab reads the configs of "
                             f"{understood}")
    require(cls in DDPM_SCHEDULERS or cls in FLOW_SCHEDULERS,
            f"{where}: scheduler class {cls!r} is not one difflab understands: it reads the configs of {understood}")
    return cls


def flow_schedule(sched: dict, cls: str, where: Path) -> dict:
    """The run's ``schedule`` section ({"shift": ...}) from a FlowMatch scheduler config; what difflab's flow
    samplers do not reproduce is refused in one line naming the key and the fix."""
    T = sched.get("num_train_timesteps", FLOW_T)
    require(T == FLOW_T,
            f"{where}: {cls} with num_train_timesteps {T!r} is not supported: difflab's flow-matching networks see "
            f"the timestep {FLOW_T} t (num_train_timesteps = {FLOW_T}, diffusers' default); a network trained on "
            "another scale cannot be imported")
    if cls == "FlowMatchEulerDiscreteScheduler":
        for key, fix in FLOW_REFUSED.items():
            require(not sched.get(key), f"{where}: {cls} with {key} = {json.dumps(sched.get(key))} is not supported: "
                                        f"{fix}")
    shift = sched.get("shift", 1.0)
    require(isinstance(shift, (int, float)) and not isinstance(shift, bool) and math.isfinite(shift) and shift > 0,
            f"{where}: {cls} shift {shift!r} must be a number > 0 (SD3's timestep shift; 1: none)")
    return {"shift": float(shift)}


def class_defaults(cls: str) -> dict:
    """The keyword defaults of diffusers' scheduler class ``cls`` (what it takes for keys a config lacks)."""
    diffusers = require_module("diffusers")
    c = getattr(diffusers, cls, None)
    if c is None:
        return {}
    return {k: p.default for k, p in inspect.signature(c.__init__).parameters.items() if p.default is not p.empty}


def ddpm_schedule(sched: dict, cls: str, where: Path) -> tuple[dict, str]:
    """The run's ``schedule`` section and preconditioning name from a DDPM-family scheduler config."""
    sched = {**DDPM_DEFAULTS, **{k: v for k, v in class_defaults(cls).items() if k in DDPM_DEFAULTS}, **sched}
    kind = sched["beta_schedule"]
    require(sched.get("trained_betas") is None, f"{where}: a scheduler with trained_betas is not supported")
    require(not sched.get("rescale_betas_zero_snr", False),
            f"{where}: rescale_betas_zero_snr (zero terminal SNR) is not supported")
    require(not sched.get("use_flow_sigmas", False),
            f"{where}: {cls} with use_flow_sigmas = true (a flow-matching model) is not supported: save its scheduler "
            "as a FlowMatchEulerDiscreteScheduler (shift = its flow_shift)")
    require(kind in SCHEDULE_KINDS, f"{where}: beta_schedule {kind!r} is not supported: use one of "
                                    f"{', '.join(SCHEDULE_KINDS)}")
    prediction = sched["prediction_type"]
    require(prediction in PREDICTIONS, f"{where}: prediction_type {prediction!r} is not supported: use one of "
                                       f"{', '.join(PREDICTIONS)} (a flow-matching model: a "
                                       "FlowMatchEulerDiscreteScheduler config)")
    require(not (sched.get("timestep_type") == "continuous" and prediction == "v_prediction"),
            f"{where}: {cls} with timestep_type 'continuous' (the network sees 0.25 log sigma) is not supported: "
            "difflab feeds the 0-based training timestep (timestep_type 'discrete')")
    section = {"T": int(sched["num_train_timesteps"]), "kind": SCHEDULE_KINDS[kind],
               "beta_start": float(sched["beta_start"]), "beta_end": float(sched["beta_end"])}
    return section, PREDICTIONS[prediction]


def schedule_and_prediction(sched: dict, where: Path) -> tuple[dict, str]:
    """The run's ``schedule`` section and preconditioning name from a diffusers scheduler config, by its class:
    a DDPM-family one (the beta schedule; eps, x0 or v) or a FlowMatch one (the shift; flow)."""
    cls = scheduler_class(sched, where)
    if cls in FLOW_SCHEDULERS:
        return flow_schedule(sched, cls, where), "flow"
    return ddpm_schedule(sched, cls, where)


def load_unet(unet_dir: Path):
    """diffusers' UNet2DModel.from_pretrained on a local folder, safetensors weights only."""
    diffusers = require_module("diffusers")
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    require(weights.is_file(), f"{unet_dir}: no {weights.name} (difflab loads safetensors weights only; a pickled "
                               ".bin could run code: convert it to safetensors first)")
    try:
        return diffusers.UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True,
                                                     low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise DifflabError(f"cannot load the {UNET_CLASS} in {unet_dir} ({short(e)})") from None


def load_diffusers_model(path: str | Path) -> tuple:
    """(denoiser, config, shape, state) of a diffusers pipeline or UNet2DModel folder: the parts of a
    :class:`~difflab.runs.Run` (step 0, no data set: a fine-tune names its own with --data). A class-conditional
    UNet (num_class_embeds) samples with class labels. A pipeline whose model_index.json names a scheduler of the
    other kind (flow matching or not) than its scheduler config is refused: the two would be different models."""
    from difflab.models import build_denoiser
    from difflab.nets.diffusers_unet import META_KEYS

    p = Path(path)
    unet_dir, sched_path = find_parts(p)
    sched = _read_json(sched_path)
    schedule, precond = schedule_and_prediction(sched, sched_path)
    if (p / "model_index.json").is_file():  # diffusers' pipeline loading takes the class model_index.json names
        listed = _read_json(p / "model_index.json").get("scheduler")
        listed = listed[1] if isinstance(listed, list) and len(listed) == 2 else sched["_class_name"]
        require((listed in FLOW_SCHEDULERS) == (precond == "flow"),
                f"{p}: model_index.json names the scheduler {listed!r} but {sched_path} is a "
                f"{sched['_class_name']}: make them agree")
    unet = load_unet(unet_dir)
    ucfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if k not in META_KEYS}
    size = ucfg.get("sample_size")
    size = size if isinstance(size, int) else size[0] if isinstance(size, list) and len(set(size)) == 1 else None
    require(size is not None, f"{unet_dir}: sample_size {ucfg.get('sample_size')!r}: difflab needs square images")
    require(ucfg.get("out_channels", ucfg.get("in_channels")) == ucfg.get("in_channels"),
            f"{unet_dir}: out_channels {ucfg.get('out_channels')} != in_channels {ucfg.get('in_channels')} (a UNet "
            "that also predicts variances, variance_type learned?): difflab reads one prediction of the image's shape")
    require(ucfg.get("class_embed_type") is None,  # (num_class_embeds alone: class indices, which difflab passes)
            f"{unet_dir}: class_embed_type {ucfg.get('class_embed_type')!r} is not supported: difflab passes class "
            "indices (num_class_embeds)")
    cfg = RunConfig()
    cfg.data.name = ""  # an imported model names no data set
    cfg.model.arch, cfg.model.diffusers, cfg.model.precond = "diffusers", ucfg, precond
    for k, v in schedule.items():
        setattr(cfg.schedule, k, v)
    cfg = validate(cfg)
    shape = (int(ucfg["in_channels"]), size, size)
    denoiser = build_denoiser(cfg, shape)
    denoiser.net.unet.load_state_dict(unet.state_dict())
    state = {"imported": "diffusers", "source": str(p), "scheduler": sched["_class_name"], "step": 0,
             "shape": list(shape), "config": cfg.to_dict()}
    return denoiser.eval().requires_grad_(False), cfg, shape, state
