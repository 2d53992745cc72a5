"""Bad input ends in one line `error: ...` and exit status 2 before any work starts, and nothing is lost:
unwritable destinations, models too large for memory, malformed checkpoint states, corrupt newest checkpoints
(a run folder falls back to its newest intact one), .npz files without samples, --out folders that are not runs;
and weights files get the same mode as the run's other files."""

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import difflab.memory as memory
from difflab.cli import main
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.paths import check_writable
from difflab.runs import Run
from difflab.training import Trainer, load_checkpoint, train
from difflab.training.checkpoint import STATE, WEIGHTS, list_checkpoints

TINY = ["--steps", "4", "--batch-size", "16", "--set", "model.width=16", "--set", "train.ckpt_every=2", "--quiet"]
SAMPLE = ["--steps", "5", "--n", "4", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def make_run(path: Path, capsys) -> Path:
    code, _, err = run(["train", *TINY, "--out", str(path)], capsys)
    assert code == 0, err
    assert [p.name for p in list_checkpoints(path)] == ["step-00000002", "step-00000004"]
    return path


def forbid(monkeypatch, module, name):
    """Make ``module.name`` fail the test if called: proof that the command refused before that work."""

    def work(*args, **kwargs):
        raise AssertionError(f"{name} ran: the command started work before checking its input")

    monkeypatch.setattr(module, name, work)


@pytest.fixture
def a_file(tmp_path) -> Path:
    f = tmp_path / "file.txt"
    f.write_text("not a folder")
    return f


# --------------------------------------------------------------------------------------------- 1. destinations


def _commands(run_dir: Path, bad: Path):
    """(argv, (module, function that must not run)) for every command with a destination."""
    import difflab.cli_fid
    import difflab.data
    import difflab.data.files
    import difflab.runs
    import difflab.studies
    import difflab.training

    return {
        "train --out": (["train", *TINY, "--out", str(bad)], (difflab.data, "get_dataset")),
        "sample --out": (["sample", str(run_dir), *SAMPLE, "--out", str(bad / "s.npz")],
                         (difflab.runs.Run, "load")),
        "sample --grid": (["sample", str(run_dir), *SAMPLE, "--grid", str(bad / "g.png")],
                          (difflab.runs.Run, "load")),
        "eval --plot": (["eval", str(run_dir / "x.npz"), "--plot", str(bad / "p.png")],
                        (difflab.data.files, "load_array")),
        "fid ref --out": (["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--out",
                           str(bad / "stats.npz")], (difflab.cli_fid, "load_images")),
        "study --out": (["study", "dino", "--quick", "--out", str(bad)], (difflab.studies, "run_study")),
    }


COMMANDS = ["train --out", "sample --out", "sample --grid", "eval --plot", "fid ref --out", "study --out"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_destination_under_a_file_is_refused_before_work(command, tmp_path, a_file, capsys, monkeypatch):
    run_dir = make_run(tmp_path / "r", capsys)
    argv, (module, name) = _commands(run_dir, a_file / "sub")[command]
    forbid(monkeypatch, module, name)
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "cannot write" in line and f"{a_file} is a file, not a folder" in line, line
    assert "choose another" in line
    assert a_file.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", COMMANDS)
def test_a_folder_nobody_can_write_is_refused_even_as_root(command, tmp_path, capsys, monkeypatch):
    """/proc refuses new files to root too (where os.access says yes): the check tries to create one."""
    run_dir = make_run(tmp_path / "r", capsys)
    argv, (module, name) = _commands(run_dir, Path("/proc/difflab-no-such-folder"))[command]
    forbid(monkeypatch, module, name)
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "/proc is not writable" in line and "choose a writable location" in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = run(["train", *TINY, "--out", str(ro / "r")], capsys)
        assert code == 2 and "is not writable" in one_error_line(err)
    finally:
        ro.chmod(0o700)


def test_check_writable_probes_rather_than_trusting_os_access(tmp_path, a_file, monkeypatch):
    assert check_writable(tmp_path / "new" / "deeper" / "out.npz", "--out") == tmp_path / "new" / "deeper" / "out.npz"
    assert check_writable(tmp_path / "run", "--out", folder=True) == tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # the probe leaves nothing behind
    with pytest.raises(DifflabError, match="it is a folder"):
        check_writable(tmp_path, "--out")
    with pytest.raises(DifflabError, match="it is a file, not a folder"):
        check_writable(a_file, "--out", folder=True)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as root: access says yes everywhere
    if Path("/proc/self").is_dir():
        with pytest.raises(DifflabError, match="not writable"):
            check_writable("/proc/x/out.npz", "--out")


def test_a_study_object_checks_its_folder(a_file):
    from difflab.studies.cache import Study
    from difflab.studies.common import StudyOptions

    with pytest.raises(DifflabError, match="is a file, not a folder"):
        Study("dino", StudyOptions(out=a_file / "study"))


# --------------------------------------------------------------------------------------------- 2. memory


def test_dry_run_refuses_a_model_too_large_for_memory(tmp_path, capsys):
    code, _, err = run(["train", "--set", "model.width=65536", "--dry-run", "--out", str(tmp_path / "r")], capsys)
    line = one_error_line(err)
    m = re.search(r"about ([\d,.]+) GiB of memory \(([\d,]+) parameters", line)
    assert code == 2 and m and int(m.group(2).replace(",", "")) > 4e10, line  # 65536^2 x 10 weights
    assert "available host memory" in line and "lower model.width (65536)" in line and "train.grad_accum" in line
    assert not (tmp_path / "r").exists()


def test_dry_run_reports_the_estimate_of_a_model_that_fits(tmp_path, capsys):
    code, out, _ = run(["train", *TINY, "--dry-run", "--json", "--out", str(tmp_path / "r")], capsys)
    res = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and res["valid"] and 0 < res["memory_estimate_bytes"] < 2**30 and res["parameters"] > 0


def test_the_trainer_checks_memory_before_building_the_model(tmp_path, monkeypatch):
    import difflab.training.trainer as trainer_mod

    monkeypatch.setattr(memory, "host_available", lambda: 2**20)  # 1 MiB left
    forbid(monkeypatch, trainer_mod, "build_denoiser")
    cfg = load_config(overrides=["train.steps=4", "train.batch_size=16", "model.width=128", 'train.device="cpu"'])
    with pytest.raises(DifflabError, match=r"needs about .* but 1 MiB is available host memory: lower model.width"):
        Trainer(cfg, tmp_path / "r")
    with pytest.raises(DifflabError, match="needs about"):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_the_estimate_counts_parameters_without_allocating():
    for overrides, shape in ((["model.width=32", "model.depth=2"], (2,)),
                             (['model.arch="unet"', 'model.preset="tiny"'], (1, 8, 8))):
        cfg = load_config(overrides=overrides)
        from difflab.models import build_network

        real = sum(p.numel() for p in build_network(cfg, shape).parameters())
        n_params, per_row = memory.network_size(cfg, shape)
        assert n_params == real and per_row > 0
    big = load_config(overrides=["model.width=65536"])
    est = memory.training_estimate(big, (2,), torch.device("cpu"))  # 1.4 TB if it were allocated
    assert est["parameters"] > 4e10 and est["total"] > est["parameters"] * 20


def test_a_gpu_run_is_measured_against_free_gpu_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    cfg = load_config(overrides=["model.width=8192", "model.depth=4"])  # ~0.9e9 parameters: ~17 GiB of state
    with pytest.raises(DifflabError, match=r"but 1 GiB is free on cuda:0"):
        memory.check_training_memory(cfg, (2,), torch.device("cuda:0"))
    small = load_config(overrides=["model.width=16"])
    assert memory.check_training_memory(small, (2,), torch.device("cuda:0"))["available"] == 2**30


# --------------------------------------------------------------------------------------------- 3. state fields


def _edit_state(ckpt: Path, **fields) -> None:
    state = json.loads((ckpt / STATE).read_text())
    state.update(fields)
    (ckpt / STATE).write_text(json.dumps(state))


@pytest.mark.parametrize(("field", "value"), [
    ("step", "abc"), ("step", -1), ("step", 2.5), ("step", True), ("shape", [0]), ("shape", "2"), ("shape", []),
    ("config", []), ("optimizer", 3), ("optimizer", {"scalars": {}}), ("skipped_steps", "x"),
    ("config", {"train": {"steps": "abc"}}),
])
def test_wrong_typed_state_fields_are_refused_on_load(field, value, tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", capsys)
    ckpt = list_checkpoints(run_dir)[-1]
    _edit_state(ckpt, **{field: value})
    with pytest.raises(DifflabError, match=rf"checkpoint {re.escape(str(ckpt))} is corrupt: state.json field "
                                           rf"'{field}'") as e:
        load_checkpoint(ckpt)
    assert "\n" not in str(e.value)


def test_sample_and_resume_refuse_a_wrong_typed_step(tmp_path, capsys):
    code, _, _ = run(["train", "--steps", "4", "--batch-size", "16", "--set", "model.width=16", "--quiet", "--out",
                      str(tmp_path / "r")], capsys)
    assert code == 0 and len(list_checkpoints(tmp_path / "r")) == 1  # one checkpoint: nothing to fall back on
    _edit_state(list_checkpoints(tmp_path / "r")[0], step="abc")
    for argv in (["sample", str(tmp_path / "r"), *SAMPLE], ["train", "--out", str(tmp_path / "r"), "--resume"]):
        code, out, err = run(argv, capsys)
        line = one_error_line(err)
        assert code == 2 and "state.json field 'step' must be a non-negative integer" in line, line
        assert "no intact checkpoint is left" in line and "--overwrite" in line and "abc" not in out


# --------------------------------------------------------------------------------------------- 4. fallback


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_sample_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", capsys)
    old, new = list_checkpoints(run_dir)
    _truncate(new / WEIGHTS)
    code, out, err = run(["sample", str(run_dir), *SAMPLE, "--json"], capsys)
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["checkpoint_step"] == 2
    lines = err.strip().splitlines()
    assert lines == [f"warning: checkpoint {new} is corrupt ({WEIGHTS} cannot be read (SafetensorError)); "
                     f"using {old} (delete the corrupt one to silence this)"], err
    with pytest.raises(DifflabError, match="is corrupt"):  # a checkpoint folder given explicitly must be intact
        load_checkpoint(new)


def test_resume_falls_back_and_continues_exactly(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", capsys)
    reference = make_run(tmp_path / "ref", capsys)
    old, new = list_checkpoints(run_dir)
    (new / STATE).write_text("{garbage")
    code, _, err = run(["train", "--out", str(run_dir), "--resume", "--quiet", "--json"], capsys)
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith(f"warning: checkpoint {new} is corrupt (")
    assert f"using {old}" in lines[0]
    a, b = load_checkpoint(run_dir)[0], load_checkpoint(reference)[0]  # step 4 rewritten, intact again
    assert load_checkpoint(new)[1]["step"] == 4
    for k in a:  # resumed from step 2: the same weights as the uninterrupted run
        assert torch.equal(a[k], b[k]), k


def test_library_loading_falls_back_and_names_the_fix_when_nothing_is_left(tmp_path, capsys):
    run_dir = make_run(tmp_path / "r", capsys)
    old, new = list_checkpoints(run_dir)
    (new / WEIGHTS).unlink()
    assert load_checkpoint(run_dir)[1]["step"] == 2
    assert Run.load(run_dir).step == 2
    assert "is incomplete" in capsys.readouterr().err
    (old / STATE).write_text("[]")
    with pytest.raises(DifflabError, match=rf"no intact checkpoint is left in {re.escape(str(run_dir))} \(2 "
                                           r"checked\): restore the files, or train the run again with 'difflab"):
        Run.load(run_dir)
    code, _, err = run(["sample", str(run_dir), *SAMPLE], capsys)
    assert code == 2 and "no intact checkpoint is left" in one_error_line(err)


def test_pruning_after_a_fallback_keeps_the_intact_checkpoints(tmp_path, capsys):
    """Resuming from step 2 past a corrupt step 8 with keep_checkpoints=1: the corrupt one must not push the
    fresh intact checkpoints out."""
    args = ["--steps", "8", "--batch-size", "16", "--set", "model.width=16", "--set", "train.ckpt_every=2",
            "--set", "train.keep_checkpoints=1", "--quiet"]
    assert run(["train", *args, "--until", "8", "--out", str(tmp_path / "r")], capsys)[0] == 0
    (ckpt8,) = list_checkpoints(tmp_path / "r")
    assert ckpt8.name == "step-00000008"
    ckpt2 = ckpt8.with_name("step-00000002")
    assert run(["train", *args, "--until", "2", "--out", str(tmp_path / "s")], capsys)[0] == 0
    (tmp_path / "s" / "checkpoints" / "step-00000002").rename(ckpt2)  # an intact older one beside ...
    _truncate(ckpt8 / WEIGHTS)  # ... a corrupt newest
    code, _, err = run(["train", "--out", str(tmp_path / "r"), "--resume", "--until", "4", "--quiet"], capsys)
    assert code == 0 and "using" in err
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-00000004", "step-00000008"]
    assert load_checkpoint(tmp_path / "r")[1]["step"] == 4


# --------------------------------------------------------------------------------------------- 5. eval input


def test_eval_refuses_an_npz_without_samples(tmp_path, capsys):
    np.savez(tmp_path / "other.npz", data=np.zeros((10, 2)))
    np.savez(tmp_path / "two.npz", a=np.zeros((10, 2)), b=np.ones((10, 2)))
    for name, arrays in (("other.npz", "'data'"), ("two.npz", "'a', 'b'")):
        code, out, err = run(["eval", str(tmp_path / name), "--data", "dino"], capsys)
        line = one_error_line(err)
        assert code == 2 and f"has no 'samples' array (it holds {arrays})" in line, line
        assert "numpy.savez(path, samples=array)" in line and "mmd" not in out
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ok.npz", samples=rng.normal(size=(50, 2)), stats=np.array("{}"))
    np.save(tmp_path / "ok.npy", rng.normal(size=(50, 2)))
    for name in ("ok.npz", "ok.npy"):
        code, out, err = run(["eval", str(tmp_path / name), "--data", "dino", "--n-ref", "200", "--json"], capsys)
        assert code == 0 and json.loads(out.strip().splitlines()[-1])["n_samples"] == 50, err


def test_data_files_keep_their_npz_rules(tmp_path):
    from difflab.data.files import load_array

    np.savez(tmp_path / "only.npz", whatever=np.arange(3.0))
    assert load_array(tmp_path / "only.npz").shape == (3, 1)  # data files: still the only array
    with pytest.raises(DifflabError, match="has no 'samples' array"):
        load_array(tmp_path / "only.npz", key="samples")


# --------------------------------------------------------------------------------------------- 6. --out folders


def test_train_refuses_a_folder_of_other_files(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "data.csv").write_text("1,2\n")
    for extra, again in (([], ""), (["--overwrite"], " (--overwrite replaces runs only)")):
        code, _, err = run(["train", *TINY, *extra, "--out", str(folder)], capsys)
        line = one_error_line(err)
        assert code == 2 and f"{folder} is not empty (data.csv, notes.txt) and holds no run{again}" in line, line
        assert "choose a new or empty folder" in line
    code, _, err = run(["train", *TINY, "--dry-run", "--out", str(folder)], capsys)
    assert code == 2 and "holds no run" in err
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_train_accepts_an_empty_folder_and_a_run_with_its_outputs(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run(["train", *TINY, "--out", str(tmp_path / "empty")], capsys)[0] == 0
    run_dir = make_run(tmp_path / "r", capsys)
    assert run(["sample", str(run_dir), *SAMPLE], capsys)[0] == 0  # RUN/samples.npz
    (run_dir / "samples").mkdir()  # previews
    (run_dir / "notes.txt").write_text("mine")
    code, _, err = run(["train", *TINY, "--overwrite", "--out", str(run_dir)], capsys)
    assert code == 0, err
    assert (run_dir / "notes.txt").read_text() == "mine" and (run_dir / "samples.npz").exists()
    for name in ("config.json", "log.jsonl"):  # only the run's own files were replaced; now remove them
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "notes.txt").unlink()
    code, _, err = run(["train", *TINY, "--out", str(run_dir)], capsys)  # samples.npz, samples/: a run's outputs
    assert code == 0, err


# --------------------------------------------------------------------------------------------- weights mode


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_weights_get_the_mode_of_the_other_run_files(umask, tmp_path, capsys):
    old = os.umask(umask)
    try:
        make_run(tmp_path / "r", capsys)
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for ckpt in list_checkpoints(tmp_path / "r"):
        modes = {name: stat.S_IMODE((ckpt / name).stat().st_mode) for name in (WEIGHTS, STATE)}
        assert modes == {WEIGHTS: expected, STATE: expected}, (oct(umask), modes)
    assert stat.S_IMODE((tmp_path / "r" / "config.json").stat().st_mode) == expected


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
