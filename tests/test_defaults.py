"""Defaults a user would choose: sinusoidal input features for the 2-D MLP, the network picked by the data, and
threads as a runtime setting fixed by the network (never by the load), and recorded."""

from __future__ import annotations

import json

import pytest
import torch

from difflab import threads
from difflab.cli import main
from difflab.config import RunConfig, load_config
from difflab.models import build_network
from difflab.runs import Run

TINY = ["--steps", "6", "--width", "16", "--depth", "1", "--set", "train.batch_size=16", "--set",
        "train.ckpt_every=3", "--quiet"]


def test_the_2d_mlp_has_sinusoidal_input_features_by_default():
    net = build_network(load_config(), (2,))
    assert net.input_embed is not None
    assert net.inp.in_features == 2 * (1 + 2 * 64)  # each coordinate, and the sin and cos of 64 frequencies of it
    assert build_network(load_config(overrides=["model.input_freqs=0"]), (2,)).input_embed is None
    assert build_network(load_config(), (64,)).input_embed is None  # high-dimensional flat data: raw coordinates
    assert build_network(load_config(overrides=["model.input_freqs=4"]), (64,)).inp.in_features == 64 * 9
    import torch

    empty = net(torch.zeros(0, 2), torch.zeros(0))  # a process with no rows of a parallel sweep calls it so
    assert empty.shape == (0, 2)


def test_a_run_saved_before_the_default_changed_keeps_raw_coordinates():
    saved = RunConfig().to_dict()
    del saved["model"]["input_freqs"]  # a config.json written when raw coordinates were the default
    assert RunConfig.from_dict(saved).model.input_freqs == 0
    assert RunConfig.from_dict(RunConfig().to_dict()).model.input_freqs is None  # (a trainer saves the resolved 64)


def test_auto_arch_picks_the_unet_for_images_and_the_mlp_for_flat_data(tmp_path):
    assert main(["train", "--data", "digits", "--preset", "tiny", *TINY, "--out", str(tmp_path / "img")]) == 0
    assert json.loads((tmp_path / "img" / "config.json").read_text())["model"]["arch"] == "unet"
    assert main(["train", "--data", "dino", *TINY, "--out", str(tmp_path / "flat")]) == 0
    saved = json.loads((tmp_path / "flat" / "config.json").read_text())["model"]
    assert saved["arch"] == "mlp" and saved["input_freqs"] == 64
    run = Run.load(tmp_path / "img")
    model, cfg = run.denoiser, run.config
    assert cfg.model.arch == "unet" and type(model.net).__name__ == "UNet"


def test_threads_and_device_are_runtime_settings(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--data", "dino", *TINY, "--until", "3", "--out", str(run)]) == 0
    assert main(["train", "--out", str(run), "--resume", "--threads", "1", "--device", "cpu", "--quiet"]) == 0
    assert Run.load(run).step == 6
    assert main(["sample", str(run), "--steps", "4", "--n", "3", "--threads", "1", "--quiet",
                 "--out", str(tmp_path / "s.npz")]) == 0
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.1", "--quiet"]) == 2
    assert "only --until and the runtime settings (--steps, --log, --threads, --device)" in capsys.readouterr().err


def test_resumed_with_other_threads_continues_the_run_and_records_them(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--data", "dino", *TINY, "--threads", "1", "--out", str(a)]) == 0
    assert main(["train", "--data", "dino", *TINY, "--threads", "1", "--until", "3", "--out", str(b)]) == 0
    try:
        assert main(["train", "--out", str(b), "--resume", "--threads", "2", "--quiet"]) == 0
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)
    state = json.loads(next((b / "checkpoints").glob("step-00000006/state.json")).read_text())
    assert state["threads"] == 2 and json.loads((b / "config.json").read_text())["train"]["threads"] == 2
    wa, wb = Run.load(a).denoiser.state_dict(), Run.load(b).denoiser.state_dict()
    # Another thread count may add a matrix product in another order (round-off only: a wrong step moves the
    # weights by about the learning rate, 3e-3); docs/safety.md says which settings change the numbers
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-4)


def test_the_default_thread_count_is_fixed_by_the_network_not_the_load(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_TORCH_DEFAULT", 8)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.default_threads("mlp") == 1
    assert threads.default_threads("unet") == 8 and threads.default_threads("diffusers") == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.default_threads("unet") == 2  # torchrun: four processes share the eight cores
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    assert threads.default_threads("unet") == 1  # never below one
    assert threads.threads_for(3, "mlp") == 3 and threads.threads_for(0, "unet") == 1
    assert not hasattr(threads, "busy_cores")  # /proc/loadavg is never read
    before = torch.get_num_threads()
    try:
        assert threads.set_threads(3, "mlp") == 3 and torch.get_num_threads() == 3
        assert threads.set_threads(None, "mlp") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_records_its_threads_in_config_state_and_sample_stats(tmp_path, capsys):
    run = tmp_path / "r"
    torch.set_num_threads(2)  # whatever torch had: the default for the MLP is one thread
    try:
        assert main(["train", "--data", "dino", *TINY, "--out", str(run)]) == 0
        assert torch.get_num_threads() == 1
        assert json.loads((run / "config.json").read_text())["train"]["threads"] == 1
        assert json.loads((run / "checkpoints" / "step-00000006" / "state.json").read_text())["threads"] == 1
        torch.set_num_threads(2)
        capsys.readouterr()
        assert main(["sample", str(run), "--steps", "4", "--n", "3", "--quiet", "--json",
                     "--out", str(tmp_path / "s.npz")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threads"] == 1
        assert main(["sample", str(run), "--steps", "4", "--n", "3", "--quiet", "--json", "--threads", "2",
                     "--out", str(tmp_path / "s2.npz")]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_resume_dry_run_checks_without_training(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--data", "dino", *TINY, "--until", "3", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["valid"] is True and out["resume_from_step"] == 3
    assert Run.load(run).step == 3  # nothing trained


def test_a_stopped_study_says_to_rerun_the_study(tmp_path, monkeypatch):
    import signal

    import pytest

    from difflab.studies import cache
    from difflab.studies.cache import Study
    from difflab.studies.common import StudyOptions
    from difflab.training import TrainingInterrupted

    def stopped(cfg, run, **kw):
        raise TrainingInterrupted(signal.SIGTERM, 7, run)

    monkeypatch.setattr(cache, "train", stopped)
    study = Study("dino", StudyOptions(out=tmp_path / "s", progress=False))
    with pytest.raises(TrainingInterrupted) as e:
        study.train_run("dsm-s0", ["train.steps=10"])
    assert f"difflab study dino --out {tmp_path / 's'}" in str(e.value) and "difflab train" not in str(e.value)
    assert e.value.signum == signal.SIGTERM and e.value.step == 7


@pytest.mark.slow
def test_batch_size_and_lr_default_by_the_network_and_are_saved(tmp_path, capsys):
    """The MLP's large batch and high rate are nearly free on a CPU; a U-Net's step costs about its batch, so image
    runs default to EDM-like settings. What was used is saved, and an explicit value wins."""
    small = ["--steps", "2", "--quiet", "--set", "train.ckpt_every=2"]

    def dry(*args):
        assert main(["train", *args, "--dry-run", "--json", "--out", str(tmp_path / "dry")]) == 0
        return json.loads(capsys.readouterr().out.splitlines()[-1])["config"]["train"]

    assert (dry("--data", "dino")["batch_size"], dry("--data", "dino")["lr"]) == (1024, 3e-3)
    assert (dry("--data", "digits")["batch_size"], dry("--data", "digits")["lr"]) == (128, 1e-3)
    assert (dry("--data", "digits", "--batch-size", "64", "--lr", "2e-4")["batch_size"],
            dry("--data", "dino", "--lr", "1e-2")["lr"]) == (64, 1e-2)
    assert RunConfig().train.batch_size is None and RunConfig().train.lr is None
    assert main(["train", "--data", "digits", "--preset", "tiny", *small, "--out", str(tmp_path / "img")]) == 0
    saved = json.loads((tmp_path / "img" / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["lr"]) == (128, 1e-3)
    log = [json.loads(line) for line in (tmp_path / "img" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("lr") for r in log) and all(r["lr"] <= 1e-3 for r in log if "lr" in r)
    assert main(["train", "--out", str(tmp_path / "img"), "--resume", "--steps", "4", "--quiet"]) == 0
    assert Run.load(tmp_path / "img").config.train.batch_size == 128
    capsys.readouterr()
