"""diffusers model folders as runs: a pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) or a
``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with a scheduler config beside
it (``scheduler_config.json`` in the folder, or ``../scheduler/``).

The network is loaded with diffusers' own ``UNet2DModel.from_pretrained`` from local files only and from
safetensors only (a pickled ``.bin`` is refused: loading it could run code). The scheduler config gives the run's
DDPM schedule (``num_train_timesteps``, ``beta_schedule``, ``beta_start``, ``beta_end``) and the network's
parametrisation (``prediction_type``: epsilon, sample or v_prediction -> difflab's eps, x0 or v
preconditioning), so every difflab sampler and objective sees the model as its scheduler would.
"""

from __future__ import annotations

import json
from pathlib import Path

from difflab.config import RunConfig, validate
from difflab.errors import DifflabError, require, short
from difflab.extras import require_module

SCHEDULE_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
UNET_CLASS = "UNet2DModel"


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


def schedule_and_prediction(sched: dict, where: Path) -> tuple[dict, str]:
    """The run's ``schedule`` section and preconditioning name from a diffusers scheduler config."""
    kind = sched.get("beta_schedule", "linear")
    require(sched.get("trained_betas") is None, f"{where}: a scheduler with trained_betas is not supported")
    require(not sched.get("rescale_betas_zero_snr", False),
            f"{where}: rescale_betas_zero_snr (zero terminal SNR) is not supported")
    require(kind in SCHEDULE_KINDS, f"{where}: beta_schedule {kind!r} is not supported: use one of "
                                    f"{', '.join(SCHEDULE_KINDS)}")
    prediction = sched.get("prediction_type", "epsilon")
    require(prediction in PREDICTIONS, f"{where}: prediction_type {prediction!r} is not supported: use one of "
                                       f"{', '.join(PREDICTIONS)}")
    section = {"T": int(sched.get("num_train_timesteps", 1000)), "kind": SCHEDULE_KINDS[kind],
               "beta_start": float(sched.get("beta_start", 1e-4)), "beta_end": float(sched.get("beta_end", 0.02))}
    return section, PREDICTIONS[prediction]


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
    UNet (num_class_embeds) samples with class labels."""
    from difflab.models import build_denoiser
    from difflab.nets.diffusers_unet import META_KEYS

    p = Path(path)
    unet_dir, sched_path = find_parts(p)
    schedule, precond = schedule_and_prediction(_read_json(sched_path), sched_path)
    unet = load_unet(unet_dir)
    ucfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if k not in META_KEYS}
    size = ucfg.get("sample_size")
    size = size if isinstance(size, int) else size[0] if isinstance(size, list) and len(set(size)) == 1 else None
    require(size is not None, f"{unet_dir}: sample_size {ucfg.get('sample_size')!r}: difflab needs square images")
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
    state = {"imported": "diffusers", "source": str(p), "step": 0, "shape": list(shape), "config": cfg.to_dict()}
    return denoiser.eval().requires_grad_(False), cfg, shape, state
