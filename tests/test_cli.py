import json
import subprocess
import sys

import numpy as np
import pytest

from difflab.cli import main
from difflab.errors import DifflabError

TINY = ["--steps", "30", "--width", "16", "--depth", "1", "--set", "train.batch_size=32", "--set",
        "data.n_train=400", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_train_sample_eval_round_trip(tmp_path, capsys):
    code, out, _ = run(["train", "--data", "dino", "--objective", "dsm", "--seed", "0", "--out",
                        str(tmp_path / "r"), "--json", *TINY], capsys)
    assert code == 0 and last_json(out)["step"] == 30
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["steps"] == 30
    samples = tmp_path / "r" / "s.npz"
    code, out, _ = run(["sample", str(tmp_path / "r"), "--sampler", "ddim", "--steps", "10", "--n", "50",
                        "--seed", "3", "--out", str(samples), "--json", "--quiet"], capsys)
    stats = last_json(out)
    assert code == 0 and stats["nfe_per_sample"] == 10 and stats["n_samples"] == 50
    with np.load(samples, allow_pickle=False) as f:
        assert f["samples"].shape == (50, 2)
        assert json.loads(str(f["stats"]))["seed"] == 3
    code, out, _ = run(["eval", str(samples), "--data", "dino", "--metric", "mmd", "--json",
                        "--plot", str(tmp_path / "p.png")], capsys)
    res = last_json(out)
    assert code == 0 and res["mmd"] > 0 and (tmp_path / "p.png").stat().st_size > 1000


def test_config_file_and_overrides(tmp_path, capsys):
    (tmp_path / "run.toml").write_text('[model]\nwidth = 8\ndepth = 1\n[train]\nsteps = 5\nlr = 3e-4\n'
                                       '[objective]\nname = "edm"\n')
    code, _, _ = run(["train", "--config", str(tmp_path / "run.toml"), "--set", "train.batch_size=8",
                      "--out", str(tmp_path / "r"), "--quiet"], capsys)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert code == 0 and cfg["model"]["width"] == 8 and cfg["train"]["lr"] == 3e-4
    assert cfg["objective"]["name"] == "edm" and cfg["train"]["batch_size"] == 8


@pytest.mark.parametrize(("argv", "msg"), [
    (["train", "--data", "dinoo"], "unknown data set 'dinoo': did you mean 'dino'?"),
    (["train", "--objective", "cdx"], "objective.name = 'cdx' is not one of dsm, edm"),
    (["train", "--data", "missing.npy"], "no such file"),
    (["train", "--lr", "-1"], "train.lr must be > 0"),
    (["train", "--steps", "0"], "train.steps must be > 0"),
    (["train", "--set", "train.lrr=1"], "did you mean 'lr'"),
    (["train", "--set", "train.steps=abc"], "train.steps must be int"),
    (["train", "--config", "nope.toml"], "no such config file"),
])
def test_bad_train_input_is_one_clear_line(argv, msg, tmp_path, capsys):
    code, out, err = run([*argv, "--out", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_bad_data_files_are_refused_before_work(tmp_path, capsys):
    np.save(tmp_path / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0]]))
    np.save(tmp_path / "empty.npy", np.zeros((0, 2)))
    np.save(tmp_path / "shape.npy", np.zeros((10, 2, 2)))
    for f, msg in (("nan.npy", "NaN"), ("empty.npy", "empty"), ("shape.npy", "reshape the data to (N, d)")):
        code, _, err = run(["train", "--data", str(tmp_path / f), "--out", str(tmp_path / "r"), "--quiet"], capsys)
        assert code == 2 and err.startswith("error: ") and msg in err
        assert not (tmp_path / "r").exists()


def test_bad_sample_and_eval_input(tmp_path, capsys):
    code, _, err = run(["sample", str(tmp_path / "none"), "--quiet"], capsys)
    assert code == 2 and "no such run" in err
    run(["train", "--out", str(tmp_path / "r"), *TINY], capsys)
    code, _, err = run(["sample", str(tmp_path / "r"), "--sampler", "ddpm", "--eta", "1", "--quiet"], capsys)
    assert code == 2 and "has no option 'eta'" in err
    code, _, err = run(["sample", str(tmp_path / "r"), "--n", "0", "--quiet"], capsys)
    assert code == 2 and "--n must be >= 1" in err
    (tmp_path / "r" / "checkpoints" / "step-00000030" / "weights.safetensors").write_bytes(b"garbage")
    code, _, err = run(["sample", str(tmp_path / "r"), "--quiet"], capsys)
    assert code == 2 and "is corrupt" in err and len(err.strip().splitlines()) == 1
    np.savez(tmp_path / "s.npz", samples=np.zeros((10, 3)))
    code, _, err = run(["eval", str(tmp_path / "s.npz"), "--data", "dino"], capsys)
    assert code == 2 and "per example" in err


@pytest.mark.slow
def test_console_script_help_and_errors():
    exe = [sys.executable, "-m", "difflab.cli"]
    for cmd in ("train", "sample", "eval"):
        res = subprocess.run([*exe, cmd, "--help"], capture_output=True, text=True, check=True)
        assert "usage: difflab " + cmd in res.stdout
    res = subprocess.run([*exe, "eval", "nothing.npz"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_training_previews_and_periodic_fid_follow_the_runs_schedule(tmp_path, capsys, monkeypatch):
    """A cosine, T = 200 run: its previews (and the periodic FID's samples) are the chain 'difflab sample --sampler
    ddim --steps 50' draws, not DDIM on the default schedule; a non-eps network still previews with Heun-18."""
    import torch

    import difflab.runs
    from difflab.config import load_config
    from difflab.metrics.frechet import feature_statistics, frechet_distance
    from difflab.runs import Run
    from difflab.samplers import make_chain, sample_chain
    from difflab.training.fid_monitor import FIDMonitor
    from difflab.training.previews import preview_sampler
    from difflab.training.trainer import Trainer, prepare_run_dir

    n, run_dir = 24, tmp_path / "r"
    cfg = load_config(overrides=["data.name=dino", "objective.name=dsm", "schedule.kind=cosine", "schedule.T=200",
                                 "model.width=16", "model.depth=1", "data.n_train=400", "train.batch_size=32",
                                 "train.steps=40", "train.sample_every=20", f"train.sample_n={n}", "train.seed=0"])
    drawn = []  # (chain, samples) of every sampling call of a run, by the previews and by the FID monitor alike
    real_sample_chain = difflab.runs.sample_chain

    def recording(chain, *args, **kw):
        x, stats = real_sample_chain(chain, *args, **kw)
        drawn.append((chain, x.clone()))
        return x, stats

    monkeypatch.setattr(difflab.runs, "sample_chain", recording)

    class TwoDimFID(FIDMonitor):  # the periodic FID with the identity as features (the 2-D data has no Inception)
        def __init__(self):
            self.mu, self.sigma = np.zeros(2), np.eye(2)
            self.features, self.name, self.n, self.batch_size = "identity", "fd", n, n
            self.extract = type("Identity", (), {"extract": staticmethod(lambda x: x.double())})()

    trainer = Trainer(cfg, run_dir)
    trainer.fid, trainer.cfg.train.fid_every = TwoDimFID(), 20
    prepare_run_dir(run_dir, False, False)
    trainer.run(progress=False)
    assert len(drawn) == 4  # a preview and an FID at steps 2 and 4
    assert all(chain.name == "ddim" and chain.n_steps == 50 for chain, _ in drawn)
    preview, fid_samples = drawn[-2][1], drawn[-1][1]
    assert preview.dtype == torch.float32 and preview.shape == (n, 2) and torch.equal(preview, fid_samples)
    fd = [json.loads(line)["fd"] for line in (run_dir / "log.jsonl").read_text().splitlines() if "fd" in line]
    assert len(fd) == 2
    assert fd[-1] == pytest.approx(frechet_distance(*feature_statistics(fid_samples.clamp(-1, 1).double()),
                                                    np.zeros(2), np.eye(2)), rel=1e-9)

    out = tmp_path / "s.npz"
    code, _, _ = run(["sample", str(run_dir), "--sampler", "ddim", "--steps", "50", "--n", str(n), "--seed", "0",
                      "--out", str(out), "--quiet"], capsys)
    assert code == 0
    with np.load(out) as f:
        sampled = torch.from_numpy(f["samples"])
    assert sampled.dtype == torch.float64
    # the preview runs in float32, 'sample' in float64: equal up to float32 round-off, relative to the samples' size
    # (a briefly trained eps network on the cosine schedule draws far-flung samples)
    scale = float(sampled.abs().max())
    assert float((preview.double() - sampled).abs().max()) < 1e-5 * scale

    loaded = Run.load(run_dir)
    assert loaded.step == 40 and loaded.schedule.T == 200 and loaded.chain("ddim", steps=50).n_steps == 50
    # DDIM-50 on the default (linear, T = 1000) schedule is another chain: the run's own schedule matters
    wrong, _ = real_sample_chain(make_chain("ddim", loaded.denoiser, steps=50), n, 0, (2,))
    assert float((wrong - sampled).abs().max()) > 1e-2 * scale
    right, _ = sample_chain(loaded.chain("ddim", steps=50), n, 0, (2,))
    assert torch.equal(right, sampled)
    with pytest.raises(DifflabError, match="own schedule"):
        loaded.chain("ddim", schedule=loaded.schedule)
    assert preview_sampler("eps") == preview_sampler("eps-continuous") == ("ddim", 50)
    assert all(preview_sampler(p) == ("heun", 18) for p in ("edm", "vp", "ve"))


@pytest.mark.slow
def test_version_flag_prints_the_package_version(capsys):
    import difflab

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"difflab {difflab.__version__}"
    res = subprocess.run([sys.executable, "-m", "difflab.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == f"difflab {difflab.__version__}"
