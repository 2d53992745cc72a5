"""The arithmetic around the network lives on the network's device: a training step of every objective, and a step
and whole sweeps of every sampler (the parallel one with each start, criterion and TAA), with the backbone on the
``meta`` device. A meta tensor has a shape and no data, so a CPU tensor left inside a step fails when it meets one
("not on the expected device") and so does any read of a value (``.item()``, a copy back): only the draws (CPU
generators) and the small per-step tables start on the CPU. Two ways back that meta would let pass (a CPU table
indexed by a meta tensor, a meta value written into a CPU buffer) are refused by :class:`OneWay`, and the results
are checked to be on meta as well."""

import importlib

import pytest
import torch
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import STATE
from difflab import devices
from difflab.config import load_config
from difflab.models import build_denoiser, sigma_data
from difflab.objectives import OBJECTIVES, build_objective
from difflab.objectives.stf import stf_target
from difflab.samplers import PicardOptions, draw_noise, make_chain, picard, run_chain, sample_chain
from difflab.schedules import DDPMSchedule
from difflab.training.trainer import Trainer

META = torch.device("meta")
IMAGE = (1, 8, 8)
NET = {(2,): ["model.width=16", "model.depth=1"],
       IMAGE: ['model.arch="unet"', 'model.preset="tiny"']}
OPTIONS = {"stf": {"reference_size": 32}, "cdl": {"n_cdl": 4, "n_alpha": 4}, "sa": {"K": 3, "tau": True}}


class OneWay(TorchDispatchMode):
    """Refuses any operation that takes a meta tensor and gives a CPU one: data may go to the device, never back."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = lambda tree: [t for t in _pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]  # noqa: E731
        if any(t.device == META for t in tensors((args, kwargs))) and any(t.device.type == "cpu"
                                                                          for t in tensors(out)):
            raise AssertionError(f"{func} brings a meta tensor back to the CPU")
        return out


@pytest.fixture(autouse=True)
def one_way():
    with OneWay():
        yield


def test_the_guard_catches_a_way_back():
    table, idx = torch.arange(5.0), torch.zeros(2, dtype=torch.long, device=META)
    with pytest.raises(AssertionError, match="back to the CPU"):
        table[idx]
    with pytest.raises(AssertionError, match="back to the CPU"):
        table[torch.tensor([0, 1])] = torch.empty(2, device=META)  # (a slice copy would fail anyway)


def _denoiser(objective: str, shape, options=None):
    cfg = load_config(overrides=[*NET[shape], f'objective.name="{objective}"'])
    cfg.objective.options = dict(options or {})
    return cfg, build_denoiser(cfg, shape).to(META)


@pytest.mark.parametrize("shape", [(2,), IMAGE], ids=["mlp", "unet"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_training_step_of_every_objective_stays_on_the_device(name, shape):
    options = OPTIONS.get(name, {})
    cfg, D = _denoiser(name, shape, options)
    data = torch.randn(64, *shape)  # the training set, on the CPU as in the trainer (fitted there once)
    obj = build_objective(name, options, DDPMSchedule(), sigma_data(cfg, shape), data=data)
    x0 = torch.empty((16, *shape), device=META)
    g = torch.Generator().manual_seed(0)
    refs = {"reference": torch.empty((32, *shape), device=META)} if obj.uses_reference else {}
    loss = obj(D, x0, g, **refs)
    assert loss.device == META and loss.shape == (16,)
    loss.sum().backward()
    assert all(p.grad.device == META for p in D.parameters() if p.grad is not None)
    if name == "stf":  # the target itself, with its exact own-point rows
        target = stf_target(x0, torch.empty(16, device=META), refs["reference"])
        assert target.device == META and target.shape == x0.shape


def _meta_host(t):
    """devices.host for meta tensors: zeros of the shape on the CPU (a sweep then accepts only its first step)."""
    return torch.zeros(t.shape, dtype=t.dtype) if t.device == META else t.cpu()


CHAINS = [("ddpm", {"steps": 12}), ("ddim", {"steps": 8, "eta": 0.5}),
          ("heun", {"steps": 6, "S_churn": 5.0}), ("euler", {"steps": 6})]


@pytest.mark.parametrize(("name", "options"), CHAINS, ids=[c[0] for c in CHAINS])
def test_every_sampler_steps_on_the_device(name, options):
    chain = make_chain(name, _denoiser("dsm" if name.startswith("dd") else "edm", IMAGE)[1], **options)
    noise = draw_noise(0, range(3), IMAGE, chain.n_steps, chain.stochastic)  # drawn on the CPU
    seen = []
    x = run_chain(chain, noise, callback=lambda j, x: seen.append(x.device))
    assert x.device == META and seen == [META] * chain.n_steps


PARALLEL = [{}, {"accel": "taa"}, {"init": "warm", "warm_steps": 2}, {"init": "extrapolate", "accel": "taa"},
            {"criterion": "step", "window": 3}, {"convergence": "batch", "max_batch": 2}]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), CHAINS, ids=[c[0] for c in CHAINS])
@pytest.mark.parametrize("parallel", PARALLEL, ids=lambda p: "-".join(map(str, p.values())) or "plain")
def test_every_picard_sweep_stays_on_the_device(name, options, parallel, monkeypatch):
    monkeypatch.setattr(devices, "host", _meta_host)
    chain = make_chain(name, _denoiser("dsm" if name.startswith("dd") else "edm", IMAGE)[1], **options)
    noise = draw_noise(0, range(3), IMAGE, chain.n_steps, chain.stochastic).to(META)
    buffers = []
    res = picard(chain, noise, PicardOptions(**{"window": 4, "max_sweeps": 3, **parallel}),
                 callback=lambda it, x_end, X: buffers.append((x_end.device, X.device)))
    assert res.x.device == META and buffers == [(META, META)] * res.iterations and res.iterations == 3


@pytest.mark.slow
def test_sampling_runs_where_the_network_is(monkeypatch):
    """sample_chain puts the state on the denoiser's device by itself and brings each block back once."""
    monkeypatch.setattr(devices, "host", _meta_host)
    chain = make_chain("ddim", _denoiser("dsm", IMAGE)[1], steps=5)
    for parallel in (None, {"window": 2}):
        x, stats = sample_chain(chain, 5, 0, IMAGE, batch_size=2, parallel=parallel, dtype="auto")
        assert x.device.type == "cpu" and x.shape == (5, *IMAGE)
        assert stats.extra["device"] == "meta" and stats.extra["state_dtype"] == str(STATE).removeprefix("torch.")
    monkeypatch.delenv(devices.STATE_DTYPE_ENV, raising=False)
    assert devices.state_dtype("auto", "cuda:0") == torch.float32 and devices.state_dtype(None) == torch.float64
    with pytest.raises(Exception, match="auto, float32 or float64"):
        devices.state_dtype("float16")


def test_the_trainer_computes_its_step_on_the_network_device(tmp_path, monkeypatch):
    """The trainer's own step (batch, draws, references, micro-batches) with its network on meta: only the
    step's loss value is read back, once, through .item()."""
    cfg = load_config(overrides=["model.width=16", "model.depth=1", "data.n_train=200", "train.batch_size=8",
                                 "train.grad_accum=2", 'objective.name="stf"', "objective.options.reference_size=16"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.device = META
    trainer.model = trainer.model.to(META)
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self.device) or 0.0)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, clip: torch.zeros(()))
    monkeypatch.setattr(trainer.opt, "step", lambda *a, **k: None)
    monkeypatch.setattr(importlib.import_module("difflab.training.trainer"), "ema_update", lambda *a: None)
    trainer.train_step()
    assert reads == [META, META]  # one per micro-batch, after both were queued
    assert all(p.grad.device == META for p in trainer.model.parameters() if p.grad is not None)
