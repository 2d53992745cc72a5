"""difflab compare: objectives x seeds as units on an executor, and a ranked report that is the same whichever
executor ran them (tiny units on the Dino; the digits once, for the image path)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from difflab.errors import DifflabError
from difflab.executors import ExecutorOptions
from difflab.runs import load_samples
from difflab.studies.compare import CompareOptions, compare, parse_grid, plan
from difflab.studies.compare_report import build_report, numbers
from difflab.studies.judges import load_judge
from difflab.studies.paired import paired_test, verdict

TINY = {"n_samples": 150, "n_ref": 400, "floor_draws": 2, "snapshots": 2, "curve_steps": 5, "nfe_counts": [4],
        "samplers": ["ddim"]}
SETS = ["train.batch_size=64"]
OBJECTIVES = ["dsm", "edm", "fm"]


def options(out, objectives=OBJECTIVES, seeds=2, steps=60, **executor) -> CompareOptions:
    return CompareOptions(data="dino", out=Path(out), objectives=list(objectives), seeds=seeds, budget_steps=steps,
                          overrides=list(SETS), settings=dict(TINY), progress=False,
                          executor=ExecutorOptions(**executor))


def unit_numbers(out: Path, key: str) -> dict:
    u = json.loads((out / "units" / f"{key}.json").read_text())
    for row in u["samplers"].values():
        row.pop("wall_time_s")
    return u


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """3 objectives x 2 seeds, one unit after another in this process (the reference of every executor)."""
    out = tmp_path_factory.mktemp("compare") / "jobs1"
    compare(options(out, jobs=1))
    return out


@pytest.mark.slow
def test_ranked_report_from_its_units(one_process):
    r = json.loads((one_process / "results.json").read_text())
    report = (one_process / "report.md").read_text()
    judge = load_judge(one_process, r["settings"])
    for obj in OBJECTIVES:  # the score of every unit is the judge's score of its saved samples
        for seed in range(2):
            x, _ = load_samples(one_process / "samples" / f"{obj}-s{seed}-ddim.npz")
            assert len(x) == TINY["n_samples"]
            unit = json.loads((one_process / "units" / f"{obj}-s{seed}.json").read_text())
            assert unit["samplers"]["ddim"]["value"] == judge(x)
            assert unit["steps"] == 60 and unit["threads"] == 1
            assert unit["curve"]["step"] == [30, 60]
    ranked = r["ranking"]["ddim"]
    means = [x["value"]["mean"] for x in ranked]
    assert means == sorted(means) and {x["variant"] for x in ranked} == set(OBJECTIVES)
    best = ranked[0]
    assert best["vs_best"] is None
    for x in ranked[1:]:
        t = x["vs_best"]
        assert t["diff"] == pytest.approx(x["value"]["mean"] - best["value"]["mean"], rel=1e-12)
        assert t["n"] == 2 and 0 <= t["p"] <= 1
    lines = [line for line in report.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")
             or line.startswith("| 3 |")]
    assert [line.split(" | ")[1] for line in lines] == [x["label"] for x in ranked]
    assert "paired t-test" in report and "real vs real (floor)" in report
    for fig in r["figures"].values():
        assert (one_process / fig).stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.dist
def test_local_processes_give_the_one_process_numbers(one_process, tmp_path):
    out = tmp_path / "jobs2"
    compare(options(out, jobs=2))
    a = json.loads((one_process / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert numbers(b) == numbers(a)
    assert (out / "report.md").read_text().split("## Every row")[0] == \
        (one_process / "report.md").read_text().split("## Every row")[0]  # the rankings, word for word


@pytest.mark.slow
@pytest.mark.dist
def test_submitit_job_array_gives_the_same_units(one_process, tmp_path):
    """submitit's local executor (real processes, one per array task) and its debug executor (in this process)."""
    pytest.importorskip("submitit")
    for kind, objectives in (("submitit-local", ["dsm", "fm"]), ("submitit-debug", ["edm"])):
        out = tmp_path / kind
        compare(options(out, objectives=objectives, seeds=1, kind=kind))
        assert sorted(p.name for p in (out / "units").iterdir()) == sorted(f"{o}-s0.json" for o in objectives)
        for o in objectives:
            assert unit_numbers(out, f"{o}-s0") == unit_numbers(one_process, f"{o}-s0"), (kind, o)
        assert (out / "jobs").is_dir() and (out / "report.md").is_file()


@pytest.mark.slow
def test_rerun_skips_finished_units_and_report_rebuilds(one_process, capsys):
    from difflab.cli import main

    before = {p.name: p.stat().st_mtime_ns for p in (one_process / "units").iterdir()}
    r = json.loads((one_process / "results.json").read_text())
    opts = options(one_process, jobs=1)
    opts.progress = True
    compare(opts)
    assert "6 finished, 0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (one_process / "units").iterdir()} == before
    (one_process / "report.md").unlink()
    assert main(["compare", "--out", str(one_process), "--report", "--quiet"]) == 0
    assert numbers(json.loads((one_process / "results.json").read_text())) == numbers(r)
    assert (one_process / "report.md").is_file()


def test_a_missing_unit_is_named_by_report(one_process, tmp_path):
    import shutil

    out = tmp_path / "partial"
    shutil.copytree(one_process, out)
    (out / "units" / "edm-s1.json").unlink()
    with pytest.raises(DifflabError, match=r"1 of 6 units .* not finished \(edm-s1\): run the same difflab compare"):
        build_report(out)


@pytest.mark.slow
def test_a_killed_unit_is_finished_by_the_same_command(tmp_path):
    """Kill the command mid-training (SIGKILL, no chance to clean up), run it again: the unit resumes from its
    checkpoint and ends with the numbers of a run never interrupted."""
    steps = 800
    every = steps // TINY["snapshots"]
    script = (f"import sys; from pathlib import Path; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from test_compare import options; from difflab.studies.compare import compare; "
              f"compare(options(Path(sys.argv[1]), objectives=['dsm'], seeds=1, steps={steps}))")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], start_new_session=True)
    first = out / "runs" / "dsm-s0" / "checkpoints" / f"step-{every:08d}"
    deadline = time.monotonic() + 120
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.is_dir(), "the command ended or stalled before its first checkpoint"
    assert not (out / "units" / "dsm-s0.json").exists(), "the unit finished before the kill: raise the steps"
    kept = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    compare(options(out, objectives=["dsm"], seeds=1, steps=steps))
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == kept  # resumed, not restarted
    ref = tmp_path / "never-killed"
    compare(options(ref, objectives=["dsm"], seeds=1, steps=steps))
    assert unit_numbers(out, "dsm-s0") == unit_numbers(ref, "dsm-s0")


@pytest.mark.slow
def test_images_are_scored_by_a_classifier_frechet_distance(tmp_path):
    out = tmp_path / "digits"
    opts = CompareOptions(data="digits", out=out, objectives=["dsm"], seeds=1, budget_steps=4, progress=False,
                          overrides=["train.batch_size=16"],
                          settings={"n_samples": 40, "n_ref": 200, "floor_draws": 2, "snapshots": 1,
                                    "curve_steps": 3, "nfe_counts": [3], "samplers": ["ddim"]})
    compare(opts)
    r = json.loads((out / "results.json").read_text())
    assert r["judge"]["label"] == "classifier FD" and r["judge"]["n_ref"] == 200
    assert r["settings"]["arch"] == "unet" and r["settings"]["images"]
    x, _ = load_samples(out / "samples" / "dsm-s0-ddim.npz")
    assert x.shape == (40, 1, 8, 8)
    floor, value = r["judge"]["floor"]["mean"], r["rows"][0]["value"]["mean"]
    assert 0 < floor < value  # real digits score far better than a 4-step model's samples
    assert "classifier FD" in (out / "report.md").read_text() and (out / "fig_samples.png").is_file()


@pytest.mark.dist
@pytest.mark.slow
def test_a_unit_trains_under_torchrun(tmp_path, monkeypatch):
    """--procs-per-unit 2: the unit's run trains with two gloo processes (a multi-GPU unit on a cluster)."""
    import difflab.studies.compare as cmp

    started = []
    real = subprocess.run
    monkeypatch.setattr(cmp.subprocess, "run", lambda cmd, **kw: (
        started.append(cmd) if "torch.distributed.run" in cmd else None) or real(cmd, **kw))
    out = tmp_path / "torchrun"
    opts = options(out, objectives=["dsm"], seeds=1, steps=20)
    opts.procs_per_unit = 2
    compare(opts)
    (cmd,) = started
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[cmd.index("--out") + 1] == str(out / "runs" / "dsm-s0")
    state = json.loads((out / "runs" / "dsm-s0" / "checkpoints" / "step-00000020" / "state.json").read_text())
    assert state["step"] == 20 and state["config"]["train"]["seed"] == 0
    unit = json.loads((out / "units" / "dsm-s0.json").read_text())
    assert unit["steps"] == 20 and np.isfinite(unit["samplers"]["ddim"]["value"])


# ------------------------------------------------------------------------------------------- bad input, fast


@pytest.mark.parametrize("change, match", [
    ({"objectives": ["dsm", "edn"]}, r"unknown objective 'edn'.*did you mean 'edm'"),
    ({"objectives": ["cdl-ft"]}, "fine-tunes another run"),
    ({"objectives": ["dsm", "dsm"]}, "names an objective twice"),
    ({"seeds": 0}, "--seeds must be >= 1"),
    ({"grid": ["train.lr"]}, r"must look like section.key=v1,v2"),
    ({"grid": ["train.lrr=1e-3,3e-4"]}, "lrr"),
    ({"overrides": ["train.lr=-1"]}, "train.lr"),
    ({"overrides": ["train.steps=10"]}, "compare sets train.steps itself; use --data, --budget-steps or --seeds"),
    ({"grid": ["train.seed=1,2"]}, "compare sets train.seed itself"),
    ({"samplers": ["ddim", "dim"]}, "unknown sampler 'dim'"),
    ({"features": "classifier"}, "flat data; use mmd"),
    ({"data": "no/such/file.npy"}, "no/such/file.npy"),
])
def test_bad_input_is_named_before_any_work(tmp_path, change, match):
    opts = options(tmp_path / "out")
    for k, v in change.items():
        setattr(opts, k, v)
    with pytest.raises(DifflabError, match=match):
        compare(opts)
    assert not (tmp_path / "out" / "plan.json").exists() and not (tmp_path / "out" / "cache" / "judge").exists()


def test_missing_submitit_names_the_extra_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(DifflabError, match=r"difflab\[cluster\]"):
        compare(options(tmp_path / "out", kind="slurm"))
    assert not (tmp_path / "out" / "cache" / "judge").exists()


def test_other_settings_in_the_same_folder_are_refused(one_process):
    opts = options(one_process, jobs=1)
    opts.overrides = ["train.batch_size=128"]
    with pytest.raises(DifflabError, match="other settings .*overrides"):
        compare(opts)


def test_report_without_a_comparison_says_how_to_start_one(tmp_path):
    from difflab.cli import main

    assert main(["compare", "--out", str(tmp_path), "--report"]) == 2


def test_grid_is_the_product_of_its_keys():
    assert parse_grid([]) == [{}]
    assert parse_grid(["train.lr=1e-3,3e-4", "train.batch_size=64,128"]) == [
        {"train.lr": "1e-3", "train.batch_size": "64"}, {"train.lr": "1e-3", "train.batch_size": "128"},
        {"train.lr": "3e-4", "train.batch_size": "64"}, {"train.lr": "3e-4", "train.batch_size": "128"}]
    p, _ = plan(CompareOptions(data="dino", out=Path("unused"), objectives=["dsm", "fm"], seeds=2,
                               grid=["train.lr=1e-3,3e-4"]))
    assert [v["name"] for v in p["variants"]] == ["dsm-train.lr=1e-3", "dsm-train.lr=3e-4", "fm-train.lr=1e-3",
                                                  "fm-train.lr=3e-4"]
    assert [u["key"] for u in p["units"]][:4] == ["dsm-train.lr=1e-3-s0", "dsm-train.lr=1e-3-s1",
                                                  "dsm-train.lr=3e-4-s0", "dsm-train.lr=3e-4-s1"]
    p2, _ = plan(CompareOptions(data="dino", out=Path("unused"), objectives=["dsm"], seeds=1,
                                grid=['train.lr=1e-4,1e-3,3e-4', 'train.lr_schedule="constant"']))
    assert p2["variants"][1]["name"] == 'dsm-train.lr=1e-3,train.lr_schedule=_constant_'  # the same
    # name for the same point whatever else the grid holds: a grown grid reuses the finished units
    unit = p["units"][2]
    assert unit["overrides"][-1] == "train.lr=3e-4" and "train.seed=0" in unit["overrides"]
    assert p["variants"][1]["label"] == "DSM (DDPM eps) [train.lr=3e-4]"


# ------------------------------------------------------------------------------------------- the paired test


def test_paired_test_against_the_t_distribution():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]  # d = 1, 2, 3: t = 2 / (1 / sqrt 3), 2 degrees of freedom
    t = 2.0 * np.sqrt(3.0)
    p = 1.0 - t / np.sqrt(2.0 + t * t)  # two-sided tail of Student's t with 2 degrees of freedom, in closed form
    got = paired_test(a, b)
    assert got["diff"] == 2.0 and got["n"] == 3 and got["p"] == pytest.approx(p, rel=1e-9)
    assert verdict(got) == f"within noise (p {p:.2g})"
    assert paired_test(b, a)["diff"] == -2.0 and paired_test(b, a)["p"] == pytest.approx(p, rel=1e-9)
    assert paired_test([1.0, 2.0], [1.5, 2.5]) == {"diff": 0.5, "p": 0.0, "n": 2}  # a constant shift
    assert verdict(paired_test([1.0, 2.0], [1.5, 2.5])) == "worse (p 0)"
    assert verdict(paired_test([1.5, 2.5], [1.0, 2.0])) == "better (p 0)"
    assert paired_test([1.0, 2.0], [1.0, 2.0])["p"] == 1.0
    assert verdict(paired_test([1.0], [2.0])) == "one seed: no test"
    rng = np.random.default_rng(0)
    x = rng.normal(size=8)
    y = x + 0.1 + 0.01 * rng.normal(size=8)
    assert paired_test(list(x), list(y))["p"] < 1e-6  # a consistent shift with 8 seeds is real


# ------------------------------------------------------------------------------------------- the SLURM recipe


def test_the_docs_slurm_recipe_is_one_array_task_per_unit(tmp_path):
    """docs/compare.md's CIFAR-10 recipe (never run on a cluster here): its flags parse, every unit's config
    validates (on the digits, a local image set, in place of CIFAR-10) and the array's sbatch parameters are the
    ones the page describes."""
    import re
    import shlex

    from difflab.cli import build_parser
    from difflab.cli_compare import options_from_args
    from difflab.executors import slurm_parameters

    page = (Path(__file__).parents[1] / "docs" / "compare.md").read_text()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", page, flags=re.S) if "--executor slurm" in b]
    argv = shlex.split(block.split("difflab compare", 1)[1].replace("\\\n", " "))
    opts = options_from_args(build_parser().parse_args(["compare", *argv]))
    assert opts.data.startswith("cifar10:") and opts.objectives == ["dsm", "edm", "stf", "sa2", "fm"]
    assert slurm_parameters(opts.executor) == {
        "job_name": "difflab", "nodes": 1, "ntasks_per_node": 1, "time": 1440, "array_parallelism": 15,
        "gpus_per_task": 1, "cpus_per_task": 8, "partition": "gpu", "mem": "32GB"}
    assert opts.procs_per_unit == 1 and opts.features == "inception" and opts.threads == 0
    opts.data, opts.out = "digits", tmp_path / "out"
    p, _ = plan(opts)
    assert len(p["units"]) == 15
    assert 'model.preset="tiny"' in p["units"][0]["overrides"] and "model.preset=cifar10" in p["units"][0]["overrides"]
    assert p["settings"]["steps"] == 200000 and p["settings"]["n_ref"] == 50000
