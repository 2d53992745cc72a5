"""Class-conditional training (labels through every objective, label dropout) and classifier-free guidance."""

import json

import numpy as np
import pytest
import torch

from conftest import STATE
from difflab.conditioning import (
    NULL,
    Bound,
    Guided,
    bind,
    bound_cond,
    cond_cat,
    cond_repeat,
    cond_rows,
    rearrange,
)
from difflab.config import RunConfig
from difflab.data import get_dataset
from difflab.denoisers import GMMDenoiser
from difflab.errors import DifflabError
from difflab.objectives import OBJECTIVES, build_objective
from difflab.objectives.draws import slice_draws
from difflab.objectives.stf import stf_target
from difflab.runs import Run
from difflab.samplers import make_chain, picard, sample_chain
from difflab.samplers.base import draw_noise
from test_cli import last_json, run

F64 = torch.float64


class ClassGMM(torch.nn.Module):
    """An exact class-conditional denoiser: class k is the k-th component of a 2-D mixture, the unconditional
    label (-1) the whole mixture. D(x, sigma, class_labels) with labels (B,) in -1..K-1."""

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
        self.means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, 2.5]], dtype=F64)
        self.covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=F64),
                                 torch.diag(torch.tensor([0.05, 0.4], dtype=F64)), 0.1 * torch.eye(2, dtype=F64)])
        self.all = GMMDenoiser(self.w, self.means, self.covs)
        self.each = [GMMDenoiser(torch.ones(1, dtype=F64), self.means[k:k + 1], self.covs[k:k + 1]) for k in range(3)]

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(len(x))
        out = self.all(x, s)
        if class_labels is None:
            return out
        for k, den in enumerate(self.each):
            rows = class_labels == k
            if rows.any():
                out[rows] = den(x[rows], s[rows]).to(x.dtype)
        return out


def test_guidance_is_the_extrapolation_of_conditional_past_unconditional():
    D = ClassGMM()
    x = torch.randn(7, 2, dtype=F64)
    sigma = torch.rand(7, dtype=F64) + 0.1
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    cond, uncond = D(x, sigma, y), D(x, sigma, torch.full_like(y, NULL))
    for w in (0.0, 1.0, 3.0):
        assert torch.allclose(Guided(D, w)(x, sigma, class_labels=y), cond + w * (cond - uncond), rtol=0, atol=1e-13)
    assert torch.equal(Guided(D, 0.0)(x, 0.5, class_labels=y), D(x, torch.full((7,), 0.5, dtype=F64), y))
    with pytest.raises(DifflabError, match="needs class labels"):
        Guided(D, 1.0)(x, sigma)
    with pytest.raises(DifflabError, match=">= 0"):
        Guided(D, -1.0)


def test_guidance_sharpens_the_class_and_picard_equals_its_sequential_twin():
    """Guided DDIM on the exact class-conditional mixture: w = 3 makes the samples more typical of their class
    (the mixture's posterior of the asked-for component rises) than w = 0; the parallel sampler over the guided
    denoiser equals the sequential one at zero tolerance."""
    D, n = ClassGMM(), 300
    labels = torch.arange(n) % 3
    comps = torch.distributions.MultivariateNormal(D.means, D.covs)
    posterior = {}
    for w in (0.0, 3.0):
        chain = make_chain("ddim", Guided(D, w), steps=20)
        x, _ = sample_chain(chain, n, 0, (2,), cond={"class_labels": labels}, dtype=STATE)
        logp = comps.log_prob(x.to(F64)[:, None]) + D.w.log()  # (n, 3)
        post = torch.softmax(logp, 1)[torch.arange(n), labels]
        posterior[w] = float((1 - post).mean())  # the share of mass on the other classes
    assert posterior[3.0] < 0.5 * posterior[0.0], posterior
    chain = make_chain("ddim", Guided(D, 2.0), steps=12)
    noise = draw_noise(0, range(8), (2,), chain.n_steps, chain.stochastic, STATE, cond={"class_labels": labels[:8]})
    seq, _ = sample_chain(chain, 8, 0, (2,), cond={"class_labels": labels[:8]}, dtype=STATE)
    par = picard(chain, noise, tol=0.0, window=5)
    assert torch.equal(par.x.to(seq.dtype), seq)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_objective_gives_each_row_its_own_label(name):
    """A batch's per-row losses equal those of each row alone (one label, so nothing to mix up): an objective
    that repeats, subsets or concatenates its rows must re-arrange the condition the same way (rearrange)."""
    D = ClassGMM()
    g = torch.Generator().manual_seed(0)
    x0 = D.means[torch.tensor([0, 1, 2, 0, 2, 1])] + 0.3 * torch.randn(6, 2, generator=g, dtype=F64)
    y = torch.tensor([0, 1, 2, NULL, 2, 0])
    opts = {"n_cdl": 4, "n_alpha": 4} if name == "cdl" else {}
    obj = build_objective(name, opts).fit(x0.repeat(20, 1))
    draws = obj.draw(x0, torch.Generator().manual_seed(1))
    extra = {"reference": x0, "reference_labels": y.clamp(min=0)} if obj.uses_reference else {}
    batch = obj.loss(Bound(D, {"class_labels": y}), x0, draws, **extra)
    for i in range(6):
        part = {"reference": x0[i:i + 1], "reference_labels": y[i:i + 1].clamp(min=0)} if obj.uses_reference else {}
        if obj.uses_reference:  # STF alone on its own point is the plain target: compare against the full set
            part = {"reference": x0, "reference_labels": y.clamp(min=0)}
            d = slice_draws(draws, i, i + 1)
            d["row"] = torch.tensor([i])
        else:
            d = slice_draws(draws, i, i + 1)
        alone = obj.loss(Bound(D, {"class_labels": y[i:i + 1]}), x0[i:i + 1], d, **part)
        assert torch.allclose(batch[i], alone[0], rtol=1e-10, atol=1e-10), (name, i, batch[i], alone)
    if name in ("sa", "cdl"):  # a wrong arrangement is caught: the condition's rows no longer match the batch's
        with pytest.raises(DifflabError, match="rows for"):
            Bound(D, {"class_labels": y})(x0[:3], 0.5)


def test_rearrange_and_bind_leave_unconditional_denoisers_alone():
    D = ClassGMM()
    assert rearrange(D, lambda c: cond_rows(c, slice(0, 1))) is D and bind(D, None) is D and bind(D, {}) is D
    assert bound_cond(D) == {}
    L = rearrange(Bound(D, {"class_labels": torch.tensor([0, 1])}), lambda c: cond_repeat(c, 2))
    assert L.cond["class_labels"].tolist() == [0, 0, 1, 1]
    both = cond_cat(L.cond, cond_rows(L.cond, torch.tensor([3])))
    assert both["class_labels"].tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(DifflabError, match="same keys"):
        cond_cat({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(DifflabError, match="one row per"):
        Bound(D, {"class_labels": torch.tensor([0, 1]), "other": torch.zeros(3)})


def test_conditional_stf_weighs_only_the_rows_class():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(40, 3, generator=g, dtype=F64)
    ref_y = torch.arange(40) % 4
    x = ref[:5] + 0.7 * torch.randn(5, 3, generator=g, dtype=F64)
    sigma = torch.full((5,), 0.7, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, NULL])
    T = stf_target(x, sigma, ref, labels=labels, reference_labels=ref_y)
    for i in range(4):
        own = ref_y == labels[i]
        alone = stf_target(x[i:i + 1], sigma[:1], ref[own], own_index=torch.tensor([int(own[:i].sum())]))
        assert torch.allclose(T[i], alone[0], atol=1e-12)
    assert torch.allclose(T[4], stf_target(x[4:], sigma[:1], ref, own_index=torch.tensor([4]))[0], atol=1e-12)


def test_unet_reads_label_minus_one_as_the_zero_label():
    from difflab.nets.unet import UNet

    net = UNet(img_resolution=8, img_channels=1, model_channels=16, channel_mult=(1,), num_blocks=1,
               attn_resolutions=(), num_classes=3).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    assert torch.equal(net(x, c, torch.tensor([NULL, NULL])), net(x, c))
    with pytest.raises(DifflabError, match="-1: unconditional"):
        net(x, c, torch.tensor([3, 0]))


def _conditional_cfg(**train):
    return RunConfig.from_dict({"data": {"name": "digits", "n_train": 300}, "model": {"conditional": True,
                                "preset": "tiny", "unet": {"model_channels": 16}},
                                "train": {"steps": 4, "batch_size": 64, "log_every": 1, "ckpt_every": 2, **train}})


def test_trainer_passes_each_rows_label_and_drops_the_configured_share(tmp_path, monkeypatch):
    from difflab.training.trainer import Trainer

    tr = Trainer(_conditional_cfg(label_dropout=0.5, batch_size=512), tmp_path / "r")
    assert tr.cfg.model.unet["num_classes"] == 10
    _, y_check = tr.dataset.sample_with_labels(300, 42)
    assert torch.equal(tr.y_train, y_check) and len(tr.x_train) == 300
    seen = []
    real = tr.objective.loss

    def spy(D, x0, draws, **kw):
        seen.append((D.cond["class_labels"].clone(), x0.clone()))
        return real(D, x0, draws, **kw)

    monkeypatch.setattr(tr.objective, "loss", spy)
    tr.train_step()
    y, x0 = seen[0]
    kept = y != NULL
    # every kept label is its image's (found by the image itself), and about half are dropped
    idx = [int(((tr.x_train - img).abs().amax((1, 2, 3)) == 0).nonzero()[0]) for img in x0[kept][:50]]
    assert torch.equal(tr.y_train[idx], y[kept][:50])
    assert 0.4 < float((~kept).float().mean()) < 0.6


@pytest.mark.slow
def test_conditional_training_resumes_bit_for_bit(tmp_path):
    from difflab.training.trainer import train

    train(_conditional_cfg(), tmp_path / "full")
    train(_conditional_cfg(), tmp_path / "half", until=2)
    train(None, tmp_path / "half", resume=True)
    a, b = Run.load(tmp_path / "full"), Run.load(tmp_path / "half")
    for (k, v), (_, w) in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().items(), strict=True):
        assert torch.equal(v, w), k


def test_cli_trains_conditional_and_samples_every_class_with_guidance(tmp_path, capsys):
    out = str(tmp_path / "r")
    code, _, err = run(["train", "--data", "digits", "--conditional", "--preset", "tiny", "--steps", "2",
                        "--batch-size", "16", "--set", "data.n_train=200", "--set", "model.unet.model_channels=16",
                        "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["unet"]["num_classes"] == 10
    for sampler in ("ddim", "picard-heun"):
        code, o, err = run(["sample", out, "--n", "12", "--steps", "3", "--sampler", sampler, "--class", "all",
                            "--guidance", "2", "--out", str(tmp_path / f"{sampler}.npz"), "--json", "--quiet"], capsys)
        assert code == 0, err
        rec = last_json(o)
        assert rec["guidance"] == 2.0 and rec["class_labels"] == "all"
    assert Run.load(out).labels("all", 4, start=9).tolist() == [9, 0, 1, 2]


@pytest.mark.parametrize("argv, msg", [
    (["train", "--data", "dino", "--conditional"], "needs difflab's U-Net"),
    (["train", "--data", "digits", "--conditional", "--label-dropout", "1.5"], "label_dropout must be in [0, 1]"),
])
def test_bad_conditional_training_input_is_one_line(argv, msg, tmp_path, capsys):
    code, _, err = run([*argv, "--steps", "1", "--out", str(tmp_path / "r"), "--quiet"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and msg in lines[0], err


def test_guidance_errors_name_the_fix(tmp_path, capsys):
    from difflab.training.trainer import train

    train(RunConfig.from_dict({"data": {"name": "dino"}, "train": {"steps": 1, "batch_size": 8}}), tmp_path / "u",
          progress=False)
    code, _, err = run(["sample", str(tmp_path / "u"), "--n", "2", "--class", "all", "--guidance", "1", "--quiet"],
                       capsys)
    assert code == 2 and "not class-conditional" in err
    train(_conditional_cfg(steps=1), tmp_path / "c", progress=False)
    code, _, err = run(["sample", str(tmp_path / "c"), "--n", "2", "--guidance", "1", "--quiet"], capsys)
    assert code == 2 and "give class labels" in err
    code, _, err = run(["sample", str(tmp_path / "c"), "--n", "2", "--class", "1", "--guidance", "1",
                        "--null-class", "10", "--quiet"], capsys)
    assert code == 2 and "--null-class must be a class index in 0..9" in err


def test_guidance_on_a_conditional_diffusers_model_takes_its_null_class(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 16), norm_num_groups=8, num_class_embeds=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "unet")
    r = Run.load(tmp_path / "unet")
    with pytest.raises(DifflabError, match="needs --null-class N"):
        r.sample(2, 0, "ddim", steps=2, class_labels=1, guidance=1.0)
    x, stats = r.sample(3, 0, "ddim", steps=2, class_labels=1, guidance=1.5, null_class=3)
    den = r.denoiser
    xt = torch.randn(3, 1, 8, 8, dtype=F64)
    g = Guided(den, 1.5, 3)(xt, 1.0, class_labels=torch.tensor([1, 1, 1]))
    c, u = den(xt, 1.0, class_labels=torch.tensor([1, 1, 1])), den(xt, 1.0, class_labels=torch.tensor([3, 3, 3]))
    assert torch.allclose(g, 2.5 * c - 1.5 * u, atol=1e-5) and not torch.allclose(c, u)
    assert x.shape == (3, 1, 8, 8) and stats.extra["guidance"] == 1.5


def test_a_conditional_diffusers_unet_fine_tunes_on_labels_without_dropout(tmp_path, capsys):
    """Its class embedding has no "no class" label, so label dropout defaults to 0 for it (and asking for more is
    refused in one line); the labels reach the network: relabelled data trains other weights from the same draws."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(16, 16), norm_num_groups=8, num_class_embeds=10,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=100)
                           ).save_pretrained(tmp_path / "C")
    x, y = get_dataset("digits").sample_with_labels(64, 0)
    np.savez(tmp_path / "digits.npz", x=x.numpy(), labels=y.numpy())
    np.savez(tmp_path / "relabelled.npz", x=x.numpy(), labels=((y + 1) % 10).numpy())
    argv = ["train", "--init", str(tmp_path / "C"), "--steps", "1", "--batch-size", "8", "--quiet"]
    code, _, err = run([*argv, "--data", "digits", "--label-dropout", "0.1", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "no unconditional label" in err and "--label-dropout 0" in err
    for name in ("digits", "relabelled"):
        code, _, err = run([*argv, "--data", f"images:{tmp_path / name}.npz", "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
    b, b1 = (Run.load(tmp_path / name, ema=False) for name in ("digits", "relabelled"))
    assert b.config.train.label_dropout == 0
    before, after, other = (r.denoiser.state_dict() for r in (Run.load(tmp_path / "C"), b, b1))
    assert any(not torch.equal(v, after[k]) for k, v in before.items())  # it trained
    assert any(not torch.equal(v, other[k]) for k, v in after.items())  # on the labels


@pytest.mark.slow
def test_previews_of_a_conditional_run_show_every_class(tmp_path):
    from difflab.training.previews import preview_samples
    from difflab.training.trainer import train

    train(_conditional_cfg(steps=1, sample_every=1, sample_n=20), tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "samples" / "step-00000001.png").stat().st_size > 500  # (a failed preview only warns)
    r = Run.load(tmp_path / "r")
    x = preview_samples(r, 20)
    y, _ = r.sample(20, 0, "ddim", steps=50, class_labels="all", dtype=torch.float32)
    assert torch.equal(x, y)
