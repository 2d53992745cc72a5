"""A diffusers ``UNet2DModel`` as a difflab backbone ``F(x_in, c_noise)`` (model.arch = "diffusers").

The wrapped model sees what diffusers' schedulers feed it: the VP sample x_t and the 0-based training timestep.
difflab's discrete VP preconditioning passes t in 1..T (``abar[t]``, index 0 being clean data), and diffusers'
``alphas_cumprod[t - 1]`` is the same level, so the timestep handed on is ``c_noise - 1``. A model trained here is
therefore a diffusers model as it stands (``difflab export --format diffusers``), and an imported one sees the
timesteps it was trained with. A flow-matching model (precond flow) is fed diffusers' flow-match timestep 1000 t as
it is (``offset = 0``), as its FlowMatch schedulers do. Needs the ``diffusers`` extra.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.errors import DifflabError
from difflab.extras import require_module

# config keys diffusers writes beside the model's own (not UNet2DModel arguments)
META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# a small default for 8x8 or 16x16 images (the keys of UNet2DModel; overridden by model.diffusers)
DEFAULT_CONFIG = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                  "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                  "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def unet_config(overrides: dict, shape: tuple[int, ...]) -> dict:
    """The UNet2DModel config for images of ``shape`` (C, H, W): the default, then ``overrides`` (model.diffusers);
    channels and size follow the data."""
    cfg = {**DEFAULT_CONFIG, **{k: v for k, v in overrides.items() if k not in META_KEYS}}
    return {**cfg, "sample_size": shape[1], "in_channels": cfg.get("in_channels", shape[0]),
            "out_channels": cfg.get("out_channels", shape[0])}


class DiffusersUNet(nn.Module):
    """``F(x_in, c_noise) = unet(x_in, c_noise - offset).sample``; ``unet`` a diffusers UNet2DModel (its state dict
    is this module's under ``unet.``); ``offset`` 1 for a DDPM network (t in 1..T to diffusers' 0-based index), 0
    for a flow-matching one (1000 t)."""

    def __init__(self, unet: nn.Module, offset: int = 1):
        super().__init__()
        self.unet, self.offset = unet, offset

    @classmethod
    def from_config(cls, config: dict, offset: int = 1) -> DiffusersUNet:
        """A randomly initialised UNet2DModel of this config (keys of UNet2DModel; diffusers' own defaults apply)."""
        diffusers = require_module("diffusers")
        try:
            return cls(diffusers.UNet2DModel(**{k: v for k, v in config.items() if k not in META_KEYS}), offset)
        except (TypeError, ValueError) as e:
            raise DifflabError(f"bad model.diffusers config for UNet2DModel ({e})") from None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **cond) -> torch.Tensor:
        """The UNet's output for x (B, C, H, W) and c_noise (B,); ``cond`` its keywords (class_labels (B,) for a model
        with class embeddings; none for an unconditional one)."""
        return self.unet(x, c_noise - self.offset if self.offset else c_noise, **cond).sample
