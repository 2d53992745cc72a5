"""difflab.executors: units run in this process, in a spawned process pool, and as a submitit job array (its local
and debug executors; SLURM's parameters without a cluster), with retries of failed and killed units."""

import importlib.util
import os
import pdb
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

from difflab.errors import DifflabError, Interrupted
from difflab.executors import KINDS, ExecutorOptions, Requeueable, UnitsFailed, run_units, slurm_parameters

TESTS = Path(__file__).resolve().parent
needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (pip install -e '.[cluster]')")
ENGINES = [("local", 1), ("local", 2), pytest.param("submitit-debug", 1, marks=needs_submitit)]  # (kind, jobs)


def toy(unit: dict) -> int:
    """Write ``x.txt`` (this process's id) into ``unit["dir"]`` and return ``2 * x``; ``unit["mode"]``: "ok",
    "fail-once" / "die-once" / "hang-once" (a ValueError / SIGKILL / a minute's sleep the first time, tracked with a
    marker file), "always" (a RuntimeError every time), "die-always" (SIGKILL every time)."""
    folder, x, mode = Path(unit["dir"]), unit["x"], unit.get("mode", "ok")
    marker = folder / f"tried-{x}"
    first = not marker.exists()
    marker.touch()
    if mode == "always":
        raise RuntimeError(f"unit {x} is broken")
    if mode == "interrupted":
        raise Interrupted(f"unit {x} stopped by SIGTERM")
    if mode == "die-always" or (mode == "die-once" and first):
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang-once" and first:
        time.sleep(60)
    if mode == "fail-once" and first:
        raise ValueError(f"first try of {x}")
    (folder / f"{x}.txt").write_text(str(os.getpid()))
    return 2 * x


def units(tmp_path: Path, n: int = 4, **modes: str) -> tuple[list[dict], list[str]]:
    """``n`` toy units writing into tmp_path, unit ``x`` in mode ``modes.get(f"u{x}", "ok")``, and their labels."""
    us = [{"dir": str(tmp_path), "x": x, "mode": modes.get(f"u{x}", "ok")} for x in range(n)]
    return us, [f"u{x}" for x in range(n)]


def pids(tmp_path: Path, n: int = 4) -> set[int]:
    return {int((tmp_path / f"{x}.txt").read_text()) for x in range(n)}


@pytest.fixture
def importable(monkeypatch):
    """submitit's subprocesses import this module (cloudpickle pickles its functions by reference)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))


def test_local_one_job_runs_in_this_process(tmp_path):
    messages = []
    us, labels = units(tmp_path)
    assert run_units(toy, us, labels, ExecutorOptions(), log=messages.append) == [0, 2, 4, 6]
    assert pids(tmp_path) == {os.getpid()}
    assert messages[-1] == "unit 4/4 done: u3"


def test_progress_goes_to_stdout_by_default(tmp_path, capsys):
    us, labels = units(tmp_path, 2)
    run_units(toy, us, labels, ExecutorOptions())
    assert capsys.readouterr().out.splitlines() == ["running 2 units one after another in this process",
                                                    "unit 1/2 done: u0", "unit 2/2 done: u1"]


def test_local_pool_returns_results_in_order(tmp_path):
    us, labels = units(tmp_path, 5)
    assert run_units(toy, us, labels, ExecutorOptions(jobs=2), log=lambda m: None) == [0, 2, 4, 6, 8]
    assert os.getpid() not in pids(tmp_path, 5)


@needs_submitit
def test_submitit_debug_runs_in_this_process(tmp_path):
    messages = []
    us, labels = units(tmp_path, 3)
    opts = ExecutorOptions(kind="submitit-debug", folder=tmp_path / "jobs")
    assert run_units(toy, us, labels, opts, log=messages.append) == [0, 2, 4]
    assert pids(tmp_path, 3) == {os.getpid()}
    assert "submitted 3 unit(s) to submitit-debug" in messages[0] and str(tmp_path / "jobs") in messages[0]


@needs_submitit
def test_submitit_local_returns_results_in_order(tmp_path, importable):
    messages = []
    us, labels = units(tmp_path, 3)
    opts = ExecutorOptions(kind="submitit-local", folder=tmp_path / "out" / "jobs", time_min=2)
    assert run_units(toy, us, labels, opts, log=messages.append) == [0, 2, 4]
    assert os.getpid() not in pids(tmp_path, 3) and (tmp_path / "out" / "jobs").is_dir()
    assert messages[0].startswith("submitted 3 unit(s) to submitit-local: job ")


@pytest.mark.parametrize("kind,jobs", ENGINES)
def test_a_unit_failing_once_is_resubmitted(tmp_path, kind, jobs):
    messages = []
    us, labels = units(tmp_path, u1="fail-once")
    opts = ExecutorOptions(kind=kind, jobs=jobs, folder=tmp_path / "jobs")
    assert run_units(toy, us, labels, opts, log=messages.append) == [0, 2, 4, 6]
    assert "unit u1 failed (ValueError: first try of 1): resubmitting it, try 2 of 2" in messages


@pytest.mark.parametrize("kind,jobs", ENGINES)
def test_an_always_failing_unit_ends_in_one_error(tmp_path, monkeypatch, kind, jobs):
    monkeypatch.setattr(pdb, "post_mortem", lambda *a: pytest.fail("submitit's DebugJob opened pdb"))
    us, labels = units(tmp_path, u2="always")
    opts = ExecutorOptions(kind=kind, jobs=jobs, folder=tmp_path / "jobs", retries=2)
    with pytest.raises(UnitsFailed) as e:
        run_units(toy, us, labels, opts, log=lambda m: None)
    assert str(e.value) == "1 of 4 units failed (3 tries each): u2: RuntimeError: unit 2 is broken"
    assert isinstance(e.value, DifflabError) and e.value.failed == ["u2"] and e.value.results == [0, 2, None, 6]
    assert [(tmp_path / f"{x}.txt").exists() for x in range(4)] == [True, True, False, True]


def test_no_retries_runs_a_unit_once(tmp_path):
    us, labels = units(tmp_path, 2, u0="fail-once")
    with pytest.raises(UnitsFailed, match=r"^1 of 2 units failed \(1 try\): u0: ValueError: first try of 0$"):
        run_units(toy, us, labels, ExecutorOptions(retries=0), log=lambda m: None)


def test_a_killed_worker_breaks_the_pool_and_its_units_run_again(tmp_path):
    messages = []
    us, labels = units(tmp_path, 5, u1="die-once")
    assert run_units(toy, us, labels, ExecutorOptions(jobs=2), log=messages.append) == [0, 2, 4, 6, 8]
    # u1 died alone (its try counts) or beside another unit (both run again, one at a time, uncounted)
    assert any(m.startswith(("unit u1 failed (its process died or was killed): resubmitting",
                             "a worker process died (killed?) while 2 units ran")) for m in messages), messages


def test_a_unit_killed_every_time_fails_alone(tmp_path):
    """The pool cannot tell which of its workers died: the units a break interrupted run again one at a time, so
    only the unit that dies every time is charged its tries."""
    us, labels = units(tmp_path, 5, u1="die-always")
    with pytest.raises(UnitsFailed) as e:
        run_units(toy, us, labels, ExecutorOptions(jobs=2), log=lambda m: None)
    assert str(e.value) == "1 of 5 units failed (2 tries each): u1: its process died or was killed"
    assert e.value.results == [0, None, 4, 6, 8]


@needs_submitit
@pytest.mark.slow
def test_submitit_local_resubmits_failed_and_killed_units(tmp_path, importable):
    messages = []
    us, labels = units(tmp_path, 4, u1="fail-once", u2="die-once", u3="always")
    opts = ExecutorOptions(kind="submitit-local", folder=tmp_path / "jobs", time_min=2)
    with pytest.raises(UnitsFailed) as e:
        run_units(toy, us, labels, opts, log=messages.append)
    assert e.value.results == [0, 2, 4, None] and e.value.failed == ["u3"]
    message = str(e.value)
    assert message.startswith("1 of 4 units failed (2 tries each): u3: RuntimeError: unit 3 is broken (logs ")
    assert "\n" not in message and str(tmp_path / "jobs") in message and message.endswith("_0_log.err)")
    assert any(m.startswith("unit u1 failed (ValueError: first try of 1): resubmitting") for m in messages)
    assert any(m.startswith("unit u2 failed (no result: its process died or was killed") for m in messages)


@needs_submitit
def test_checkpoint_resubmits_the_same_call(tmp_path):
    import cloudpickle
    from submitit.helpers import DelayedSubmission

    task = Requeueable(toy)
    unit = {"dir": str(tmp_path), "x": 3}
    again = task.checkpoint(unit)
    assert isinstance(again, DelayedSubmission) and again.function is task and again.args == (unit,)
    assert again.result() == 6 == cloudpickle.loads(cloudpickle.dumps(task))(unit)


@needs_submitit
@pytest.mark.slow
def test_submitit_local_requeues_a_timed_out_task_through_checkpoint(tmp_path, importable):
    """A task hanging past its time limit is signalled (as SLURM does), then requeued and run again when wrapped in
    Requeueable; the bare function is not."""
    import submitit

    executor = submitit.LocalExecutor(tmp_path / "jobs")
    executor.update_parameters(timeout_min=2 / 60, signal_delay_s=1)  # the time-out signal after a second
    wrapped, bare = (executor.submit(f, {"dir": str(tmp_path), "x": x, "mode": "hang-once"})
                     for f, x in ((Requeueable(toy), 1), (toy, 2)))
    assert wrapped.result() == 2
    assert "timed-out and not checkpointable" in str(bare.exception())
    assert "Calling checkpoint method" in wrapped.stdout()


@pytest.mark.parametrize("kind, jobs", [("local", 1), ("local", 2),
                                        pytest.param("submitit-debug", 1, marks=needs_submitit)])
def test_an_interrupted_unit_ends_the_run_and_is_not_retried(tmp_path, kind, jobs):
    """A unit stopped on purpose (SIGTERM at a checkpoint: difflab's Interrupted) ends the run at once, untried again,
    and no later unit starts after it. (Units 0 and 1 both stop: with two processes either may be seen first, and
    no unit ends well before one is, so whether a third starts never hangs on which process started first.)"""
    us, labels = units(tmp_path, 4, u0="interrupted", u1="interrupted")
    opts = ExecutorOptions(kind=kind, jobs=jobs, retries=3, folder=tmp_path / "jobs")
    with pytest.raises(Interrupted, match="unit [01] stopped"):
        run_units(toy, us, labels, opts, log=lambda m: None)
    assert not any((tmp_path / f"{x}.txt").exists() for x in range(4))


@needs_submitit
@pytest.mark.slow
def test_an_interrupted_parent_cancels_its_unfinished_tasks(tmp_path, importable):
    """Ctrl-C in the parent cancels the array's unfinished tasks (so a re-run never trains a unit twice at once);
    the finished units keep their results."""
    us, labels = units(tmp_path, 2, u1="hang-once")

    def log(message):
        if message.startswith("unit 1/2 done"):  # once unit 1 hangs, Ctrl-C
            deadline = time.monotonic() + 20
            while not (tmp_path / "tried-1").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt

    opts = ExecutorOptions(kind="submitit-local", folder=tmp_path / "jobs", time_min=2)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_units(toy, us, labels, opts, log=log)
    assert (tmp_path / "0.txt").is_file() and (tmp_path / "tried-1").exists()
    deadline = time.monotonic() + 10  # the task's process (python -m submitit.core._submit FOLDER) is gone
    while _running(tmp_path / "jobs") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(tmp_path / "jobs") and not (tmp_path / "1.txt").exists()
    assert time.monotonic() - t0 < 30


def _running(folder: Path) -> bool:
    import subprocess

    return subprocess.run(["pgrep", "-f", str(folder)], capture_output=True).returncode == 0


@pytest.mark.parametrize("change,words", [
    ({"kind": "slrum"}, "executor 'slrum' is not one of local, slurm, submitit-local, submitit-debug "
                        "(did you mean 'slurm'?)"),
    ({"jobs": 0}, "jobs=0: give a whole number of at least 1 (1 runs the units one after another in this process)"),
    ({"retries": -1}, "retries=-1: give a whole number of at least 0"),
    ({"time_min": 0}, "time_min=0: give a whole number of at least 1"),
    ({"gpus_per_task": -1}, "gpus_per_task=-1"),
    ({"array_parallelism": 0}, "array_parallelism=0"),
    ({"cpus_per_task": 0}, "cpus_per_task=0: give at least 1"),
    ({"mem_gb": 0}, "mem_gb=0: give a positive number of GB"),
    ({"sbatch": ["--exclusive"]}, "sbatch=['--exclusive']: give a dict"),
    ({"kind": "slurm"}, "--executor slurm needs a folder for submitit's logs and pickles (e.g. OUT/jobs)"),
])
def test_bad_options_are_named_in_one_line(change, words):
    with pytest.raises(DifflabError) as e:
        ExecutorOptions(**change).validate()
    assert words in str(e.value) and "\n" not in str(e.value)


@needs_submitit
def test_labels_must_match_units_and_no_units_is_no_work(tmp_path):
    with pytest.raises(DifflabError, match="2 units but 1 labels"):
        run_units(toy, units(tmp_path, 2)[0], ["a"], ExecutorOptions())
    assert run_units(toy, [], [], ExecutorOptions(kind="submitit-debug", folder=tmp_path)) == []


@pytest.mark.parametrize("kind", KINDS[1:])
def test_missing_submitit_names_the_extra_before_any_unit_runs(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "submitit", None)
    us, labels = units(tmp_path, 2)
    with pytest.raises(DifflabError) as e:
        run_units(toy, us, labels, ExecutorOptions(kind=kind, folder=tmp_path / "jobs"))
    assert str(e.value).startswith(f"--executor {kind} needs the cluster extra: pip install 'difflab[cluster]' (")
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())


@needs_submitit
def test_slurm_without_srun_says_so_before_any_unit_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # submitit looks for srun with shutil.which
    us, labels = units(tmp_path, 2)
    with pytest.raises(DifflabError, match=r"^--executor slurm: Could not detect \"srun\".*--executor submitit-local"):
        run_units(toy, us, labels, ExecutorOptions(kind="slurm", folder=tmp_path / "jobs"))
    assert not list(tmp_path.glob("*.txt"))


@needs_submitit
def test_slurm_parameters_make_the_expected_sbatch_file(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    opts = ExecutorOptions(kind="slurm", folder=tmp_path, partition="gpu", gpus_per_task=2, cpus_per_task=8,
                           array_parallelism=4, time_min=30, mem_gb=16, account="proj", qos="high",
                           constraint="a100", sbatch={"mail-type": "END"})
    params = slurm_parameters(opts)
    assert params == {"job_name": "difflab", "nodes": 1, "ntasks_per_node": 1, "time": 30, "array_parallelism": 4,
                      "gpus_per_task": 2, "cpus_per_task": 8, "partition": "gpu", "mem": "16GB",
                      "account": "proj", "qos": "high", "constraint": "a100",
                      "additional_parameters": {"mail-type": "END"}}
    assert slurm_parameters(ExecutorOptions(mem_gb=1.5))["mem"] == "1536MB"
    assert set(slurm_parameters(ExecutorOptions())) == {"job_name", "nodes", "ntasks_per_node", "time",
                                                        "array_parallelism"}
    # SlurmExecutor refuses to start where srun is missing; update_parameters itself needs no cluster
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    executor = submitit.SlurmExecutor(tmp_path)
    executor.update_parameters(**params)
    text = _make_sbatch_string(command="true", folder=tmp_path, map_count=10, **executor.parameters)
    for line in ["--array=0-9%4", "--partition=gpu", "--gpus-per-task=2", "--cpus-per-task=8", "--ntasks-per-node=1",
                 "--nodes=1", "--time=30", "--mem=16GB", "--account=proj", "--qos=high", "--constraint=a100",
                 "--mail-type=END", "--job-name=difflab"]:
        assert f"#SBATCH {line}\n" in text, line
