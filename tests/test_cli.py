import json
import subprocess
import sys

import numpy as np
import pytest

from difflab.cli import main

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
    (["train", "--objective", "cdx"], "unknown objective 'cdx'"),
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


def test_console_script_help_and_errors():
    exe = [sys.executable, "-m", "difflab.cli"]
    for cmd in ("train", "sample", "eval"):
        res = subprocess.run([*exe, cmd, "--help"], capture_output=True, text=True, check=True)
        assert "usage: difflab " + cmd in res.stdout
    res = subprocess.run([*exe, "eval", "nothing.npz"], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
