"""The Run object: loading, its facts, its samplers on the run's own schedule, sampling and sample files; and
fine-tuning configs (train.init) resolved the same way from Python and from the CLI."""

import json

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.config import RunConfig, inherit, load_config
from difflab.errors import DifflabError
from difflab.runs import Run, load_samples
from difflab.samplers import make_chain, sample_chain
from difflab.training import train
from difflab.training.checkpoint import list_checkpoints

PARENT = ['data.name="moons"', "data.n_train=300", "model.width=16", "model.depth=1", "schedule.kind=cosine",
          "schedule.T=200", "train.batch_size=32", "train.steps=12", "train.ckpt_every=6", "train.keep_checkpoints=5",
          "train.seed=1"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    train(load_config(overrides=PARENT), root / "parent", progress=False)
    return root / "parent"


def test_load_gives_the_runs_network_config_and_facts(parent):
    run = Run.load(parent)
    assert run.step == 12 and run.shape == (2,) and run.path == parent and run.state["step"] == 12
    assert run.data == "moons" and run.precond == "eps" and run.config.model.width == 16
    assert (run.schedule.T, run.schedule.kind) == (200, "cosine") and not run.denoiser.training
    assert run.training_data().shape == (300, 2)
    first = Run.load(list_checkpoints(parent)[0])  # one checkpoint folder: the weights of that step
    assert first.step == 6
    raw = Run.load(parent, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(raw.denoiser.state_dict().values(),
                                                     run.denoiser.state_dict().values(), strict=True))


def test_chains_follow_the_runs_own_schedule(parent):
    run = Run.load(parent)
    own = run.chain("ddpm", steps=200)
    default = make_chain("ddpm", run.denoiser, steps=200)  # the linear T = 1000 schedule: another chain
    noise_x, _ = sample_chain(own, 16, 0, (2,))
    other_x, _ = sample_chain(default, 16, 0, (2,))
    assert float((noise_x - other_x).abs().max()) > 1e-2
    x, stats = run.sample(16, seed=0, sampler="ddpm", steps=200)
    assert torch.equal(x, noise_x) and stats.steps == 200 and stats.sampler == "ddpm"
    assert run.chain("ddpm").n_steps == 200  # DDPM's default: every step of the run's own schedule
    assert run.chain("heun", steps=5).n_steps == 5  # sigma-space samplers take no DDPM schedule
    with pytest.raises(DifflabError, match="own schedule"):
        run.chain("ddpm", schedule=run.schedule)


def test_sample_is_batch_invariant_and_the_parallel_sampler_matches_at_zero_tolerance(parent):
    run = Run.load(parent)
    whole, _ = run.sample(10, seed=3, sampler="ddim", steps=20)
    parts, _ = run.sample(10, seed=3, sampler="ddim", steps=20, batch_size=3)
    tail, _ = run.sample(4, seed=3, sampler="ddim", steps=20, start=6)
    # the float32 network rounds differently on other batch shapes: equal to float32 round-off of the samples' size
    # (a briefly trained network draws far-flung samples); a sample drawn with another's noise is off by O(1)
    atol = 1e-5 * float(whole.abs().max())
    torch.testing.assert_close(parts, whole, rtol=0, atol=atol)
    torch.testing.assert_close(tail, whole[6:], rtol=0, atol=atol)
    assert float((whole[1:] - whole[:-1]).abs().max()) > 1e3 * atol
    par, stats = run.sample(10, seed=3, sampler="picard-ddim", steps=20, parallel={"tol": 0.0})
    torch.testing.assert_close(par, whole, rtol=0, atol=atol)
    assert stats.sampler == "picard-ddim" and stats.iterations >= 1 and stats.extra["tol"] == 0.0
    _, default = run.sample(10, seed=3, sampler="picard-ddim", steps=20)  # Picard's defaults apply
    assert default.extra["tol"] == 0.1 and default.extra["window"] == 20
    x32, _ = run.sample(4, seed=3, sampler="ddim", steps=20, dtype=torch.float32)
    assert x32.dtype == torch.float32


def test_sample_writes_an_atomic_file_with_its_record(parent, tmp_path):
    run = Run.load(parent)
    out = tmp_path / "deep" / "s.npz"
    x, stats = run.sample(8, seed=2, sampler="heun", steps=4, out=out)
    back, record = load_samples(out)
    assert torch.equal(back, x)
    assert record == {**stats.to_dict(), "seed": 2, "run": str(parent), "checkpoint_step": 12, "processes": 1,
                      "out": str(out)}
    assert sorted(p.name for p in out.parent.iterdir()) == ["s.npz"]  # no temporary file left
    with np.load(out, allow_pickle=False) as f:
        assert set(f.files) == {"samples", "stats"}


@pytest.mark.parametrize(("kwargs", "msg"), [
    ({"sampler": "ddpm", "parallel": {"tol": 0.1}}, "parallel samplers only"),
    ({"sampler": "picard-ddpm", "parallel": {"tol": -1.0}}, "tolerance"),
    ({"sampler": "ddpmm"}, "did you mean 'ddpm'"),
    ({"sampler": "ddim", "etaa": 0.0}, "no option 'etaa'"),
    ({"sampler": "ddim", "out": "samples.csv"}, ".npz"),
])
def test_bad_sampling_requests_are_refused_before_any_work(parent, kwargs, msg):
    with pytest.raises(DifflabError, match=msg):
        Run.load(parent).sample(4, **kwargs)


def test_a_fine_tune_inherits_the_same_config_from_python_and_from_the_cli(parent, tmp_path, capsys):
    """train(cfg) with train.init = the CLI's --init: data, model and schedule from the parent (model.precond and
    the keys a user sets excepted), identical configs and weights."""
    cfg = RunConfig()
    cfg.objective.name = "itd"
    cfg.train.init, cfg.train.steps, cfg.train.batch_size = str(parent), 4, 32
    cfg.data.n_train = 200  # set in code: kept
    train(cfg, tmp_path / "py", progress=False)
    assert main(["train", "--objective", "itd", "--init", str(parent), "--steps", "4", "--batch-size", "32",
                 "--set", "data.n_train=200", "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    capsys.readouterr()
    py, cli = (json.loads((tmp_path / k / "config.json").read_text()) for k in ("py", "cli"))
    assert py == cli
    assert py["data"] == {"name": "moons", "n_train": 200}
    assert (py["model"]["width"], py["model"]["depth"]) == (16, 1)
    assert py["schedule"]["T"] == 200 and py["schedule"]["kind"] == "cosine"
    assert py["model"]["precond"] is None and Run.load(tmp_path / "py").precond == "eps-continuous"
    a, b = Run.load(tmp_path / "py").denoiser.state_dict(), Run.load(tmp_path / "cli").denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the dry run checks the inherited network
    assert main(["train", "--objective", "itd", "--init", str(parent), "--out", str(tmp_path / "dry"), "--dry-run",
                 "--json", "--quiet"]) == 0
    dry = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dry["config"]["model"]["width"] == 16 and dry["config"]["schedule"]["T"] == 200


def test_inherit_keeps_what_is_set_even_at_its_default(parent):
    saved = json.loads((parent / "config.json").read_text())
    cfg = load_config(overrides=["model.width=128", 'model.unet.dropout=0.1'])  # 128 is the default width
    inherit(cfg, {**saved, "model": {**saved["model"], "unet": {"dropout": 0.2, "num_blocks": 1}}})
    assert cfg.model.width == 128 and cfg.model.depth == 1  # set: kept; left: the parent's
    assert cfg.model.unet == {"dropout": 0.1, "num_blocks": 1}  # tables merge, cfg's keys first
    resumed = RunConfig.from_dict(saved)  # a saved config sets every key: nothing to inherit
    before = resumed.to_dict()
    inherit(resumed, {**saved, "model": {**saved["model"], "width": 64}})
    assert resumed.to_dict() == before


def test_a_state_dict_file_loads_with_the_run_json_beside_it_or_a_given_config(parent, tmp_path, capsys):
    from safetensors.torch import save_file

    run = Run.load(parent)
    weights = tmp_path / "w" / "weights.safetensors"
    weights.parent.mkdir()
    save_file({k: v.contiguous() for k, v in run.denoiser.state_dict().items()}, str(weights))
    with pytest.raises(DifflabError, match="run.json"):
        Run.load(weights)
    given = Run.load(weights, config=run.config, shape=run.shape)
    (weights.parent / "run.json").write_text(json.dumps({"config": run.config.to_dict(), "shape": list(run.shape)}))
    beside = Run.load(weights)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert torch.equal(given.denoiser(x, 0.3), run.denoiser(x, 0.3)) and torch.equal(beside.denoiser(x, 0.3),
                                                                                      run.denoiser(x, 0.3))
    assert main(["sample", str(weights), "--sampler", "ddim", "--steps", "5", "--n", "3", "--out",
                 str(tmp_path / "s.npz"), "--quiet"]) == 0
    capsys.readouterr()
