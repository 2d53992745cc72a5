"""Training at scale: gradient accumulation, EMA by half-life, bf16 autocast, periodic sample previews."""

import math

import pytest
import torch

from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.training import Trainer, load_checkpoint, train
from difflab.training.trainer import _chunks, ema_decay_at, ema_update

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


def test_ema_update_is_the_recurrence():
    """e <- d e + (1 - d) m step by step, and after K steps of one decay d the closed form
    d^K e_0 + (1 - d) sum_k d^(K-k) m_k."""
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    e0 = [p.detach().clone() for p in ema.parameters()]
    expected, seen = [p.clone() for p in e0], []
    for d in (0.0, 0.3, 0.9, 0.99, 0.5):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        seen.append([p.detach().clone() for p in model.parameters()])
        ema_update(ema, model, d)
        expected = [d * e + (1 - d) * m for e, m in zip(expected, seen[-1], strict=True)]
        for got, want in zip(ema.parameters(), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    d, k = 0.8, 6
    ema.load_state_dict({n: e for n, e in zip(dict(ema.named_parameters()), e0, strict=True)})
    steps = []
    for _ in range(k):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        steps.append([p.detach().clone() for p in model.parameters()])
        ema_update(ema, model, d)
    for i, got in enumerate(ema.parameters()):
        want = d ** k * e0[i] + (1 - d) * sum(d ** (k - 1 - j) * steps[j][i] for j in range(k))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overrides", [["train.ema_decay=0.5"],  # warm-up (steps 0-8), then 0.5
                                       ["train.ema_halflife_kimg=0.2", "train.ema_rampup=0.5"]])
def test_trainer_ema_follows_the_recurrence_with_decay(tmp_path, overrides):
    """Over a run with decay > 0 the EMA weights are e <- d_s e + (1 - d_s) m_s with d_s = ema_decay_at(cfg, s)
    and m_s the weights after step s, starting from the initial weights."""
    trainer = Trainer(cfg_with(*overrides, steps=15), tmp_path / "r")
    names = [n for n, _ in trainer.model.named_parameters()]
    expected = {n: p.detach().cpu().double().clone() for n, p in trainer.model.named_parameters()}
    decays, lag = [], 0.0
    for step in range(15):
        trainer.train_step()
        d = ema_decay_at(trainer.cfg, step)
        decays.append(d)
        weights = {n: p.detach().cpu().double() for n, p in trainer.model.named_parameters()}
        ema = {n: p.detach().cpu().double() for n, p in trainer.ema.named_parameters()}
        for n in names:
            expected[n] = d * expected[n] + (1 - d) * weights[n]
            torch.testing.assert_close(ema[n], expected[n], rtol=0, atol=1e-6)
            lag = max(lag, float((ema[n] - weights[n]).abs().max()))
    assert 0 < min(decays) < max(decays) < 1  # every step really mixed, and the decay varied
    assert lag > 1e-4  # the EMA lags the weights by far more than the tolerance: a copy of them would fail


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
