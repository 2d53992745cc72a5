"""The DDPM++ U-Net backbone: shapes, parameter counts, conditioning, labels, gradients, validation, a fit."""

import math

import pytest
import torch
from torch import nn

import difflab.nets.unet as unet_module
from difflab.errors import DifflabError
from difflab.nets.unet import UNET_PRESETS, UNet, count_parameters, unet_from_preset

# A very small model for fast checks (8x8, two levels, attention at 4x4 and in the middle).
TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), dropout=0.0)


def tiny(channels: int = 1, resolution: int = 8, **overrides) -> UNet:
    return UNet(channels, resolution, **{**TINY, **overrides})


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Full-scale Xavier weights and non-zero biases everywhere, so no layer starts (near) zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                m.bias.normal_(0.0, 0.1)
    return net


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("preset, channels, resolution, overrides", [
    ("tiny", 1, 8, {}),
    ("tiny", 3, 8, {"model_channels": 16, "embedding": "fourier"}),
    ("tiny", 2, 16, {"model_channels": 16, "attn_resolutions": (8,)}),
    ("small", 1, 16, {"model_channels": 16, "num_blocks": 1}),
    ("small", 1, 8, {"model_channels": 16, "num_heads": 2, "dropout": 0.0}),
    ("cifar10", 3, 16, {"model_channels": 16, "num_blocks": 1}),
    ("tiny", 1, 8, {"model_channels": 16, "channel_mult": (1,), "attn_resolutions": ()}),
    ("tiny", 4, 8, {"model_channels": 16, "channel_mult": (1, 2, 2, 1), "attn_resolutions": (2, 1)}),
])
def test_output_shape_equals_input_shape(preset, channels, resolution, overrides):
    torch.manual_seed(0)
    net = unet_from_preset(preset, channels, resolution, **overrides).eval()
    x = torch.randn(3, channels, resolution, resolution)
    out = net(x, torch.randn(3))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert net.config["img_channels"] == channels and net.config["img_resolution"] == resolution
    for k, v in overrides.items():
        assert net.config[k] == v


def test_cifar10_preset_parameter_count_matches_edm_ddpmpp():
    with torch.device("meta"):  # no real allocation for the 56M parameters
        net = unet_from_preset("cifar10", 3, 32)
    assert all(p.is_meta for p in net.parameters())
    n = count_parameters(net)
    assert abs(n - 55.73e6) / 55.73e6 < 0.01, n
    assert n == 55_732_739  # exact for this layout: any structural change shows here
    cfg = UNET_PRESETS["cifar10"]
    assert cfg["model_channels"] == 128 and tuple(cfg["channel_mult"]) == (2, 2, 2) and cfg["num_blocks"] == 4
    assert cfg["dropout"] == pytest.approx(0.13) and tuple(cfg["attn_resolutions"]) == (16,)
    with torch.device("meta"):  # labels add one Linear(num_classes, model_channels)
        cond = unet_from_preset("cifar10", 3, 32, num_classes=10)
    assert count_parameters(cond) - n == 10 * 128 + 128


def test_small_and_tiny_preset_sizes():
    with torch.device("meta"):
        small8, small16 = unet_from_preset("small", 1, 8), unet_from_preset("small", 1, 16)
        tiny8 = unet_from_preset("tiny", 1, 8)
    assert 0.5e6 <= count_parameters(small8) <= 2e6
    assert count_parameters(small8) == count_parameters(small16)  # conv weights do not depend on the resolution
    assert count_parameters(tiny8) < count_parameters(small8)
    assert count_parameters(nn.Linear(3, 2)) == 8


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
def test_noise_conditioning_changes_output(embedding):
    net = randomise(tiny(embedding=embedding)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a = net(x, torch.full((4,), -1.0))
        b = net(x, torch.full((4,), 1.0))
        t1, t500 = net(x, torch.full((4,), 1.0)), net(x, torch.full((4,), 500.0))  # DDPM eps form: timesteps
    assert rel_diff(a, b) > 1e-2
    assert rel_diff(t1, t500) > 1e-2
    with torch.no_grad():  # a scalar c_noise is broadcast over the batch
        assert torch.equal(net(x, torch.tensor(1.0)), b)


def test_embeddings_differ_and_fourier_frequencies_are_saved():
    torch.manual_seed(1)
    fourier = tiny(embedding="fourier")
    freqs = fourier.noise_embed.freqs
    assert freqs.shape == (8,) and 8.0 < freqs.std().item() < 32.0  # N(0, 16^2) draws
    assert "noise_embed.freqs" in fourier.state_dict()
    torch.manual_seed(2)
    other = tiny(embedding="fourier")
    assert not torch.equal(other.noise_embed.freqs, freqs)
    other.load_state_dict(fourier.state_dict())
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    randomise(fourier)
    other.load_state_dict(fourier.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eval()(x, c), fourier.eval()(x, c))
    positional = tiny(embedding="positional")
    emb = positional.noise_embed(torch.tensor([0.0]))
    assert emb.shape == (1, 16)
    assert torch.allclose(emb, torch.cat([torch.ones(8), torch.zeros(8)])[None])  # cos 0 = 1, sin 0 = 0


def test_class_labels_condition_the_output():
    net = randomise(tiny(num_classes=3)).eval()
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    with torch.no_grad():
        y0 = net(x, c, class_labels=torch.zeros(4, dtype=torch.long))
        y1 = net(x, c, class_labels=torch.ones(4, dtype=torch.long))
        onehot = net(x, c, class_labels=torch.eye(3)[[1, 1, 1, 1]])
        uncond = net(x, c)
        zeros = net(x, c, class_labels=torch.zeros(4, 3))
    assert rel_diff(y0, y1) > 1e-2
    assert torch.allclose(onehot, y1, atol=1e-6)  # int labels == their one-hot vectors
    assert torch.equal(uncond, zeros)  # None == the zero label vector
    assert rel_diff(uncond, y0) > 1e-2
    with pytest.raises(DifflabError, match=r"\[0, 3\)"):
        net(x, c, class_labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(DifflabError, match="class_labels"):
        net(x, c, class_labels=torch.zeros(4, 2))
    with pytest.raises(DifflabError, match="class_labels"):
        net(x, c, class_labels=torch.zeros(3, dtype=torch.long))


def test_class_labels_with_an_unconditional_net_raise():
    net = tiny()
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    assert net.label_embed is None
    with pytest.raises(DifflabError, match="num_classes = 0"):
        net(x, c, class_labels=torch.tensor([0, 1]))


def test_label_dropout_is_active_only_in_training_mode():
    torch.manual_seed(0)
    x, c = torch.randn(64, 1, 8, 8), torch.randn(64)
    labels = torch.randint(0, 3, (64,))
    net = randomise(tiny(num_classes=3, label_dropout=1.0))
    with torch.no_grad():
        net.train()  # the residual-block dropout is 0, so training mode differs only by label dropout
        assert torch.allclose(net(x, c, class_labels=labels), net(x, c), atol=1e-6)
        net.eval()
        assert rel_diff(net(x, c, class_labels=labels), net(x, c)) > 1e-2
    half = randomise(tiny(num_classes=3, label_dropout=0.5)).train()
    with torch.no_grad():
        cond, uncond = half(x, c, class_labels=labels), half(x, c)
    dropped = ((cond - uncond).flatten(1).abs().amax(1) < 1e-6).sum().item()
    assert 16 <= dropped <= 48  # Binomial(64, 0.5): P(outside) < 1e-4


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for net in (tiny(num_classes=2, embedding="fourier"), randomise(tiny(num_classes=2))):
        x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
        loss = (net(x, c, class_labels=torch.tensor([0, 1, 0, 1])) - torch.randn(4, 1, 8, 8)).square().mean()
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().max() > 0, name


def test_eval_mode_is_deterministic_and_training_mode_uses_dropout():
    net = randomise(tiny(dropout=0.3))
    x, c = torch.randn(4, 1, 8, 8), torch.randn(4)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, c), net(x, c))
        net.train()
        assert rel_diff(net(x, c), net(x, c)) > 1e-3


def test_batch_independence_in_eval_mode():
    net = randomise(tiny(num_classes=3)).eval()
    torch.manual_seed(3)
    x, c, y = torch.randn(5, 1, 8, 8), torch.randn(5), torch.randint(0, 3, (5,))
    with torch.no_grad():
        full = net(x, c, class_labels=y)
        assert full.abs().mean() > 0.1  # a non-trivial output, so 1e-5 is a tight tolerance
        for k in range(5):
            alone = net(x[k:k + 1], c[k:k + 1], class_labels=y[k:k + 1])
            assert torch.allclose(alone[0], full[k], atol=1e-5, rtol=0), k


@pytest.mark.parametrize("kwargs, match", [
    (dict(img_resolution=12, channel_mult=(1, 2, 2, 2)), "divisible by 2"),
    (dict(attn_resolutions=(3,)), r"attn_resolutions \[3\] never occur"),
    (dict(model_channels=14), "GroupNorm over 14 channels"),
    (dict(model_channels=2), "GroupNorm"),
    (dict(model_channels=15), "even"),
    (dict(embedding="learned"), "embedding"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_heads=3), "num_heads 3"),
    (dict(num_classes=-1), "num_classes"),
    (dict(label_dropout=0.5), "needs num_classes > 0"),
    (dict(num_classes=2, label_dropout=1.5), "label_dropout"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(img_channels=0), "img_channels"),
    (dict(emb_mult=0.5), "emb_mult"),
])
def test_bad_arguments_raise_before_any_allocation(kwargs, match, monkeypatch):
    def no_alloc(*args, **kw):
        raise AssertionError("allocated a layer before validating the arguments")

    monkeypatch.setattr(unet_module, "_conv", no_alloc)
    monkeypatch.setattr(unet_module, "_init", no_alloc)
    args = {"img_channels": 1, "img_resolution": 8, **TINY, **kwargs}
    with pytest.raises(DifflabError, match=match) as info:
        UNet(**args)
    assert "\n" not in str(info.value)


def test_unknown_preset_lists_the_names():
    with pytest.raises(DifflabError) as info:
        unet_from_preset("huge", 1, 8)
    msg = str(info.value)
    assert "\n" not in msg and "huge" in msg
    for name in UNET_PRESETS:
        assert name in msg
    with pytest.raises(DifflabError, match="never occur"):  # tiny's 4x4 attention is absent at 32x32 with 2 levels
        unet_from_preset("tiny", 1, 32)


def test_forward_rejects_wrong_shapes_naming_the_expected_one():
    net = tiny(channels=2)
    c = torch.zeros(2)
    for x in (torch.randn(2, 2, 8), torch.randn(2, 1, 8, 8), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 8, 4)):
        with pytest.raises(DifflabError, match=r"\(B, 2, 8, 8\)"):
            net(x, c)
    with pytest.raises(DifflabError, match="c_noise"):
        net(torch.randn(2, 2, 8, 8), torch.zeros(3))


@pytest.mark.slow
def test_training_reduces_mse_on_a_fixed_target():
    torch.manual_seed(0)
    net = tiny(model_channels=32)
    x, c, target = torch.randn(8, 1, 8, 8), torch.randn(8), torch.randn(8, 1, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = (net(x, c) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])  # asked: 5x; about 1e5x is typical here
