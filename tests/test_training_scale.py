"""Training at scale: gradient accumulation, EMA by half-life, bf16 autocast, periodic sample previews."""

import math

import pytest
import torch

from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.training import Trainer, load_checkpoint, train
from difflab.training.trainer import _chunks, ema_decay_at

BASE = ["train.batch_size=32", "model.width=16", "model.depth=1", "data.n_train=500", "train.log_every=10",
        "train.ckpt_every=100", "train.warmup_steps=5"]


def cfg_with(*overrides, steps=12):
    return load_config(overrides=[*BASE, f"train.steps={steps}", *overrides])


def _model_weights(run):
    tensors, _ = load_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("model.", "ema."))}


@pytest.mark.parametrize("objective", ["dsm", "cdl", "stf", "sa"])
def test_gradient_accumulation_gives_the_same_step(tmp_path, objective, monkeypatch):
    """4 micro-batches after the same draws: the same weights up to float summation order."""
    import difflab.training.trainer as trainer_module

    a = train(cfg_with(f'objective.name="{objective}"'), tmp_path / "a", progress=False)
    pieces, chunks = [], trainer_module._chunks
    monkeypatch.setattr(trainer_module, "_chunks", lambda lo, hi, parts: pieces.append(chunks(lo, hi, parts))
                        or pieces[-1])
    b = train(cfg_with(f'objective.name="{objective}"', "train.grad_accum=4"), tmp_path / "b", progress=False)
    assert pieces and all(len(p) == 4 for p in pieces)  # every step really ran as 4 micro-batches
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
    wa, wb = _model_weights(tmp_path / "a"), _model_weights(tmp_path / "b")
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-5, worst


def test_chunks_cover_the_rows_once():
    for lo, hi, parts in [(0, 32, 4), (3, 10, 3), (5, 7, 8), (0, 1, 1)]:
        c = _chunks(lo, hi, parts)
        assert c[0][0] == lo and c[-1][1] == hi and all(b > a for a, b in c)
        assert all(c[i][1] == c[i + 1][0] for i in range(len(c) - 1)) and len(c) == min(parts, hi - lo)


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(DifflabError, match="multiple of train.grad_accum"):
        cfg_with("train.grad_accum=5")


def test_ema_half_life_in_images():
    cfg = cfg_with("train.ema_halflife_kimg=0.5", "train.ema_rampup=0")
    d = ema_decay_at(cfg, 1000)
    assert d ** (500 / 32) == pytest.approx(0.5, rel=1e-12)  # 500 images later the old weights count half
    cfg.train.ema_rampup = 0.05  # early on the half-life is at most 5% of the images seen
    assert ema_decay_at(cfg, 9) == pytest.approx(0.5 ** (32 / (10 * 32 * 0.05)), rel=1e-12)
    assert ema_decay_at(cfg, 10**6) == pytest.approx(d, rel=1e-12)
    cfg.train.ema_halflife_kimg = None
    assert ema_decay_at(cfg, 0) == pytest.approx(0.1) and ema_decay_at(cfg, 10**6) == cfg.train.ema_decay


def test_ema_half_life_is_what_the_trainer_applies(tmp_path):
    trainer = Trainer(cfg_with("train.ema_halflife_kimg=0.1", "train.ema_rampup=0"), tmp_path / "r")
    before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    trainer.train_step()
    d = ema_decay_at(trainer.cfg, 0)
    for k, v in trainer.ema.state_dict().items():
        if v.is_floating_point():
            expected = d * before[k] + (1 - d) * trainer.model.state_dict()[k]
            assert torch.allclose(v, expected, atol=1e-6), k


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_autocast_trains_close_to_fp32(tmp_path, precision):
    a = train(cfg_with(steps=30), tmp_path / "a", progress=False)
    b = train(cfg_with(f'train.precision="{precision}"', steps=30), tmp_path / "b", progress=False)
    assert math.isfinite(b.loss) and abs(a.loss - b.loss) < 0.1 * a.loss
    wa, wb = _model_weights(tmp_path / "a"), _model_weights(tmp_path / "b")
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # half precision really ran (low bits differ)


def test_fp16_loss_scale_is_checkpointed_and_resumes_exactly(tmp_path):
    train(cfg_with('train.precision="fp16"', steps=20), tmp_path / "a", progress=False)
    train(cfg_with('train.precision="fp16"', steps=20), tmp_path / "b", until=7, progress=False)
    scale = load_checkpoint(tmp_path / "b")[1]["grad_scaler"]["scale"]
    assert scale > 1  # the loss is scaled (65,536 at the start, halved on overflows)
    train(None, tmp_path / "b", resume=True, progress=False)
    wa, wb = _model_weights(tmp_path / "a"), _model_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_checkpoint(tmp_path / "a")[1]["grad_scaler"] == load_checkpoint(tmp_path / "b")[1]["grad_scaler"]


def test_bad_precision_is_refused():
    with pytest.raises(DifflabError, match="precision"):
        cfg_with('train.precision="fp8"')


def test_previews_of_2d_data(tmp_path):
    train(cfg_with("train.sample_every=5", "train.sample_n=16", steps=10), tmp_path / "r", progress=False)
    grids = sorted(p.name for p in (tmp_path / "r" / "samples").glob("*.png"))
    assert grids == ["step-00000005.png", "step-00000010.png"]
    assert all((tmp_path / "r" / "samples" / g).stat().st_size > 1000 for g in grids)


def test_previews_do_not_change_training(tmp_path):
    """Sampling the EMA between steps must not touch the training random streams."""
    train(cfg_with(steps=10), tmp_path / "a", progress=False)
    train(cfg_with("train.sample_every=3", "train.sample_n=8", steps=10), tmp_path / "b", progress=False)
    wa, wb = _model_weights(tmp_path / "a"), _model_weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
