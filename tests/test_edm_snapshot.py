"""EDM network snapshots: fixtures pickled the way EDM's ``torch_utils.persistence`` pickles (written here, without
EDM's code), read without running anything, mapped onto difflab's U-Net and checked against an independent
re-implementation of SongUNet's forward pass."""

import contextlib
import copy
import io
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from difflab.denoisers import EDMPrecond as DifflabEDMPrecond
from difflab.denoisers import VEPrecond, VPPrecond
from difflab.errors import DifflabError
from difflab.imports.edm_snapshot import SnapshotUnpickler, load_edm_snapshot, read_edm_snapshot
from difflab.imports.edm_songunet import denoiser_from_records, edm_to_difflab
from difflab.nets.unet import unet_from_preset

# ------------------------------------------------------------------ EDM's persistence, as its pickles show it

_PERSISTENCE = types.ModuleType("torch_utils.persistence")
_SOURCE = {"text": ""}  # module_src of every persistent class: a marker-writing program in these tests


def _reconstruct_persistent_obj(meta):  # the global EDM's pickles call; difflab must never call it
    raise AssertionError("EDM's reconstructor was called")


_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_PERSISTENCE._reconstruct_persistent_obj = _reconstruct_persistent_obj
_DNNLIB_UTIL = types.ModuleType("dnnlib.util")


class EasyDict(dict):
    """dnnlib.util.EasyDict, EDM's config dict."""


EasyDict.__module__ = _DNNLIB_UTIL.__name__
_DNNLIB_UTIL.EasyDict = EasyDict


@contextlib.contextmanager
def _edm_persistence():
    """torch_utils.persistence and dnnlib.util in sys.modules while pickling (pickle checks that the globals it
    names are importable); gone again before anything is read."""
    modules = {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": _PERSISTENCE,
               "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": _DNNLIB_UTIL}
    modules["torch_utils"].persistence, modules["dnnlib"].util = _PERSISTENCE, _DNNLIB_UTIL
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def persistent(cls):
    """EDM's ``@persistent_class`` as its pickles show it: the instance keeps deep copies of its constructor
    arguments (``_init_args``, ``_init_kwargs``) and pickles as ``_reconstruct_persistent_obj(meta)`` with
    meta = {type: 'class', version: 6, module_src, class_name, state: the state of object.__reduce__ (__dict__)}."""

    class Persistent(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)

        def __reduce__(self):
            fields = list(super().__reduce__()) + [None, None]  # object.__reduce__: (_reconstructor, args, state)
            meta = dict(type="class", version=6, module_src=_SOURCE["text"], class_name=cls.__name__,
                        state=fields[2])
            return (_reconstruct_persistent_obj, (meta,), None)

    Persistent.__name__ = Persistent.__qualname__ = cls.__name__
    return Persistent


# ------------------------------------------------------------------ SongUNet's layout and maths, re-implemented


def _param(*shape, fan_in=None, around=0.0):
    scale = 1 / math.sqrt(fan_in) if fan_in else 0.1
    return torch.nn.Parameter(around + scale * torch.randn(*shape))


@persistent
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, **init):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param(out_features, in_features, fan_in=in_features)
        self.bias = _param(out_features) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


@persistent
class Conv2d(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=(1, 1),
                 fused_resample=False, **init):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = _param(out_channels, in_channels, kernel, kernel, fan_in=in_channels * kernel**2) if kernel \
            else None
        self.bias = _param(out_channels) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x):
        c = x.shape[1]
        if self.up:  # transposed depthwise conv with 4 x filter: [1, 1] -> nearest-neighbour upsampling
            x = F.conv_transpose2d(x, 4 * self.resample_filter.to(x.dtype).repeat(c, 1, 1, 1), stride=2, groups=c)
        if self.down:  # depthwise conv with the filter, stride 2: [1, 1] -> 2x2 average pooling
            x = F.conv2d(x, self.resample_filter.to(x.dtype).repeat(c, 1, 1, 1), stride=2, groups=c)
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        return x if self.bias is None else x + self.bias.to(x.dtype)[:, None, None]


@persistent
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = _param(num_channels, around=1.0)
        self.bias = _param(num_channels)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


@persistent
class UNetBlock(torch.nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False, num_heads=None,
                 channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=(1, 1), resample_proj=False,
                 adaptive_scale=True, init=None, init_zero=None, init_attn=None):
        super().__init__()
        assert not adaptive_scale, "only SongUNet's blocks are re-implemented here"
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (num_heads if num_heads is not None else out_channels // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        init, init_zero = init or {}, init_zero if init_zero is not None else dict(init_weight=0)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        s = float(self.skip_scale)
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (x if self.skip is None else self.skip(x))) * s
        if self.num_heads:
            b, c, hh, ww = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, hh * ww)
            q, k, v = qkv.unbind(2)  # (B * heads, C / heads, HW): channels laid out as (head, channel, q/k/v)
            w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(q.shape[1]), dim=2)
            x = (self.proj(torch.einsum("nqk,nck->ncq", w, v).reshape(b, c, hh, ww)) + x) * s
        return x


@persistent
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32) / (half - int(self.endpoint)))
        a = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([a.cos(), a.sin()], dim=1)


@persistent
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        a = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([a.cos(), a.sin()], dim=1)


@persistent
class SongUNet(torch.nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0, model_channels=128,
                 channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.10,
                 label_dropout=0, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        self.label_dropout = label_dropout
        emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init, init_zero = dict(init_mode="xavier_uniform"), dict(init_mode="xavier_uniform", init_weight=1e-5)
        block = dict(emb_channels=emb, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                     init_zero=init_zero, init_attn=dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2)))
        self.map_noise = (PositionalEmbedding(num_channels=noise, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(num_channels=noise))
        self.map_label = Linear(in_features=label_dim, out_features=noise, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise, bias=False, **init) if augment_dim \
            else None
        self.map_layer0 = Linear(in_features=noise, out_features=emb, **init)
        self.map_layer1 = Linear(in_features=emb, out_features=emb, **init)
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            r = img_resolution >> level
            if level == 0:
                self.enc[f"{r}x{r}_conv"] = Conv2d(in_channels=cout, out_channels=model_channels, kernel=3, **init)
                cout = model_channels
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"] = UNetBlock(in_channels=cout, out_channels=model_channels * mult,
                                                          attention=r in attn_resolutions, **block)
                cout = model_channels * mult
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(channel_mult))):
            r = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(in_channels=cout, out_channels=cout, **block)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * channel_mult[level]
                self.dec[f"{r}x{r}_block{i}"] = UNetBlock(in_channels=cin, out_channels=cout,
                                                          attention=i == num_blocks and r in attn_resolutions, **block)
            if level == 0:
                self.dec[f"{r}x{r}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{r}x{r}_aux_conv"] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3,
                                                       **init_zero)

    def forward(self, x, noise_labels, class_labels=None):
        emb = self.map_noise(noise_labels)
        half = emb.shape[1] // 2
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)  # SongUNet feeds [sin, cos]
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for name, blk in self.dec.items():
            if name.endswith("aux_norm"):
                tmp = blk(x)
            elif name.endswith("aux_conv"):
                out = blk(F.silu(tmp))
            else:
                if x.shape[1] != blk.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = blk(x, emb)
        return out


@persistent
class EDMPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"),
                 sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__()
        assert model_type == "SongUNet"
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (img_resolution, img_channels,
                                                                                 label_dim, use_fp16)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma):
        sigma, sd = sigma.reshape(-1, 1, 1, 1), self.sigma_data
        labels = torch.zeros(1, self.label_dim, dtype=x.dtype) if self.label_dim else None
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), labels)


@persistent
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data


# ------------------------------------------------------------------ fixtures

DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1])  # EDM train.py's --arch=ddpmpp


def edm_net(**overrides) -> EDMPrecond:
    """An EDMPrecond(SongUNet) with EDM's train.py arguments for DDPM++ (shrunk to 8x8), random weights."""
    torch.manual_seed(0)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=0, **DDPMPP, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], dropout=0.13, augment_dim=9, use_fp16=False)
    return EDMPrecond(**{**kwargs, **overrides}).eval().requires_grad_(False)


@pytest.fixture
def marker(tmp_path):
    """The file the snapshot's module_src (or a hostile pickle) would create; it must never appear."""
    path = tmp_path / "EXECUTED"
    _SOURCE["text"] = f"import pathlib\npathlib.Path({str(path)!r}).write_text('EDM module_src was executed')\n"
    yield path
    assert not path.exists(), "code from the pickle was executed"


DATASET_KWARGS = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                      use_labels=False, xflip=False, cache=True, resolution=8, max_size=50000)


def write_snapshot(path, net, **extra):
    """``pickle.dump`` of the dict EDM's training loop writes to network-snapshot-*.pkl."""
    data = {**dict(ema=net, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dict(DATASET_KWARGS)), **extra}
    with _edm_persistence(), open(path, "wb") as f:
        pickle.dump(data, f)
    return path


@pytest.fixture
def snapshot(tmp_path, marker):
    net = edm_net()
    return write_snapshot(tmp_path / "network-snapshot-000100.pkl", net), net


class _Call:
    """Pickles as the call fn(*args): how a hostile pickle runs code."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ------------------------------------------------------------------ reading


def test_records_carry_the_classes_arguments_and_the_real_state_dict(snapshot):
    path, net = snapshot
    rec = read_edm_snapshot(path)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules
    assert list(rec) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = rec["ema"]
    assert (ema["class_name"], ema["persistent"], ema["version"], ema["module_name"]) == ("EDMPrecond", True, 6, None)
    assert ema["init_args"] == () and ema["init_kwargs"] == net._init_kwargs
    assert ema["attributes"]["sigma_data"] == 0.5 and ema["attributes"]["img_resolution"] == 8
    mods = ema["modules"]
    assert mods["model"]["class_name"] == "SongUNet" and mods["model"]["init_kwargs"]["augment_dim"] == 9
    assert (mods["model.enc"]["module_name"], mods["model.enc"]["class_name"], mods["model.enc"]["persistent"]) == (
        "torch.nn.modules.container", "ModuleDict", False)
    block = mods["model.enc.4x4_block0"]
    assert block["class_name"] == "UNetBlock" and block["attributes"]["num_heads"] == 1
    skip_scale = block["attributes"]["skip_scale"]  # a numpy float64 in the pickle, a Python float here
    assert type(skip_scale) is float and skip_scale == float(np.sqrt(0.5))
    assert block["init_kwargs"]["init_attn"]["init_weight"] == float(np.sqrt(0.2))
    real = net.state_dict()
    assert list(ema["state_dict"]) == list(real)  # the same names in the same order as a real state_dict()
    assert all(torch.equal(ema["state_dict"][k], v) for k, v in real.items())
    assert "model.enc.8x8_block0.skip.weight" not in real  # no skip conv where the width stays: nothing invented
    assert rec["loss_fn"]["class_name"] == "EDMLoss" and rec["loss_fn"]["attributes"] == dict(
        P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    assert rec["augment_pipe"] is None and rec["dataset_kwargs"] == DATASET_KWARGS


def test_the_fixture_pickles_the_globals_edm_writes(snapshot):
    """EDM's snapshot, protocol and globals: the persistent reconstructor, OrderedDict hooks, torch's tensor and
    storage rebuilders, torch.nn.ModuleDict, and numpy's scalar (skip_scale = np.sqrt(0.5))."""
    path, _ = snapshot
    seen = set()

    class Spy(SnapshotUnpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    raw = path.read_bytes()
    assert raw[:2] == bytes([0x80, pickle.DEFAULT_PROTOCOL])
    with open(path, "rb") as f:
        Spy(f).load()
    scalar = np.float64(0.5).__reduce__()[0]
    assert seen == {("torch_utils.persistence", "_reconstruct_persistent_obj"), ("collections", "OrderedDict"),
                    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_tensor_v2"),
                    ("torch.storage", "_load_from_bytes"), ("torch.nn.modules.container", "ModuleDict"),
                    (scalar.__module__, scalar.__name__), ("numpy", "dtype")}
    assert raw.count(_SOURCE["text"].encode()) == 1  # one module_src, shared by every persistent object (memo)


def test_tensors_of_any_layout_and_dtype_are_rebuilt_and_easydicts_become_dicts(tmp_path, marker):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = dict(transposed=base.T, offset=base[1:, 2:], half=torch.randn(5).half(), bf16=torch.randn(3).bfloat16(),
                   flags=torch.tensor([True, False]), ints=torch.arange(3), empty=torch.empty(0, 3),
                   scalar=torch.tensor(2.5), expanded=torch.ones(3).expand(1000, 3),
                   parameter=torch.nn.Parameter(torch.randn(2, 2)))
    got = SnapshotUnpickler(io.BytesIO(pickle.dumps(tensors))).load()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.detach()), k
    path = write_snapshot(tmp_path / "easy.pkl", edm_net(), dataset_kwargs=EasyDict(DATASET_KWARGS))
    assert type(read_edm_snapshot(path)["dataset_kwargs"]) is dict


# ------------------------------------------------------------------ mapping onto difflab


def _unet_as_edm(unet, edm: EDMPrecond) -> None:
    """Copy a difflab UNet's weights into the EDM network of the same configuration, walking both layouts."""
    m, half = edm.model, unet.emb0.weight.shape[1] // 2

    def put(dst, src, weight=None, bias=None):
        with torch.no_grad():
            dst.weight.copy_(src.weight if weight is None else weight)
            if getattr(src, "bias", None) is not None:
                dst.bias.copy_(src.bias if bias is None else bias)

    def swap(t, dim):
        return torch.cat([t.narrow(dim, half, half), t.narrow(dim, 0, half)], dim)

    put(m.map_layer0, unet.emb0, weight=swap(unet.emb0.weight, 1))
    put(m.map_layer1, unet.emb1)
    enc, dec = list(m.enc.values()), list(m.dec.values())
    put(enc[0], unet.conv_in)
    put(dec[-2], unet.norm_out)
    put(dec[-1], unet.conv_out)
    for mine, theirs in zip(enc[1:] + dec[:-2], list(unet.enc) + list(unet.dec), strict=True):
        for name in ("norm0", "conv0", "affine", "norm1", "conv1", "skip"):
            if getattr(theirs, name) is not None:
                put(getattr(mine, name), getattr(theirs, name))
        if theirs.attn is not None:
            c = theirs.attn.proj.weight.shape[0]
            put(mine.norm2, theirs.attn.norm)
            put(mine.proj, theirs.attn.proj)
            w, b = theirs.attn.qkv.weight, theirs.attn.qkv.bias  # rows (q/k/v, channel) -> EDM's (channel, q/k/v)
            put(mine.qkv, theirs.attn.qkv, weight=w.reshape(3, c, c, 1, 1).transpose(0, 1).reshape(w.shape),
                bias=b.reshape(3, c).T.reshape(-1))


def test_a_difflab_unet_survives_the_round_trip_through_an_edm_snapshot(tmp_path, marker):
    torch.manual_seed(1)
    unet = unet_from_preset("tiny", 3, 8)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(0.3 * torch.randn_like(p))  # away from the near-zero init, so that every weight shows
    original = DifflabEDMPrecond(unet, 0.5).eval()
    cfg = unet.config
    edm = edm_net(model_channels=cfg["model_channels"], channel_mult=list(cfg["channel_mult"]),
                  num_blocks=cfg["num_blocks"], attn_resolutions=list(cfg["attn_resolutions"]), augment_dim=0)
    _unet_as_edm(unet, edm)
    den, info = load_edm_snapshot(write_snapshot(tmp_path / "roundtrip.pkl", edm))
    assert isinstance(den, DifflabEDMPrecond) and not den.training and den.sigma_data == 0.5
    assert den.net.config == {**cfg, "dropout": 0.13}
    x, sigma = torch.randn(6, 3, 8, 8), torch.tensor([0.002, 0.05, 0.5, 2.0, 20.0, 80.0])
    with torch.no_grad():
        assert torch.equal(den(x, sigma), original(x, sigma))
        torch.testing.assert_close(edm(x, sigma), original(x, sigma), rtol=1e-5, atol=1e-5)  # EDM's maths agree
    assert all(torch.equal(den.net.state_dict()[k], v) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("overrides", [
    dict(),  # DDPM++ as EDM trains it for CIFAR-10: positional embedding, augment_dim 9
    dict(embedding_type="fourier", label_dim=3, num_blocks=2, channel_mult=[1, 2, 2], attn_resolutions=[8, 4],
         augment_dim=0, sigma_data=1.0),
])
def test_the_imported_denoiser_computes_what_edm_computes(tmp_path, marker, overrides):
    edm = edm_net(**overrides)
    den, info = load_edm_snapshot(write_snapshot(tmp_path / "snap.pkl", edm))
    assert info["network"] == "EDMPrecond" and info["precond"] == {"name": "edm", "sigma_data": edm.sigma_data}
    assert info["img_resolution"] == 8 and info["label_dim"] == edm.label_dim
    assert ("model.map_augment.weight" in info["dropped"]) == bool(edm.model.map_augment is not None)
    assert "model.enc.4x4_down.conv0.resample_filter" in info["dropped"]
    edm.double()
    den.double()
    torch.manual_seed(2)
    x, sigma = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0]).double()
    with torch.no_grad():
        torch.testing.assert_close(den(x, sigma), edm(x, sigma), rtol=1e-6, atol=1e-6)
        if edm.label_dim:  # with labels: the backbone on its own, one-hot labels
            labels = torch.tensor([0, 1, 2, 1, 0])
            c_noise = sigma.log() / 4
            torch.testing.assert_close(den.net(x, c_noise, class_labels=labels),
                                       edm.model(x, c_noise, F.one_hot(labels, 3).double()), rtol=1e-6, atol=1e-6)


def test_vp_and_ve_wrappers_become_difflabs(snapshot):
    path, _ = snapshot
    rec = read_edm_snapshot(path)
    rec["ema"]["class_name"] = "VEPrecond"
    assert isinstance(denoiser_from_records(rec)[0], VEPrecond)
    rec["ema"]["class_name"] = "VPPrecond"
    rec["ema"]["attributes"].update(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    den, info = denoiser_from_records(rec)
    assert isinstance(den, VPPrecond) and (den.schedule.beta_d, den.schedule.beta_min) == (19.9, 0.1)
    assert info["precond"] == {"name": "vp", "beta_d": 19.9, "beta_min": 0.1, "epsilon_t": 1e-5}
    kwargs, precond, state = edm_to_difflab(rec)
    assert precond["name"] == "vp" and kwargs["model_channels"] == 16 and "conv_in.weight" in state


@pytest.mark.parametrize(("where", "key", "value", "named"), [
    ("model", "encoder_type", "residual", "encoder_type='residual'"),
    ("model", "decoder_type", "skip", "decoder_type='skip'"),
    ("model", "resample_filter", [1, 3, 3, 1], "resample_filter=[1, 3, 3, 1]"),
    ("model", "channel_mult_noise", 2, "channel_mult_noise=2"),
    ("model", "class_name", "DhariwalUNet", "DhariwalUNet"),
    ("ema", "class_name", "iDDPMPrecond", "only EDMPrecond snapshots"),
])
def test_what_difflabs_unet_cannot_represent_is_refused_in_one_line(snapshot, where, key, value, named):
    rec = read_edm_snapshot(snapshot[0])
    target = rec["ema"] if where == "ema" else rec["ema"]["modules"]["model"]
    (target if key == "class_name" else target["init_kwargs"])[key] = value
    with pytest.raises(DifflabError, match="not supported") as e:
        edm_to_difflab(rec)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_tensors_that_do_not_map_are_named(snapshot):
    rec = read_edm_snapshot(snapshot[0])
    sd = rec["ema"]["state_dict"]
    sd["model.extra.weight"] = sd.pop("model.map_layer1.weight")
    with pytest.raises(DifflabError, match=r"1 missing \(emb1.weight\), 1 unexpected \(model.extra.weight\)"):
        edm_to_difflab(rec)
    sd["model.map_layer1.weight"] = sd.pop("model.extra.weight")[:, :3]
    with pytest.raises(DifflabError, match=r"model.map_layer1.weight \(64, 3\) for emb1.weight \(64, 64\)"):
        edm_to_difflab(rec)


# ------------------------------------------------------------------ refusing


@pytest.mark.parametrize("hostile", ["os.system", "builtins.exec", "storage bytes", "torch.nn constructor"])
def test_a_snapshot_that_would_run_code_is_refused_unexecuted(tmp_path, marker, hostile):
    if hostile == "os.system":
        call, named = _Call(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    elif hostile == "builtins.exec":
        call, named = _Call(exec, f"open({str(marker)!r}, 'w').write('x')"), "builtins.exec"
    elif hostile == "storage bytes":  # torch itself would torch.load(weights_only=False) these bytes
        inner = pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2)
        call, named = _Call(torch.storage._load_from_bytes, inner), "inside a tensor's storage bytes"
    else:  # torch classes are recorded, never constructed
        call, named = _Call(torch.nn.Linear, 2, 3), "constructor arguments for torch.nn.modules.linear.Linear"
    path = write_snapshot(tmp_path / "hostile.pkl", edm_net(), dataset_kwargs=dict(DATASET_KWARGS, x=call))
    with pytest.raises(DifflabError, match="refused unexecuted") as e:
        load_edm_snapshot(path)
    assert named in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a snapshot", "missing"])
def test_a_damaged_or_foreign_file_gives_one_line(snapshot, damage):
    path, _ = snapshot
    bad = path.with_name("bad.pkl")
    if damage == "truncated":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "not a snapshot":
        bad.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DifflabError) as e:
        load_edm_snapshot(bad)
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg
    assert {"truncated": "truncated", "empty": "truncated", "not a snapshot": "no 'ema' network",
            "missing": "no EDM network snapshot"}[damage] in msg


# ------------------------------------------------------------------ as a run


def test_a_snapshot_is_a_run_sampled_fine_tuned_and_exported_from_the_cli(snapshot, tmp_path, marker, capsys):
    """Run.load / 'difflab sample' / 'train --init' read network-snapshot-*.pkl; its config rebuilds the very
    network (the fine-tune starts from its weights); a hostile snapshot is refused by the CLI unexecuted."""
    import json

    import numpy as np

    from difflab.cli import main
    from difflab.runs import Run

    path, _ = snapshot
    run = Run.load(path)
    den, _ = load_edm_snapshot(path)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 1.0, 40.0])
    with torch.no_grad():
        assert torch.equal(run.denoiser(x, sigma), den(x, sigma))
    assert run.shape == (3, 8, 8) and run.precond == "edm" and run.step == 0
    assert main(["sample", str(path), "--sampler", "heun", "--steps", "4", "--n", "3", "--out",
                 str(tmp_path / "s.npz"), "--quiet"]) == 0
    images = tmp_path / "imgs.npz"
    np.savez(images, images=np.random.default_rng(0).uniform(-1, 1, (64, 3, 8, 8)).astype(np.float32))
    assert main(["train", "--init", str(path), "--data", f"images:{images}", "--objective", "edm", "--steps", "2",
                 "--batch-size", "8", "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["model"]["arch"] == "unet" and saved["model"]["unet"]["model_channels"] == 16
    assert main(["export", str(tmp_path / "ft"), "--format", "safetensors", "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    call = _Call(os.system, f"touch {marker}")
    hostile = write_snapshot(tmp_path / "hostile.pkl", edm_net(), dataset_kwargs=dict(DATASET_KWARGS, x=call))
    assert main(["sample", str(hostile), "--n", "2", "--out", str(tmp_path / "h.npz"), "--quiet"]) == 2
    assert "refused unexecuted" in capsys.readouterr().err and not marker.exists()
