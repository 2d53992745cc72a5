"""train.compile and train.channels_last: speed options that change neither what a run computes (beyond float
round-off) nor what it saves, and resume exactly."""

import json

import pytest
import torch

from difflab.cli import main
from difflab.config import load_config
from difflab.training import load_checkpoint, train
from difflab.training.trainer import Trainer

UNET = ['data.name="digits"', 'model.arch="unet"', 'model.preset="tiny"', "train.batch_size=16", "train.steps=6",
        "train.log_every=2", "train.ckpt_every=3", "train.warmup_steps=2", 'objective.name="edm"']


def _weights(run):
    return {k: v for k, v in load_checkpoint(run)[0].items() if k.startswith(("model.", "ema."))}


@pytest.mark.slow
def test_channels_last_trains_the_same_network_and_resumes_exactly(tmp_path):
    train(load_config(overrides=UNET), tmp_path / "plain", progress=False)
    last = [*UNET, "train.channels_last=true"]
    train(load_config(overrides=last), tmp_path / "cl", progress=False)
    train(load_config(overrides=last), tmp_path / "cut", until=3, progress=False)
    train(None, tmp_path / "cut", resume=True, progress=False)
    plain, cl, cut = _weights(tmp_path / "plain"), _weights(tmp_path / "cl"), _weights(tmp_path / "cut")
    assert plain.keys() == cl.keys()
    worst = max(float((plain[k] - cl[k]).abs().max()) for k in plain)
    assert 0 <= worst < 1e-4, worst  # other convolution kernels: round-off only
    assert all(torch.equal(cl[k], cut[k]) for k in cl), "a channels-last run resumes bit for bit"
    t = Trainer(load_config(overrides=last), tmp_path / "unused")
    conv = next(p for p in t.model.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_compiles_the_trained_backbone_only_and_keeps_the_checkpoint_names(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    t = Trainer(load_config(overrides=[*UNET, "train.compile=true"]), tmp_path / "r")
    assert compiled == [t.model.net]  # (in place: the EMA, previews and sampling stay eager)
    eager = Trainer(load_config(overrides=UNET), tmp_path / "e")
    assert t.state_tensors().keys() == eager.state_tensors().keys()


@pytest.mark.slow
def test_a_compiled_mlp_trains_like_the_eager_one(tmp_path):
    """A real torch.compile (inductor, the C++ compiler of the machine) of the small MLP: the same losses to
    round-off."""
    over = ["model.width=16", "model.depth=1", "data.n_train=256", "train.batch_size=64", "train.steps=4",
            "train.log_every=1", "train.warmup_steps=1"]
    train(load_config(overrides=over), tmp_path / "eager", progress=False)
    train(load_config(overrides=[*over, "train.compile=true"]), tmp_path / "compiled", progress=False)
    a, b = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_the_cli_flags_set_the_options(tmp_path, capsys):
    assert main(["train", "--data", "dino", "--compile", "--channels-last", "--out", str(tmp_path / "r"),
                 "--dry-run", "--quiet", "--json"]) == 0
    t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]["train"]
    assert t["compile"] is True and t["channels_last"] is True
    assert main(["train", "--data", "dino", "--out", str(tmp_path / "r"), "--dry-run", "--quiet", "--json"]) == 0
    t = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["config"]["train"]
    assert t["compile"] is False and t["channels_last"] is False
