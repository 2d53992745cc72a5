"""A DDPM++ U-Net for images: the layout of EDM's SongUNet (Song et al. 2021; Karras et al. 2022).

Encoder: a 3x3 input conv, then per resolution level ``num_blocks`` residual blocks of width
``model_channels * channel_mult[level]``, with a downsampling residual block between levels. Decoder: a middle pair of
blocks (the first with self-attention) at the lowest resolution, then per level ``num_blocks + 1`` blocks, each taking
the matching encoder activation concatenated on the channel axis, with an upsampling block between levels. Output:
GroupNorm, SiLU, 3x3 conv. Self-attention follows the encoder blocks and the last decoder block of every level whose
resolution is in ``attn_resolutions``.

Residual block: GroupNorm, SiLU, (resample,) 3x3 conv, + Linear(emb) per channel, GroupNorm, SiLU, dropout, 3x3 conv;
the skip path is a 1x1 conv when the width or resolution changes; the sum is scaled by 1/sqrt(2), as is the sum after
attention. Downsampling is 2x2 average pooling, upsampling nearest-neighbour (EDM's resample filter [1, 1]).
Weights are Xavier-uniform with zero biases; the last conv of each residual block, the attention output projection and
the output conv start at 1e-5 of that scale, so the network starts close to the zero function.

Noise conditioning: ``c_noise`` (B,) -> sinusoidal ('positional') or random Fourier features ('fourier', fixed
Gaussian frequencies of scale 16 kept in the state dict) of width ``model_channels``, plus an optional class-label
embedding, then a two-layer SiLU MLP to width ``model_channels * emb_mult``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError, require
from difflab.nets.mlp import SinusoidalEmbedding

UNET_PRESETS: dict[str, dict] = {
    # 8x8 CPU tests and quick digits runs: 0.19M parameters, attention at 4x4 (pass attn_resolutions for other sizes);
    # forward + backward of 64 8x8 images in ~30 ms on one CPU thread (model_channels=32: 0.75M, ~60-90 ms).
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0),
    # CPU-trainable model for 8x8 or 16x16 digits: 1.75M parameters, 3 levels, attention at 4x4.
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(4,), dropout=0.1),
    # The DDPM++ CIFAR-10 network of Song et al. 2021 / EDM (55.73M parameters at 32x32, 3 channels).
    "cifar10": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                    embedding="positional", emb_mult=4),
}

_SKIP_SCALE = 1.0 / math.sqrt(2.0)
_SMALL_INIT = 1e-5


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters of ``module`` (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())


def _options() -> tuple[str, ...]:
    """The keyword options of :class:`UNet` (model.unet.KEY), its image size and channels left out."""
    import inspect

    return tuple(n for n in inspect.signature(UNet.__init__).parameters if n not in ("self", "img_channels",
                                                                                      "img_resolution"))


def unet_from_preset(name: str, img_channels: int, img_resolution: int, **overrides) -> UNet:
    """A :class:`UNet` from the keyword set ``UNET_PRESETS[name]``, updated with ``overrides``."""
    require(isinstance(name, str) and name in UNET_PRESETS,
            f"unknown U-Net preset {name!r}: use one of {', '.join(sorted(UNET_PRESETS))}")
    kwargs = {**UNET_PRESETS[name], **overrides}
    return UNet(img_channels, img_resolution, **kwargs)


def _num_groups(channels: int) -> int:
    return min(32, channels // 4)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6)


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times ``scale``, zero bias; returns ``layer``."""
    nn.init.xavier_uniform_(layer.weight)
    with torch.no_grad():
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _conv(cin: int, cout: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), scale)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi c f_k), sin(2 pi c f_k)], f_k ~ N(0, scale^2) fixed at construction.

    (B,) -> (B, dim); ``dim`` even; the frequencies are a persistent buffer (saved with the weights).
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        a = c.reshape(-1, 1).to(self.freqs.dtype) * (2 * math.pi * self.freqs)
        return torch.cat([a.cos(), a.sin()], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions: x + proj(attn(qkv(norm(x)))), scaled by 1/sqrt(2).

    (B, C, H, W) -> (B, C, H, W); ``C`` divisible by ``num_heads``.
    """

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels)
        self.qkv = _conv(channels, 3 * channels, 1, scale=math.sqrt(0.2))
        self.proj = _conv(channels, channels, 1, scale=_SMALL_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C / heads)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.transpose(-1, -2).reshape(b, c, h, w)
        return (x + self.proj(a)) * _SKIP_SCALE


class ResBlock(nn.Module):
    """DDPM++ residual block conditioned on the embedding, optionally resampling and followed by attention.

    ``(x (B, cin, H, W), emb (B, emb_channels)) -> (B, cout, H', W')`` with H' = H/2 for ``resample='down'``,
    2H for ``'up'``, H otherwise.
    """

    def __init__(self, cin: int, cout: int, emb_channels: int, resample: str = "none", attention: bool = False,
                 num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        self.cin, self.cout, self.resample = cin, cout, resample
        self.norm0 = _group_norm(cin)
        self.conv0 = _conv(cin, cout, 3)
        self.affine = _init(nn.Linear(emb_channels, cout))
        self.norm1 = _group_norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(cout, cout, 3, scale=_SMALL_INIT)
        self.skip = _conv(cin, cout, 1) if (cin != cout or resample != "none") else None
        self.attn = Attention(cout, num_heads) if attention else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + self.affine(emb)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        s = self._resample(x)
        if self.skip is not None:
            s = self.skip(s)
        x = (h + s) * _SKIP_SCALE
        if self.attn is not None:
            x = self.attn(x)
        return x


@dataclass(frozen=True)
class _BlockSpec:
    cin: int
    cout: int
    res: int  # resolution of the block's output
    resample: str = "none"
    attention: bool = False
    takes_skip: bool = False  # decoder block fed [x, encoder activation] on the channel axis
    where: str = ""


def _plan(img_resolution: int, model_channels: int, channel_mult: tuple[int, ...], num_blocks: int,
          attn_resolutions: tuple[int, ...]) -> tuple[list[_BlockSpec], list[_BlockSpec], int]:
    """Encoder and decoder block specs and the final width, as plain data (nothing allocated)."""
    enc, dec = [], []
    cout = model_channels
    skips = [cout]  # the input conv's output
    for level, mult in enumerate(channel_mult):
        res = img_resolution >> level
        if level > 0:
            enc.append(_BlockSpec(cout, cout, res, resample="down", where=f"encoder down to {res}x{res}"))
            skips.append(cout)
        for i in range(num_blocks):
            enc.append(_BlockSpec(cout, model_channels * mult, res, attention=res in attn_resolutions,
                                  where=f"encoder block {i} at {res}x{res}"))
            cout = model_channels * mult
            skips.append(cout)
    last = len(channel_mult) - 1
    for level in range(last, -1, -1):
        res = img_resolution >> level
        if level == last:
            dec.append(_BlockSpec(cout, cout, res, attention=True, where=f"middle block 0 at {res}x{res}"))
            dec.append(_BlockSpec(cout, cout, res, where=f"middle block 1 at {res}x{res}"))
        else:
            dec.append(_BlockSpec(cout, cout, res, resample="up", where=f"decoder up to {res}x{res}"))
        for i in range(num_blocks + 1):
            cin = cout + skips.pop()
            cout = model_channels * channel_mult[level]
            dec.append(_BlockSpec(cin, cout, res, attention=(i == num_blocks and res in attn_resolutions),
                                  takes_skip=True, where=f"decoder block {i} at {res}x{res}"))
    return enc, dec, cout


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_options(img_channels, img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions, dropout,
                   embedding, emb_mult, num_classes, label_dropout, num_heads) -> tuple[tuple, tuple]:
    """Refuse bad :class:`UNet` arguments in one line each; returns (channel_mult, attn_resolutions) as tuples."""
    require(_is_int(img_channels) and img_channels >= 1,
            f"UNet img_channels must be an int >= 1, got {img_channels!r}")
    require(_is_int(img_resolution) and img_resolution >= 1,
            f"UNet img_resolution must be an int >= 1, got {img_resolution!r}")
    require(_is_int(model_channels) and model_channels >= 2 and model_channels % 2 == 0,
            f"UNet model_channels must be an even int >= 2 (the noise-embedding width), got {model_channels!r}")
    require(isinstance(channel_mult, (tuple, list)) and len(channel_mult) >= 1
            and all(_is_int(m) and m >= 1 for m in channel_mult),
            f"UNet channel_mult must be a non-empty sequence of ints >= 1, got {channel_mult!r}")
    channel_mult = tuple(channel_mult)
    require(_is_int(num_blocks) and num_blocks >= 1, f"UNet num_blocks must be an int >= 1, got {num_blocks!r}")
    require(isinstance(attn_resolutions, (tuple, list)) and all(_is_int(r) for r in attn_resolutions),
            f"UNet attn_resolutions must be a sequence of ints, got {attn_resolutions!r}")
    attn_resolutions = tuple(attn_resolutions)
    require(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
            f"UNet dropout must be in [0, 1), got {dropout!r}")
    require(embedding in ("positional", "fourier"),
            f"UNet embedding must be 'positional' or 'fourier', got {embedding!r}")
    require(_is_int(emb_mult) and emb_mult >= 1, f"UNet emb_mult must be an int >= 1, got {emb_mult!r}")
    require(_is_int(num_classes) and num_classes >= 0, f"UNet num_classes must be an int >= 0, got {num_classes!r}")
    require(isinstance(label_dropout, (int, float)) and 0.0 <= label_dropout <= 1.0,
            f"UNet label_dropout must be in [0, 1], got {label_dropout!r}")
    require(label_dropout == 0 or num_classes > 0, "UNet label_dropout > 0 needs num_classes > 0")
    require(_is_int(num_heads) and num_heads >= 1, f"UNet num_heads must be an int >= 1, got {num_heads!r}")
    levels = len(channel_mult)
    require(img_resolution % (2 ** (levels - 1)) == 0,
            f"UNet img_resolution {img_resolution} must be divisible by 2**(levels - 1) = {2 ** (levels - 1)} "
            f"for {levels} levels (channel_mult {channel_mult}): use fewer levels or another resolution")
    resolutions = [img_resolution >> level for level in range(levels)]
    bad = [r for r in attn_resolutions if r not in resolutions]
    require(not bad, f"UNet attn_resolutions {bad} never occur: the levels' resolutions are "
                     f"{tuple(resolutions)} for img_resolution {img_resolution} and channel_mult {channel_mult}")
    return channel_mult, attn_resolutions


def _check_widths(specs: list[_BlockSpec], num_heads: int) -> None:
    """Every block's widths split into its GroupNorm groups and, with attention, into ``num_heads`` heads."""
    for spec in specs:
        for c in (spec.cin, spec.cout):
            g = _num_groups(c)
            require(g >= 1 and c % g == 0,
                    f"UNet GroupNorm over {c} channels ({spec.where}) needs them divisible by min(32, {c} // 4) "
                    f"= {g} groups: use a model_channels that is a multiple of 32 or change channel_mult")
        require(not spec.attention or spec.cout % num_heads == 0,
                f"UNet attention over {spec.cout} channels ({spec.where}) is not divisible by "
                f"num_heads {num_heads}")


class UNet(nn.Module):
    """DDPM++ U-Net backbone ``net(x_in (B, C, H, W), c_noise (B,), class_labels=None) -> (B, C, H, W)``.

    Args:
        img_channels: C, channels of input and output.
        img_resolution: H = W; divisible by 2**(len(channel_mult) - 1).
        model_channels: base width (128); level widths are model_channels * channel_mult[level].
        channel_mult: width multiplier per resolution level ((1, 2, 2, 2)).
        num_blocks: residual blocks per encoder level (4); the decoder has num_blocks + 1 per level.
        attn_resolutions: resolutions with self-attention ((16,)); each must be one of the levels' resolutions.
        dropout: dropout probability inside residual blocks (0.10).
        embedding: noise embedding, 'positional' (sinusoidal) or 'fourier' (random Gaussian frequencies, scale 16).
        emb_mult: embedding width = model_channels * emb_mult (4).
        num_classes: 0 for an unconditional net (class_labels must then be None); > 0 adds a label embedding.
        label_dropout: probability of zeroing a row's label in training mode, for classifier-free guidance (0.0).
        num_heads: attention heads (1, as in DDPM++).

    Raises:
        DifflabError: bad arguments, before any allocation.
    """

    def __init__(self, img_channels: int, img_resolution: int, model_channels: int = 128,
                 channel_mult: tuple[int, ...] = (1, 2, 2, 2), num_blocks: int = 4,
                 attn_resolutions: tuple[int, ...] = (16,), dropout: float = 0.10, embedding: str = "positional",
                 emb_mult: int = 4, num_classes: int = 0, label_dropout: float = 0.0, num_heads: int = 1):
        super().__init__()
        channel_mult, attn_resolutions = _check_options(
            img_channels, img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions, dropout,
            embedding, emb_mult, num_classes, label_dropout, num_heads)
        enc, dec, c_last = _plan(img_resolution, model_channels, channel_mult, num_blocks, attn_resolutions)
        _check_widths(enc + dec, num_heads)

        self.config = dict(img_channels=img_channels, img_resolution=img_resolution, model_channels=model_channels,
                           channel_mult=channel_mult, num_blocks=num_blocks, attn_resolutions=attn_resolutions,
                           dropout=float(dropout), embedding=embedding, emb_mult=emb_mult, num_classes=num_classes,
                           label_dropout=float(label_dropout), num_heads=num_heads)
        self.img_channels, self.img_resolution = img_channels, img_resolution
        self.num_classes, self.label_dropout = num_classes, float(label_dropout)
        emb_channels = model_channels * emb_mult

        if embedding == "positional":
            self.noise_embed = SinusoidalEmbedding(model_channels)
        else:
            self.noise_embed = FourierEmbedding(model_channels, scale=16.0)
        self.label_embed = _init(nn.Linear(num_classes, model_channels)) if num_classes else None
        self.emb0 = _init(nn.Linear(model_channels, emb_channels))
        self.emb1 = _init(nn.Linear(emb_channels, emb_channels))

        def block(s: _BlockSpec) -> ResBlock:
            return ResBlock(s.cin, s.cout, emb_channels, s.resample, s.attention, num_heads, dropout)

        self.conv_in = _conv(img_channels, model_channels, 3)
        self.enc = nn.ModuleList(block(s) for s in enc)
        self.dec = nn.ModuleList(block(s) for s in dec)
        self._dec_takes_skip = [s.takes_skip for s in dec]
        self.norm_out = _group_norm(c_last)
        self.conv_out = _conv(c_last, img_channels, 3, scale=_SMALL_INIT)

    def _labels(self, class_labels: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B,) ints (-1: unconditional) or (B, num_classes) floats or None -> (B, num_classes) float label
        vectors; None and -1 give the zero vector."""
        n = self.num_classes
        if class_labels is None:
            return like.new_zeros(batch, n)
        if class_labels.ndim == 1 and not class_labels.is_floating_point():
            require(class_labels.shape[0] == batch,
                    f"UNet class_labels has {class_labels.shape[0]} entries for a batch of {batch}")
            if ((class_labels < -1) | (class_labels >= n)).any():
                raise DifflabError(f"UNet class_labels must lie in [0, {n}) (or be -1: unconditional), got values "
                                   f"in [{int(class_labels.min())}, {int(class_labels.max())}]")
            return F.one_hot(class_labels.long() + 1, n + 1)[:, 1:].to(like.dtype)
        require(tuple(class_labels.shape) == (batch, n),
                f"UNet class_labels must be (B,) ints or (B, num_classes) = ({batch}, {n}) floats, "
                f"got {tuple(class_labels.shape)} {class_labels.dtype}")
        return class_labels.to(like.dtype)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), c_noise (B,) or a scalar, class_labels (B,) ints / (B, num_classes) / None -> (B, C, H, W).

        A None label with num_classes > 0 is the unconditional (zero) label; labels with num_classes = 0 raise.
        """
        c, r = self.img_channels, self.img_resolution
        require(x.ndim == 4 and tuple(x.shape[1:]) == (c, r, r),
                f"UNet expects input of shape (B, {c}, {r}, {r}), got {tuple(x.shape)}")
        b = x.shape[0]
        c_noise = torch.as_tensor(c_noise, device=x.device).reshape(-1)
        require(c_noise.numel() in (1, b),
                f"UNet c_noise must have shape ({b},) or be a scalar, got {tuple(c_noise.shape)}")
        c_noise = c_noise.expand(b)
        emb = self.noise_embed(c_noise).to(x.dtype)
        if self.label_embed is not None:
            y = self._labels(class_labels, b, emb)
            if self.training and self.label_dropout > 0:
                y = y * (torch.rand(b, 1, device=y.device) >= self.label_dropout).to(y.dtype)
            emb = emb + self.label_embed(y * math.sqrt(self.num_classes))
        else:
            require(class_labels is None, "UNet got class_labels but was built with num_classes = 0: "
                                          "set num_classes or pass class_labels=None")
        emb = F.silu(self.emb1(F.silu(self.emb0(emb))))

        h = self.conv_in(x)
        skips = [h]
        for blk in self.enc:
            h = blk(h, emb)
            skips.append(h)
        for blk, takes_skip in zip(self.dec, self._dec_takes_skip, strict=True):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


UNET_OPTIONS = _options()  # model.unet.KEY: what a config may set
