import json
import os

import pytest
import torch

import difflab.training.checkpoint as ckpt_mod
from difflab.config import RunConfig, load_config
from difflab.errors import DifflabError
from difflab.runs import Run
from difflab.training import Trainer, load_checkpoint, lr_at, train
from difflab.training.checkpoint import list_checkpoints


def tiny(steps=40, **train_kw) -> RunConfig:
    cfg = load_config(overrides=[f"train.steps={steps}", "train.batch_size=32", "model.width=16", "model.depth=1",
                                 "data.n_train=500", "train.log_every=10", "train.ckpt_every=10",
                                 "train.warmup_steps=5"])
    for k, v in train_kw.items():
        setattr(cfg.train, k, v)
    return cfg


def _weights(run_dir, prefix=""):
    tensors, _ = load_checkpoint(run_dir)
    return {k: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("objective", ["dsm", "edm", "itd", "stf"])
def test_resume_is_bit_identical(tmp_path, objective):
    cfg = tiny(steps=40)
    cfg.objective.name = objective
    train(cfg, tmp_path / "a", progress=False)
    cfg2 = tiny(steps=40)
    cfg2.objective.name = objective
    train(cfg2, tmp_path / "b", until=17, progress=False)
    assert list_checkpoints(tmp_path / "b")[-1].name == "step-00000017"
    train(None, tmp_path / "b", resume=True, progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 17, 20, 30, 40]


def test_resume_can_extend_the_run(tmp_path):
    train(tiny(steps=20), tmp_path / "r", progress=False)
    res = train(None, tmp_path / "r", resume=True, steps=30, progress=False)
    assert res.step == 30 and load_checkpoint(tmp_path / "r")[1]["config"]["train"]["steps"] == 30


def test_lr_schedule_shapes():
    cfg = tiny(steps=1000, warmup_steps=100, lr=1.0)
    assert lr_at(cfg, 0) == pytest.approx(0.01) and lr_at(cfg, 99) == pytest.approx(1.0)
    assert lr_at(cfg, 550) == pytest.approx(0.5) and lr_at(cfg, 1000) == pytest.approx(0.0, abs=1e-12)
    cfg.train.lr_schedule = "linear"
    assert lr_at(cfg, 550) == pytest.approx(0.5)
    cfg.train.lr_schedule = "constant"
    assert lr_at(cfg, 999) == 1.0
    cfg.train.lr_schedule, cfg.train.lr_ref_steps = "inv-sqrt", 250  # EDM2: lr / sqrt(max(step / ref, 1))
    assert lr_at(cfg, 50) == pytest.approx(0.51) and lr_at(cfg, 250) == 1.0
    assert lr_at(cfg, 1000) == pytest.approx(0.5) and lr_at(cfg, 9000) == pytest.approx(1 / 6)


def test_inv_sqrt_saves_its_reference_step_so_a_longer_resume_keeps_the_curve(tmp_path):
    """lr_ref_steps left automatic is saved as a tenth of train.steps; --steps on resume does not move it."""
    cfg = load_config(overrides=["train.steps=20", "train.lr_schedule='inv-sqrt'", "model.width=16", "model.depth=1",
                                 "train.batch_size=16", "data.n_train=200", "train.warmup_steps=0"])
    train(cfg, tmp_path / "r", progress=False)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["lr_ref_steps"] == 2
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(cfg.train.lr / (19 / 2) ** 0.5)
    train(None, tmp_path / "r", resume=True, steps=40, progress=False)  # (ref stays 2, not a tenth of 40)
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lr"] == pytest.approx(cfg.train.lr / (39 / 2) ** 0.5)


def test_ema_tracks_the_weights(tmp_path):
    cfg = tiny(steps=30, ema_decay=0.0)
    train(cfg, tmp_path / "r", progress=False)
    t = _weights(tmp_path / "r")
    for k in (k for k in t if k.startswith("model.")):
        assert torch.equal(t[k], t["ema." + k[len("model."):]])  # decay 0: the EMA is the weights


def _poison(trainer: Trainer, at: int):
    real = trainer.objective.loss

    def loss(D, x0, draws, **refs):  # refs: reference=, for objectives that use one
        out = real(D, x0, draws, **refs)
        return out * float("nan") if trainer.step == at else out

    trainer.objective.loss = loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny(steps=40), tmp_path)
    _poison(trainer, 25)
    with pytest.raises(DifflabError, match="loss is nan at step 25; the last good checkpoint is .*step-00000020"):
        trainer.run(progress=False)
    assert load_checkpoint(tmp_path)[1]["step"] == 20


def test_nan_loss_can_be_skipped(tmp_path):
    trainer = Trainer(tiny(steps=30, on_nonfinite="skip"), tmp_path)
    _poison(trainer, 12)
    res = trainer.run(progress=False)
    assert res.step == 30 and res.skipped_steps == 1
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path, "model.").values())


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = Trainer(tiny(steps=40), tmp_path)
    trainer.run(until=10, progress=False)

    def full_disk(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", full_disk)
    with pytest.raises(DifflabError, match="No space left on device.*previous checkpoint is kept"):
        trainer.run(until=20, progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    Run.load(tmp_path)  # still loads


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(tiny(steps=40, keep_checkpoints=2), tmp_path / "r", progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-00000030", "step-00000040"]


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    train(tiny(steps=10), tmp_path / "r", progress=False)
    ck = list_checkpoints(tmp_path / "r")[-1]
    weights = (ck / "weights.safetensors").read_bytes()
    (ck / "weights.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(DifflabError, match="is corrupt: weights.safetensors cannot be read"):
        Run.load(tmp_path / "r")
    (ck / "weights.safetensors").write_bytes(weights)
    state = json.loads((ck / "state.json").read_text())
    (ck / "state.json").write_text(json.dumps({**state, "format_version": 99}))
    with pytest.raises(DifflabError, match="newer than this difflab"):
        Run.load(tmp_path / "r")
    state["config"]["model"]["width"] = 32
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(DifflabError, match="does not match this model's architecture"):
        Run.load(tmp_path / "r")
    (ck / "state.json").write_text("{not json")
    with pytest.raises(DifflabError, match="not valid JSON"):
        Run.load(tmp_path / "r")


def test_run_folder_rules(tmp_path):
    train(tiny(steps=10), tmp_path / "r", progress=False)
    with pytest.raises(DifflabError, match="already holds a run: pass --resume"):
        train(tiny(steps=10), tmp_path / "r", progress=False)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    train(tiny(steps=10), tmp_path / "r", overwrite=True, progress=False)
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # --overwrite removes only run files
    with pytest.raises(DifflabError, match="nothing to resume"):
        train(None, tmp_path / "empty", resume=True, progress=False)


@pytest.mark.slow
def test_a_short_run_learns_the_two_mode_mixture(tmp_path):
    """1,000 steps on 0.5 N(-5, 1) + 0.5 N(5, 1): the samples have both modes, their weights and widths."""
    cfg = load_config(overrides=['data.name="gmm1d"', "data.n_train=20000", "train.steps=1000",
                                 "train.batch_size=128", "model.width=64", "model.depth=2", "train.ema_decay=0.99"])
    train(cfg, tmp_path / "r", progress=False)
    x, _ = Run.load(tmp_path / "r").sample(2000, seed=0, sampler="ddpm", steps=1000)
    x = x[:, 0]
    assert (x.abs() > 2.5).double().mean() > 0.97  # 0.994 for the true mixture
    assert 0.45 < (x > 0).double().mean() < 0.55
    for mode in (x[x > 0], -x[x < 0]):
        assert abs(mode.mean() - 5) < 0.25 and 0.8 < mode.std() < 1.2


def test_fine_tuning_starts_from_the_init_runs_ema(tmp_path, capsys):
    from difflab.cli import main

    train(tiny(steps=20), tmp_path / "dsm", progress=False)
    cfg = tiny(steps=10)
    cfg.objective.name = "cdl"
    cfg.objective.options = {"n_cdl": 2, "n_alpha": 4}
    cfg.train.init = str(tmp_path / "dsm")
    trainer = Trainer(cfg, tmp_path / "ft")
    ema = _weights(tmp_path / "dsm", "ema.")
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, ema["ema." + k]), k
    assert main(["train", "--objective", "cdl", "--init", str(tmp_path / "dsm"), "--steps", "5",
                 "--set", "objective.options.n_alpha=4", "--out", str(tmp_path / "ft2"), "--quiet"]) == 0
    saved = json.loads((tmp_path / "ft2" / "config.json").read_text())
    assert saved["model"]["width"] == 16 and saved["objective"]["name"] == "cdl"  # the init run's model settings
    assert saved["train"]["init"] == str(tmp_path / "dsm")
    other = tiny(steps=5)
    other.data.name = "gmm1d"
    other.train.init = str(tmp_path / "dsm")
    with pytest.raises(DifflabError, match="trained on examples of shape"):
        Trainer(other, tmp_path / "bad")


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    code = ("from difflab.cli import main; import sys; sys.exit(main(['train', '--out', sys.argv[1], '--steps', "
            "'100000', '--width', '16', '--depth', '1', '--set', 'train.batch_size=16', '--set', "
            "'data.n_train=200', '--set', 'train.ckpt_every=1000000', '--quiet']))")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "r" / "log.jsonl").exists() or (tmp_path / "r" / "log.jsonl").stat().st_size == 0:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step" in err and "--resume" in err and "Traceback" not in err
    step = load_checkpoint(tmp_path / "r")[1]["step"]
    assert step >= 100
    res = train(None, tmp_path / "r", resume=True, steps=step + 5, progress=False)
    assert res.step == step + 5


# A process that has imported difflab and torch (and what a training run imports on its first steps) and forks a
# training process per line of argv it reads: each killed run is a process of its own, started in a few ms rather
# than the seconds an interpreter takes to import torch. It computes nothing itself (no torch thread pool to fork).
_FORK_SERVER = """
import json, os, sys
import torch, torch._dynamo, torch.optim
import difflab.cli, difflab.data, difflab.models, difflab.objectives, difflab.training
difflab.cli.build_parser()
for line in sys.stdin:
    if not line.strip():
        break
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # (stdout is this server's answer pipe)
            code = difflab.cli.main(json.loads(line)) or 0
        finally:
            os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # reap when asked: until then a run that ended is a zombie, and a kill still finds it
    print(os.waitpid(pid, 0)[1], flush=True)
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_run(tmp_path):
    """20 SIGKILLs at random moments (checkpoints are written every step, so many land inside a write); every
    resume loads, and the final weights equal an uninterrupted run's bit for bit. Each kill waits for a random
    target step (polled, so it lands at a random phase of the step and write cycle) whatever the machine's speed.
    Each killed run is a process of its own, forked by a server that has imported torch once."""
    import random
    import signal
    import subprocess
    import sys
    import time

    args = ["--steps", "500", "--width", "16", "--depth", "1", "--set", "train.batch_size=16", "--set",
            "data.n_train=200", "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=2", "--quiet",
            "--threads", "1"]  # the in-process reference below runs on one thread too: the same kernels
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    targets = sorted(rng.sample(range(20, 480), 20))

    def newest_step() -> int:
        found = list_checkpoints(run_dir)
        return int(found[-1].name.split("-")[-1]) if found else 0

    def ended(pid: int) -> bool:  # exited (a zombie until the server reaps it)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")

    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, bufsize=1)

    def ask(line: str) -> int:
        server.stdin.write(line + "\n")
        server.stdin.flush()
        answer = server.stdout.readline()
        assert answer, f"the fork server ended (exit {server.wait()})"
        return int(answer)

    kills = 0
    try:
        for target in targets:
            mode = "--resume" if list_checkpoints(run_dir) else "--overwrite"
            extra = [] if mode == "--resume" else args
            pid = ask(json.dumps(["train", "--out", str(run_dir), mode, *extra,
                                  *(["--quiet", "--threads", "1"] if mode == "--resume" else [])]))
            deadline = time.time() + 120
            while newest_step() < target and not ended(pid) and time.time() < deadline:
                time.sleep(rng.uniform(0.0, 0.004))
            os.kill(pid, signal.SIGKILL)
            status = ask("reap")
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"the run ended before it was killed (wait status {status})"
            kills += 1
            load_checkpoint(run_dir)  # the newest complete checkpoint always loads
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    if load_checkpoint(run_dir)[1]["step"] < 500:
        train(None, run_dir, resume=True, progress=False)
    from difflab.cli import main

    assert main(["train", "--out", str(tmp_path / "clean"), *args]) == 0
    a, b = _weights(run_dir), _weights(tmp_path / "clean")
    assert kills == 20 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
