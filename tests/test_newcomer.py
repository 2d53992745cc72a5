"""The rough edges a new user hit on a fresh clone, each as they met it: one clear line, nothing touched, a
sensible default."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from difflab.cli import main
from difflab.config import load_config, tomllib
from difflab.errors import closest, edit_distance
from difflab.objectives import OBJECTIVES
from difflab.runs import Run
from difflab.training import train

TINY = ["--width", "16", "--depth", "1", "--set", "train.batch_size=16", "--set", "data.n_train=200", "--quiet"]


def files_of(folder) -> dict:
    """Every file under ``folder``: relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_an_unknown_unet_key_is_one_line_with_a_did_you_mean(extra, tmp_path, capsys):
    assert main(["train", "--data", "digits", "--set", "model.unet.foo=1", *extra, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.unet.foo" in err and "channel_mult" in err and "Traceback" not in err
    assert main(["train", "--data", "digits", "--set", "model.unet.chanel_mult=[1]", *extra,
                 "--out", str(tmp_path / "r")]) == 2
    assert "did you mean 'channel_mult'?" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # before any work


def test_did_you_mean_takes_swapped_letters_and_case():
    assert edit_distance("dms", "dsm") == 1 and edit_distance("dms", "edm") == 2 and edit_distance("", "ab") == 2
    assert edit_distance("kitten", "sitting") == 3
    assert closest("dms", OBJECTIVES) == "dsm" and closest("DSM", OBJECTIVES) == "dsm"
    assert closest("sdm", OBJECTIVES) == "dsm" and closest("cld", OBJECTIVES) == "cdl"
    assert closest("xyz", OBJECTIVES) is None
    assert closest("chanel_mult", ["channel_mult", "model_channels"]) == "channel_mult"


@pytest.mark.parametrize("typed", ["dms", "DSM"])
def test_a_misspelt_objective_suggests_dsm(typed, tmp_path, capsys):
    assert main(["train", "--objective", typed, "--out", str(tmp_path / "r")]) == 2
    assert "(did you mean 'dsm'?)" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--steps", "4", *TINY, "--out", str(run)]) == 0
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "already at step 4 of 4" in err and "--steps" in err and err.count("\n") == 1
    assert json.loads(out.strip().splitlines()[-1]) == {"run_dir": str(run), "step": 4, "steps": 4,
                                                        "trained_steps": 0}
    assert files_of(run) == before  # no log line, config, checkpoint or tracker file written
    assert main(["train", "--out", str(run), "--resume", "--until", "3"]) == 0  # before the run's step: nothing either
    assert files_of(run) == before
    assert main(["train", "--out", str(run), "--resume", "--steps", "6"]) == 0
    assert Run.load(run).step == 6


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_next(tmp_path, capsys):
    run = tmp_path / "r"
    nan = ["--steps", "20", *TINY, "--set", "train.ckpt_every=1000", "--lr", "1e30", "--set", "train.grad_clip=0",
           "--set", "train.warmup_steps=0"]
    assert main(["train", *nan, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "loss is" in err and "no checkpoint was written, so the same command starts afresh" in err
    assert (run / "config.json").exists() and not (run / "checkpoints").exists()
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "stopped before its first one: the same command without --resume" in capsys.readouterr().err
    assert main(["train", "--steps", "5", *TINY, "--out", str(run)]) == 0  # the next try, same --out
    assert "held a run that stopped before its first checkpoint; starting afresh" in capsys.readouterr().err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [5] and Run.load(run).step == 5  # nothing of the failed try is left
    assert main(["train", "--steps", "5", *TINY, "--out", str(run)]) == 2  # a real run is still protected
    assert "already holds a run" in capsys.readouterr().err


def test_log_records_say_how_many_steps_their_loss_averages(tmp_path):
    run = tmp_path / "r"
    cfg = load_config(overrides=["train.steps=25", "train.log_every=10", "model.width=16", "model.depth=1",
                                 "train.batch_size=16", "data.n_train=200"])
    train(cfg, run, until=15, progress=False)
    res = train(None, run, resume=True, progress=False)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss_steps"]) for r in log] == [(10, 10), (15, 5), (20, 5), (25, 5)]
    # the summary's loss is the last record's: the mean over its loss_steps steps
    assert res.loss == log[-1]["loss"] and res.loss_steps == 5


def test_print_config_gives_the_resolved_config_as_toml_that_config_reads_back(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--lr", "5e-4", "--print-config", "--out", str(tmp_path / "r")]) == 0
    text = capsys.readouterr().out
    saved = tomllib.loads(text)
    assert saved["model"]["arch"] == "unet" and saved["train"]["batch_size"] == 128 and saved["train"]["lr"] == 5e-4
    assert saved["train"]["threads"] >= 1  # resolved, as a run saves it
    (tmp_path / "c.toml").write_text(text)
    assert load_config(tmp_path / "c.toml").to_dict() == load_config(overrides=[
        f"{sec}.{k}={json.dumps(v)}" for sec, d in saved.items() for k, v in d.items() if not isinstance(v, dict)
    ]).to_dict()
    assert not (tmp_path / "r").exists()  # nothing trained, no folder
    assert main(["train", "--steps", "3", *TINY, "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "d"), "--resume", "--print-config"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["train"]["steps"] == 3


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("digits") / "r"
    assert main(["train", "--data", "digits", "--preset", "tiny", "--conditional", "--steps", "2", "--set",
                 "train.batch_size=8", "--quiet", "--out", str(run)]) == 0
    return run


def test_an_image_run_samples_ddim_and_a_grid_alone_draws_64(digits_run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["sample", str(digits_run), "--class", "3", "--grid", str(tmp_path / "g.png"), "--json"]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["sampler"] == "ddim" and stats["steps"] == 50 and stats["n_samples"] == 64
    assert (tmp_path / "g.png").exists()
    assert "note: 64 samples x 50 network calls (ddim) on cpu" in err  # the cost, said up front


def test_a_class_out_of_range_names_the_flag_and_the_classes(digits_run, tmp_path, capsys):
    assert main(["sample", str(digits_run), "--class", "12", "--n", "4", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert "--class" in err and "0..9" in err and "10 classes" in err and "4 values" not in err


def test_study_help_lists_every_study(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    out = capsys.readouterr().out
    from difflab.studies import STUDIES

    for name in STUDIES:
        assert f"\n  {name} " in out


@pytest.mark.slow
def test_sigterm_during_sampling_ends_in_one_line(tmp_path):
    run = tmp_path / "r"
    assert main(["train", "--steps", "2", *TINY, "--out", str(run)]) == 0
    p = subprocess.Popen([sys.executable, "-m", "difflab.cli", "sample", str(run), "--steps", "1000", "--n", "200000",
                          "--batch-size", "1000", "--out", str(tmp_path / "s.npz")],
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "sample" not in p.stderr.readline():  # its first progress line: sampling has started
        assert time.time() < deadline and p.poll() is None
    # One SIGTERM, repeated every 5 s while the process lives: a signal that lands while Python runs a finaliser
    # (whose exceptions Python only prints) would be lost, on a loaded machine now and then, as Ctrl-C would be
    while p.poll() is None and time.time() < deadline + 60:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    err = p.stderr.read()
    assert p.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "error: interrupted (SIGTERM)" and "Traceback" not in err
    assert not (tmp_path / "s.npz").exists()


def test_taa_from_the_prior_start_on_heun_warns_in_one_line(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--steps", "2", *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    base = ["sample", str(run), "--sampler", "picard-heun", "--steps", "4", "--n", "3", "--quiet", "--accel", "taa"]
    assert main([*base, "--init", "prior", "--out", str(tmp_path / "a.npz")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "--init extrapolate" in warned[0]
    assert main([*base, "--out", str(tmp_path / "b.npz")]) == 0  # taa alone: the extrapolated start, no warning
    assert "warning" not in capsys.readouterr().err
