"""EDM's ``EDMPrecond(SongUNet)`` (or VPPrecond / VEPrecond) -> difflab's ``EDMPrecond(UNet)``: arguments,
preconditioning and an explicit tensor-name mapping, from the records of ``edm_snapshot.read_edm_snapshot``.

difflab's :class:`~difflab.nets.unet.UNet` is SongUNet's DDPM++ layout ('standard' encoder and decoder, resample
filter [1, 1], one attention head, a noise embedding of width model_channels), so such a snapshot maps tensor for
tensor (EDM names under the precond's ``model.``, difflab names of the UNet):

    map_noise.freqs ('fourier')                noise_embed.freqs
    map_label.{weight,bias}                    label_embed.*            rows: halves swapped
    map_layer0.weight, .bias                   emb0.weight, .bias       weight columns: halves swapped
    map_layer1.*                               emb1.*
    enc.{R}x{R}_conv.*                         conv_in.*
    enc.{r}x{r}_down, _block{i} (in order)     enc.{k}.*
    dec.{r}x{r}_in0, _in1, _up, _block{i}      dec.{k}.*
    dec.{R}x{R}_aux_norm.*, _aux_conv.*        norm_out.*, conv_out.*
    (block) norm0 conv0 affine norm1 conv1 skip   the same names
    (block) norm2, qkv, proj                   attn.norm, attn.qkv, attn.proj   qkv rows (C, 3) -> (3, C)

The halves swap: SongUNet flips its [cos, sin] noise features to [sin, cos] before map_layer0 (and adds the label
embedding after the flip); difflab feeds [cos, sin]. The qkv reorder: SongUNet splits its 3C channels as (head,
channel, q/k/v), difflab as (q/k/v, head, channel). Left out: ``map_augment.weight`` (augmentation labels, which EDM
does not pass when sampling) and the [1, 1] ``resample_filter`` buffers of up/down blocks (difflab's 2x2 average
pooling and nearest upsampling are that filter). NCSN++ settings, DhariwalUNet and iDDPMPrecond are refused.
"""

from __future__ import annotations

import math

import torch

from difflab.denoisers import EDMPrecond, Precond, VEPrecond, VPPrecond
from difflab.errors import require
from difflab.nets.unet import UNet
from difflab.schedules import VPSchedule

SONGUNET_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4,
                         num_blocks=4, attn_resolutions=(16,), dropout=0.10, label_dropout=0,
                         embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                         decoder_type="standard", resample_filter=(1, 1))
SONGUNET_ARGS = ("img_resolution", "in_channels", "out_channels", *SONGUNET_DEFAULTS)  # SongUNet's positional order
PRECONDS = {"EDMPrecond": dict(sigma_data=0.5), "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
            "VEPrecond": {}}  # the supported EDM wrappers and their defaults
MODEL = "model."  # the wrapper's name for the backbone
BLOCK_LAYERS = {"norm0": ("norm0", ""), "conv0": ("conv0", ""), "affine": ("affine", ""), "norm1": ("norm1", ""),
                "conv1": ("conv1", ""), "skip": ("skip", ""), "norm2": ("attn.norm", ""),
                "qkv": ("attn.qkv", "qkv"), "proj": ("attn.proj", "")}  # EDM UNetBlock layer -> (difflab, reorder)
SHOWN = 3  # names shown per kind of mismatch


def _network(records: dict) -> dict:
    net = records.get("ema", records) if isinstance(records, dict) else None
    require(isinstance(net, dict) and "class_name" in net and "modules" in net and "state_dict" in net,
            "expected the records of read_edm_snapshot (or their 'ema' entry)")
    return net


def _song_config(model: dict, net: dict) -> dict:
    """SongUNet's arguments: its recorded init args/kwargs over SongUNet's defaults (else the wrapper's kwargs)."""
    args, kwargs = model.get("init_args") or (), model.get("init_kwargs")
    if kwargs is None and not args:
        outer = net.get("init_kwargs")
        require(isinstance(outer, dict), f"the EDM snapshot's {net['class_name']} and SongUNet record no constructor "
                                         f"arguments (init_kwargs), so the network's configuration is unknown")
        kwargs = {k: v for k, v in outer.items() if k in SONGUNET_DEFAULTS or k == "img_resolution"}
        kwargs["in_channels"] = kwargs["out_channels"] = outer.get("img_channels")
    require(isinstance(args, (tuple, list)) and len(args) <= len(SONGUNET_ARGS) and isinstance(kwargs or {}, dict),
            "the EDM SongUNet's recorded constructor arguments are malformed")
    cfg = {**SONGUNET_DEFAULTS, **dict(zip(SONGUNET_ARGS[:len(args)], args, strict=True)), **(kwargs or {})}
    unknown = sorted(set(cfg) - set(SONGUNET_ARGS))
    require(not unknown, f"EDM SongUNet argument(s) {', '.join(map(str, unknown[:SHOWN]))} unknown to difflab's "
                         f"importer (a modified SongUNet?)")
    missing = [k for k in SONGUNET_ARGS[:3] if cfg.get(k) is None]
    require(not missing, f"the EDM SongUNet records no {', '.join(missing)}")
    return cfg


def _unet_kwargs(cfg: dict) -> dict:
    """difflab UNet arguments for a SongUNet configuration; one-line refusal naming a setting it cannot represent."""
    def supported(ok: bool, setting: str, why: str) -> None:
        require(ok, f"EDM SongUNet {setting} is not supported: {why}")

    def seq(key: str) -> tuple:
        require(isinstance(cfg[key], (list, tuple)), f"EDM SongUNet {key} {cfg[key]!r} is not a list")
        return tuple(cfg[key])

    ddpmpp = "difflab's U-Net has the DDPM++ layout of SongUNet"
    supported(cfg["encoder_type"] == "standard", f"encoder_type={cfg['encoder_type']!r}", ddpmpp + " ('standard')")
    supported(cfg["decoder_type"] == "standard", f"decoder_type={cfg['decoder_type']!r}", ddpmpp + " ('standard')")
    supported(list(seq("resample_filter")) == [1, 1], f"resample_filter={list(cfg['resample_filter'])}",
              "difflab resamples with the [1, 1] filter (2x2 average pooling, nearest upsampling) only")
    supported(cfg["channel_mult_noise"] == 1, f"channel_mult_noise={cfg['channel_mult_noise']!r}",
              "difflab's noise embedding has width model_channels (channel_mult_noise=1)")
    supported(cfg["embedding_type"] in ("positional", "fourier"), f"embedding_type={cfg['embedding_type']!r}",
              "use 'positional' or 'fourier'")
    supported(cfg["in_channels"] == cfg["out_channels"],
              f"in_channels={cfg['in_channels']} with out_channels={cfg['out_channels']}",
              "difflab's U-Net outputs as many channels as it takes")
    mult, res = seq("channel_mult"), cfg["img_resolution"]
    levels = {res >> level for level in range(len(mult))} if isinstance(res, int) else set()
    return dict(img_channels=cfg["in_channels"], img_resolution=res, model_channels=cfg["model_channels"],
                channel_mult=mult, num_blocks=cfg["num_blocks"],
                attn_resolutions=tuple(r for r in seq("attn_resolutions") if r in levels),  # SongUNet ignores others
                dropout=float(cfg["dropout"]), embedding=cfg["embedding_type"], emb_mult=cfg["channel_mult_emb"],
                num_classes=cfg["label_dim"], label_dropout=float(cfg["label_dropout"]), num_heads=1)


def _block_keys(res: int, levels: int, num_blocks: int) -> tuple[list[str], list[str]]:
    """SongUNet's ModuleDict keys of the encoder blocks (after the input conv) and the decoder blocks, in order."""
    enc, dec = [], []
    for level in range(levels):
        r = res >> level
        enc += ([f"{r}x{r}_down"] if level else []) + [f"{r}x{r}_block{i}" for i in range(num_blocks)]
    for level in range(levels - 1, -1, -1):
        r = res >> level
        dec += [f"{r}x{r}_in0", f"{r}x{r}_in1"] if level == levels - 1 else [f"{r}x{r}_up"]
        dec += [f"{r}x{r}_block{i}" for i in range(num_blocks + 1)]
    return enc, dec


def layer_table(cfg: dict) -> dict[str, tuple[str, str]]:
    """EDM layer path (under ``model.``) -> (difflab UNet layer path, reorder: '', 'rows', 'cols' or 'qkv')."""
    r = cfg["img_resolution"]
    table = {"map_noise": ("noise_embed", ""), "map_label": ("label_embed", "rows"), "map_layer0": ("emb0", "cols"),
             "map_layer1": ("emb1", ""), f"enc.{r}x{r}_conv": ("conv_in", ""),
             f"dec.{r}x{r}_aux_norm": ("norm_out", ""), f"dec.{r}x{r}_aux_conv": ("conv_out", "")}
    enc, dec = _block_keys(r, len(cfg["channel_mult"]), cfg["num_blocks"])
    for side, keys in (("enc", enc), ("dec", dec)):
        for k, key in enumerate(keys):
            for sub, (target, reorder) in BLOCK_LAYERS.items():
                table[f"{side}.{key}.{sub}"] = (f"{side}.{k}.{target}", reorder)
    return table


def _swap_halves(t: torch.Tensor, dim: int) -> torch.Tensor:
    h = t.shape[dim] // 2
    return torch.cat([t.narrow(dim, h, t.shape[dim] - h), t.narrow(dim, 0, h)], dim)


def _reorder(t: torch.Tensor, reorder: str, leaf: str) -> torch.Tensor:
    """EDM's tensor in difflab's channel order (the swaps are their own inverses; qkv with one head)."""
    if reorder == "rows":
        return _swap_halves(t, 0)
    if reorder == "cols" and leaf == "weight":
        return _swap_halves(t, 1)
    if reorder == "qkv":
        c = t.shape[0] // 3
        return t.reshape(c, 3, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def _check_layers(modules: dict, tensors: dict) -> None:
    """The layer attributes difflab's U-Net hard-codes (GroupNorm eps and groups, block scales, embedding)."""
    for name, m in modules.items():
        a, cls = m.get("attributes") or {}, m.get("class_name")
        where = f"EDM layer {name} ({cls})"
        if cls == "GroupNorm" and f"{name}.weight" in tensors:
            c = tensors[f"{name}.weight"].shape[0]
            require(a.get("eps", 1e-6) == 1e-6 and a.get("num_groups", min(32, c // 4)) == min(32, c // 4),
                    f"{where} has eps {a.get('eps')} and {a.get('num_groups')} groups: difflab's U-Net uses "
                    f"eps 1e-6 and min(32, {c} // 4) groups")
        elif cls == "UNetBlock":
            require(not a.get("adaptive_scale", False) and a.get("num_heads", 1) in (0, 1)
                    and math.isclose(float(a.get("skip_scale", math.sqrt(0.5))), math.sqrt(0.5)),
                    f"{where} has adaptive_scale={a.get('adaptive_scale')}, num_heads={a.get('num_heads')}, "
                    f"skip_scale={a.get('skip_scale')}: difflab's U-Net block is SongUNet's (False, 1, sqrt(0.5))")
        elif cls == "PositionalEmbedding":
            require(a.get("max_positions", 10000) == 10000 and a.get("endpoint", True) is True,
                    f"{where} has max_positions={a.get('max_positions')}, endpoint={a.get('endpoint')}: difflab's "
                    f"sinusoidal embedding is SongUNet's (10000, True)")
        elif cls == "Conv2d":
            require(not a.get("fused_resample", False), f"{where} uses fused_resample: not in difflab's U-Net")


def _map_tensors(edm: dict, cfg: dict, unet_kwargs: dict) -> tuple[dict, list[str]]:
    """(difflab UNet state dict, EDM names left out); one-line error naming missing/unexpected/misshapen names."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in UNet(**unet_kwargs).state_dict().items()}
    table, found, dropped, unexpected = layer_table(cfg), {}, [], []
    for name, t in edm.items():
        layer, _, leaf = name.removeprefix(MODEL).rpartition(".")
        if not name.startswith(MODEL):
            unexpected.append(name)
        elif layer == "map_augment":
            dropped.append(name)
        elif leaf == "resample_filter" and layer in table:
            require(t.shape == (1, 1, 2, 2) and bool((t == 0.25).all()),
                    f"EDM {name} is not the [1, 1] filter: difflab resamples with [1, 1] only")
            dropped.append(name)
        elif layer in table and f"{table[layer][0]}.{leaf}" in expected:
            found[f"{table[layer][0]}.{leaf}"] = (name, t, table[layer][1], leaf)
        else:
            unexpected.append(name)
    missing = [k for k in expected if k not in found]

    def few(names: list[str]) -> str:
        return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")

    require(not missing and not unexpected,
            f"the EDM snapshot's tensors do not match difflab's U-Net for its SongUNet arguments: {len(missing)} "
            f"missing ({few(missing) or '-'}), {len(unexpected)} unexpected ({few(unexpected) or '-'})")
    bad = [f"{name} {tuple(t.shape)} for {k} {expected[k]}" for k, (name, t, _, _) in found.items()
           if tuple(t.shape) != expected[k]]
    require(not bad, f"the EDM snapshot's tensors have other shapes than difflab's U-Net for its SongUNet "
                     f"arguments: {len(bad)} differ ({few(bad)})")
    state = {k: _reorder(t, reorder, leaf).contiguous() for k, (_, t, reorder, leaf) in found.items()}
    return state, dropped


def _number(a: dict, key: str) -> float:
    v = a.get(key)
    require(isinstance(v, (int, float)) and not isinstance(v, bool), f"the EDM network's {key} {v!r} is not a number")
    return float(v)


def _precond(net: dict) -> dict:
    """{'name': 'edm', 'sigma_data'} / {'name': 'vp', 'beta_d', 'beta_min', 'epsilon_t'} / {'name': 've'}."""
    cls = net["class_name"]
    a = {**PRECONDS[cls], **(net.get("init_kwargs") or {}), **(net.get("attributes") or {})}
    if cls == "EDMPrecond":
        return {"name": "edm", "sigma_data": _number(a, "sigma_data")}
    if cls == "VEPrecond":
        return {"name": "ve"}
    require(_number(a, "M") == 1000, f"EDM VPPrecond with M={a['M']} is not supported: difflab's uses M = 1000")
    return {"name": "vp", **{k: _number(a, k) for k in ("beta_d", "beta_min", "epsilon_t")}}


def convert(records: dict) -> tuple[dict, dict, dict, list[str]]:
    """:func:`edm_to_difflab` plus the EDM tensor names left out (``map_augment.weight``, resample filters)."""
    net = _network(records)
    cls = net["class_name"]
    require(cls in PRECONDS, f"EDM network {cls!r} is not supported: only EDMPrecond snapshots (and VPPrecond, "
                             f"VEPrecond) over a SongUNet are")
    model = net["modules"].get("model")
    require(isinstance(model, dict), f"the EDM {cls} has no 'model' backbone")
    require(model["class_name"] == "SongUNet", f"EDM backbone {model['class_name']!r} is not supported: difflab's "
                                               f"U-Net has the layout of EDM's SongUNet (DDPM++) only")
    cfg = _song_config(model, net)
    unet_kwargs = _unet_kwargs(cfg)
    _check_layers(net["modules"], net["state_dict"])
    state, dropped = _map_tensors(net["state_dict"], cfg, unet_kwargs)
    return unet_kwargs, _precond(net), state, dropped


def edm_to_difflab(records: dict) -> tuple[dict, dict, dict]:
    """(difflab UNet kwargs, preconditioning, UNet state dict) from :func:`read_edm_snapshot` records.

    The preconditioning is ``{'name': 'edm', 'sigma_data': 0.5}`` (or 'vp' with beta_d, beta_min, epsilon_t, or
    've'); the state dict is in the UNet's names (a denoiser's without its ``net.``). One-line
    :class:`DifflabError` for an unsupported wrapper, backbone or setting, or tensors that do not map.
    """
    unet_kwargs, precond, state, _ = convert(records)
    return unet_kwargs, precond, state


def build_precond(net: UNet, precond: dict) -> Precond:
    """difflab's wrapper for a :func:`edm_to_difflab` preconditioning around ``net``."""
    if precond["name"] == "edm":
        return EDMPrecond(net, precond["sigma_data"])
    if precond["name"] == "ve":
        return VEPrecond(net)
    return VPPrecond(net, VPSchedule(precond["beta_d"], precond["beta_min"], precond["epsilon_t"]))


def denoiser_from_records(records: dict) -> tuple[Precond, dict]:
    """(difflab denoiser in eval mode with the snapshot's weights, info) from :func:`read_edm_snapshot` records.

    ``info``: ``network`` (EDM wrapper class), ``backbone``, ``precond``, ``unet`` (difflab UNet kwargs),
    ``edm_kwargs`` (the wrapper's recorded init kwargs), ``img_resolution``, ``img_channels``, ``label_dim``,
    ``use_fp16``, ``sigma_min``, ``sigma_max`` (None where not recorded), ``dropped`` (EDM tensors left out) and
    ``dataset_kwargs`` (the snapshot's, if any).
    """
    unet_kwargs, precond, state, dropped = convert(records)
    net = UNet(**unet_kwargs)
    net.load_state_dict(state)
    den = build_precond(net, precond).eval()
    ema = _network(records)
    a = {**(ema.get("init_kwargs") or {}), **(ema.get("attributes") or {})}
    info = {"network": ema["class_name"], "backbone": "SongUNet", "precond": precond, "unet": unet_kwargs,
            "edm_kwargs": ema.get("init_kwargs"), **{k: a.get(k) for k in ("img_resolution", "img_channels",
                                                                            "label_dim", "use_fp16", "sigma_min",
                                                                            "sigma_max")},
            "dropped": dropped, "dataset_kwargs": records.get("dataset_kwargs") if "ema" in records else None}
    return den, info
