"""Progress a person can follow: plain lines (no carriage returns, a bounded number) when stderr is not a terminal,
a tqdm bar when it is, silence when disabled; and progress from training, sampling, Picard sweeps and studies."""

import io
import json
import re

import pytest
import torch

from difflab.cli import main

TINY_TRAIN = ["--data", "dino", "--batch-size", "16", "--set", "model.width=16", "--set", "model.depth=1",
              "--set", "data.n_train=400"]
START = re.compile(r"^(?P<desc>[^:]+): 0/(?P<total>\d+) .*started$")


@pytest.fixture(autouse=True)
def plain_env(monkeypatch):
    """No overrides from the environment, and every 10% milestone shown (no 1-second gap between lines)."""
    for var in ("TQDM_DISABLE", "DIFFLAB_PROGRESS", "DIFFLAB_PROGRESS_SECONDS", "DIFFLAB_PROGRESS_FRACTION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIFFLAB_PROGRESS_MIN_SECONDS", "0")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("progress") / "r"
    assert main(["train", *TINY_TRAIN, "--steps", "40", "--out", str(out), "--quiet"]) == 0
    return out


def lines_of(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------------------------- the module


def test_plain_lines_are_bounded_and_say_count_rate_elapsed_and_left():
    from difflab.progress import progress

    buf = io.StringIO()  # not a TTY
    with progress(200, "train", stream=buf) as bar:
        for i in range(200):
            if i == 100:
                bar.set_postfix(loss=0.41234)
            bar.update(1)
    text = buf.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0] == "train: 0/200 steps (0%), started"
    assert 3 <= len(lines) <= 12  # start, one per 10% at most, end
    assert re.fullmatch(r"train: 200/200 steps \(100%\), [\d.,]+ steps/s, [\d.]+ s elapsed, loss 0\.4123, done",
                        lines[-1]), lines[-1]
    middle = lines[1:-1]
    assert middle and all(re.search(r"steps/s, .* elapsed, ~.* left", line) for line in middle)
    assert "train: 100/200 steps (50%)" in text and "loss 0.4123" in middle[-1]


def test_plain_lines_every_n_seconds_and_unknown_totals():
    from difflab.progress import progress

    buf = io.StringIO()
    bar = progress(None, "features", unit="image", stream=buf, seconds=0)  # a line at every update
    for _ in range(3):
        bar.update(5)
    bar.close()
    assert [line.split(",")[0] for line in buf.getvalue().splitlines()] == [
        "features: 0 images", "features: 5 images", "features: 10 images", "features: 15 images",
        "features: 15 images"]  # the last: the end line
    assert buf.getvalue().rstrip().endswith("done")
    buf = io.StringIO()  # an early stop says so
    with progress(10, "x", stream=buf, fraction=0.5) as bar:
        bar.update(3)
    assert buf.getvalue().splitlines()[-1].endswith("stopped")


def test_a_terminal_gets_a_tqdm_bar_and_disabled_is_silent(monkeypatch, capsys):
    from difflab.progress import progress

    class TTY(io.StringIO):
        def isatty(self):
            return True

    tty = TTY()
    with progress(50, "sample ddpm", stream=tty) as bar:
        bar.update(50)
    assert "\r" in tty.getvalue() and "50/50" in tty.getvalue()  # tqdm's frames
    quiet = io.StringIO()
    with progress(50, "x", stream=quiet, enabled=False) as bar:
        bar.update(50)
        bar.set_postfix(loss=1.0)
        bar.write("step 50: fid 3.2")  # messages (the trainer's FID lines) are still shown, on stdout
    assert quiet.getvalue() == "" and capsys.readouterr().out == "step 50: fid 3.2\n"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with progress(50, "x", stream=quiet) as bar:
        bar.update(50)
    assert quiet.getvalue() == ""


def test_duration_and_rate_formats():
    from difflab.progress import duration, rate

    assert duration(4.24) == "4.2 s" and duration(45) == "45 s" and duration(73) == "1 min 13 s"
    assert duration(2 * 3600 + 5 * 60) == "2 h 05 min"
    assert rate(412, 10, "step") == "41.2 steps/s" and rate(1, 3.5, "sweep") == "3.5 s/sweep"


# --------------------------------------------------------------------------------------------- the CLI


def test_training_to_a_file_prints_bounded_plain_lines(tmp_path, capsys):
    assert main(["train", *TINY_TRAIN, "--steps", "400", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = lines_of(err, "train: ")
    assert lines[0] == "train: 0/400 steps (0%), started"
    assert lines[-1].startswith("train: 400/400 steps (100%)") and lines[-1].endswith("done")
    assert "elapsed" in lines[-1] and "steps/s" in lines[-1] and "loss " in lines[-1]
    assert 2 <= len(lines) < 15 and len(err.splitlines()) < 15


def test_sampling_prints_progress_lines_unless_quiet(tiny_run, tmp_path, capsys):
    argv = ["sample", str(tiny_run), "--sampler", "ddpm", "--steps", "100", "--n", "50",
            "--out", str(tmp_path / "s.npz")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = lines_of(err, "sample ddpm: ")
    assert lines[0] == "sample ddpm: 0/100 steps (0%), started"
    assert lines[-1].startswith("sample ddpm: 100/100 steps (100%)") and lines[-1].endswith("done")
    assert 2 <= len(lines) <= 12
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_parallel_sampling_prints_sweeps_and_converged_steps(tiny_run, tmp_path, capsys):
    assert main(["sample", str(tiny_run), "--sampler", "picard-ddpm", "--steps", "100", "--n", "40",
                 "--out", str(tmp_path / "s.npz"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err
    sweeps = [re.search(r"sweep (\d+): (\d+)/100 steps converged", line) for line in lines_of(err, "sample picard")]
    sweeps = [m for m in sweeps if m]
    assert len(sweeps) >= 2
    numbers = [(int(m.group(1)), int(m.group(2))) for m in sweeps]
    assert numbers == sorted(numbers) and numbers[-1][1] == 100  # sweeps and converged steps only go up
    assert numbers[-1][0] == json.loads(out.strip().splitlines()[-1])["iterations"]
    assert "samples done 40/40" in err.splitlines()[-1]


def test_feature_extraction_reports_progress(capsys):
    from difflab.metrics.extractors import FeatureExtractor

    class Mean(FeatureExtractor):
        name = "mean"

        def _features(self, images):
            return images.mean((2, 3))

    Mean(batch_size=4).extract(torch.zeros(10, 3, 4, 4), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0] == "mean features: 0/10 images (0%), started"
    assert err.splitlines()[-1].startswith("mean features: 10/10 images (100%)")


# --------------------------------------------------------------------------------------------- a study


@pytest.mark.slow
def test_a_study_announces_its_stages_and_shows_sampling_progress(tmp_path, capsys):
    from difflab.studies import StudyOptions, run_study

    tiny = {"steps": 30, "snapshots": 1, "step_counts": [5], "n_samples": 40, "n_ref": 100, "n_nll": 20,
            "n_alpha": 2, "n_classify": 20, "floor_draws": 2, "window": None,
            "train_overrides": ["model.width=16", "model.depth=1", "train.batch_size=16", "data.n_train=200",
                                "train.log_every=10"],
            "chain": {"ddim": {"steps": 10}, "picard-ddpm": {"steps": 30}}}
    run_study("dino", StudyOptions(out=tmp_path, objectives=["dsm"], samplers=["ddim", "picard-ddpm"],
                                   overrides=tiny))
    out, err = capsys.readouterr()
    assert "\r" not in out + err
    for stage in ("sample dsm-s0-ddim: 40 samples, ddim-10", "sample dsm-s0-picard-ddpm: 40 samples, parallel",
                  "nll-dsm-s0: held-out likelihood", "mmd-dsm-s0-ddim: MMD", "farfield-dsm-s0: far-field gain",
                  "classify-dsm-s0: noise classification", "progress-dsm-s0: MMD during training", "figures: "):
        assert stage in out, stage
    assert lines_of(err, "sample ddim: ")[-1].startswith("sample ddim: 10/10 steps (100%)")
    assert re.search(r"sample picard-ddpm, sweep \d+: 30/30 steps converged", err)
    assert lines_of(err, "MMD per Picard sweep: ")[-1].endswith("done")
    starts = [m.group("desc") for m in map(START.match, err.splitlines()) if m]
    assert {"train", "sample ddim", "sample picard-ddpm", "MMD during training dsm-s0",
            "MMD against sampling steps dsm-s0"} <= set(starts)
