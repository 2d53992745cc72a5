"""--log tensorboard and --log wandb: what log.jsonl records, the trackers get, at the same steps, across resumes."""

import json
import shutil
import sys
import types

import pytest
import torch

from difflab.cli import main
from difflab.config import TRACKERS, load_config
from difflab.errors import DifflabError
from difflab.training import train
from difflab.training.checkpoint import list_checkpoints
from difflab.training.tracking import OPENERS

TINY = ["--data", "dino", "--width", "16", "--depth", "1", "--set", "train.batch_size=32", "--set",
        "data.n_train=400", "--set", "train.log_every=10", "--set", "train.ckpt_every=20", "--quiet"]


def log_records(run_dir, key="loss") -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if key in r]


def events(run_dir):
    """RUN/tensorboard/ read back with TensorBoard's own reader, every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def assert_scalars_match_the_log(run_dir, key="loss") -> None:
    read = [(e.step, e.value) for e in events(run_dir).Scalars(key)]
    logged = [(r["step"], r[key]) for r in log_records(run_dir, key)]
    steps = [s for s, _ in read]
    assert steps == sorted(set(steps)), steps  # strictly increasing: no step twice
    assert steps == [s for s, _ in logged]
    for (_, a), (_, b) in zip(read, logged, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)  # float32 events


def test_tensorboard_gets_the_log_previews_and_config_and_a_resume_appends(tmp_path, capsys):
    r = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "50", "--log", "tensorboard", "--sample-every", "25", "--set",
                 "train.sample_n=16", "--out", str(r)]) == 0
    assert [e["step"] for e in log_records(r)] == [10, 20, 30, 40, 50]
    for key in ("loss", "lr", "grad_norm", "steps_per_s"):
        assert_scalars_match_the_log(r, key)
    assert main(["train", "--out", str(r), "--resume", "--steps", "80", "--quiet"]) == 0
    assert [e["step"] for e in log_records(r)] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert_scalars_match_the_log(r)
    acc = events(r)
    assert [e.step for e in acc.Images("preview")] == [25, 50, 75]
    assert acc.Images("preview")[0].width > 100
    texts = acc.Tensors("config/text_summary")  # each session's config, from the first step it trained
    assert [e.step for e in texts] == [1, 51]
    config = json.loads(texts[-1].tensor_proto.string_val[0].decode())
    assert config["train"]["steps"] == 80 and config["train"]["log"] == ["tensorboard"]
    capsys.readouterr()


def test_a_resume_hides_the_events_an_interrupted_session_wrote_past_its_checkpoint(tmp_path, capsys):
    r = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "50", "--set", "train.keep_checkpoints=5", "--log", "tensorboard",
                 "--out", str(r)]) == 0
    first = {e["step"]: e["steps_per_s"] for e in log_records(r)}
    for ckpt in list_checkpoints(r)[1:]:  # as if killed after step 50 with only the step-20 checkpoint written
        shutil.rmtree(ckpt)
    assert main(["train", "--out", str(r), "--resume", "--quiet"]) == 0
    assert [e["step"] for e in log_records(r)] == [10, 20, 30, 40, 50]
    for key in ("loss", "steps_per_s"):
        assert_scalars_match_the_log(r, key)
    again = {e["step"]: e["steps_per_s"] for e in log_records(r)}
    assert again[20] == first[20] and again[30] != first[30]  # the checkpoint's record stays, later ones are new
    capsys.readouterr()


@pytest.mark.parametrize(("kind", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_extra_fails_in_one_line_before_anything_is_written(kind, module, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    assert main(["train", *TINY, "--steps", "5", "--log", kind, "--out", str(tmp_path / "r")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --log {kind} needs the {kind} extra: "
                                                   f"pip install 'difflab[{kind}]'"), lines
    assert not (tmp_path / "r").exists()
    cfg = load_config(overrides=["train.steps=5", "model.width=16", "model.depth=1", "train.batch_size=32",
                                 "data.n_train=400", f'train.log=["{kind}"]'])
    with pytest.raises(DifflabError, match=f"--log {kind} needs the {kind} extra"):
        train(cfg, tmp_path / "lib", progress=False)
    assert not (tmp_path / "lib").exists()  # the library's train() fails at its plan, before the folder is made


def test_log_names_are_checked_and_may_be_listed_or_repeated(tmp_path, capsys, monkeypatch):
    assert set(TRACKERS) == set(OPENERS)
    assert main(["train", *TINY, "--log", "tensorbord", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "train.log = 'tensorbord' is not one of tensorboard, wandb (did you mean 'tensorboard'?)" in err
    assert len(err.splitlines()) == 1
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    assert main(["train", *TINY, "--log", "tensorboard,wandb", "--log", "wandb", "--dry-run", "--json",
                 "--out", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["config"]["train"]["log"] == [
        "tensorboard", "wandb", "wandb"]
    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--set", "train.lr=1"]) == 2
    assert "only --until and the runtime settings (--steps, --log, --threads, --device)" in capsys.readouterr().err


def test_a_resume_may_add_or_drop_trackers_and_computes_the_same_run(tmp_path, capsys):
    """Trackers are a runtime setting: --log on --resume replaces the saved ones, and the weights are those of a
    run that never changed them."""
    from difflab.runs import Run

    r, clean = tmp_path / "r", tmp_path / "clean"
    assert main(["train", *TINY, "--steps", "40", "--out", str(r)]) == 0
    assert not (r / "tensorboard").exists()
    assert main(["train", "--out", str(r), "--resume", "--steps", "60", "--log", "tensorbord", "--quiet"]) == 2
    assert "train.log = 'tensorbord' is not one of tensorboard, wandb" in capsys.readouterr().err
    assert main(["train", "--out", str(r), "--resume", "--steps", "60", "--log", "tensorboard", "--quiet"]) == 0
    assert [e.step for e in events(r).Scalars("loss")] == [50, 60]  # from the resume on
    assert json.loads((r / "config.json").read_text())["train"]["log"] == ["tensorboard"]
    assert main(["train", "--out", str(r), "--resume", "--steps", "80", "--log", "none", "--quiet"]) == 0
    assert [e.step for e in events(r).Scalars("loss")] == [50, 60]  # dropped: nothing more written
    assert main(["train", *TINY, "--steps", "80", "--out", str(clean)]) == 0
    a, b = Run.load(r).denoiser.state_dict(), Run.load(clean).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class FakeWandb(types.ModuleType):
    """The part of the wandb module the tracker uses, recording what it is given."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.Image = lambda data: ("image", data)

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logged.append((step, values))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_resumes_the_run_whose_id_the_run_folder_keeps(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    r = tmp_path / "r"
    cfg = load_config(overrides=["train.steps=40", "model.width=16", "model.depth=1", "train.batch_size=32",
                                 "data.n_train=400", "train.log_every=10", "train.ckpt_every=10",
                                 "train.sample_every=20", "train.sample_n=8", 'train.log=["wandb"]'])
    train(cfg, r, until=20, progress=False)
    train(None, r, resume=True, progress=False)
    run_id = (r / "wandb_id.txt").read_text().strip()
    assert [kw["id"] for kw in fake.inits] == [run_id, run_id] and fake.finished == 2
    assert all(kw["resume"] == "allow" and kw["dir"] == str(r) for kw in fake.inits)
    assert fake.inits[0]["config"]["train"]["log"] == ["wandb"]
    losses = [(step, v["loss"]) for step, v in fake.logged if "loss" in v]
    assert losses == [(e["step"], e["loss"]) for e in log_records(r)]
    images = [(step, v["preview"]) for step, v in fake.logged if "preview" in v]
    assert images == [(s, ("image", str(r / "samples" / f"step-{s:08d}.png"))) for s in (20, 40)]
    train(cfg, r, overwrite=True, progress=False)  # a new run in the folder: a new W&B run
    assert fake.inits[-1]["id"] == (r / "wandb_id.txt").read_text().strip() != run_id


def test_real_wandb_offline_keeps_one_run_id_across_a_resume(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    r = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "20", "--log", "wandb", "--sample-every", "20", "--set",
                 "train.sample_n=8", "--out", str(r)]) == 0
    assert main(["train", "--out", str(r), "--resume", "--steps", "30", "--quiet"]) == 0
    run_id = (r / "wandb_id.txt").read_text().strip()
    runs = sorted((r / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in runs)
    capsys.readouterr()
