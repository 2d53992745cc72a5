"""The README tells the truth: its generated block is the rendering of the committed results, its Python runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from difflab import __version__
from difflab.studies import StudyOptions
from difflab.studies.dino import README_END, README_START, readme_block, settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
QUICK = json.loads((ROOT / "docs" / "quick_study.json").read_text())
THREADS = json.loads((ROOT / "docs" / "quick_study_threads.json").read_text())


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_quick_study_block_is_the_rendering_of_the_committed_results():
    start, end = README.index(README_START), README.index(README_END) + len(README_END)
    assert README[start:end] == readme_block(QUICK, THREADS)


def test_committed_results_are_a_quick_study_of_todays_settings():
    assert QUICK["study"] == "dino" and QUICK["options"]["quick"] is True
    assert QUICK["settings"] == json.loads(json.dumps(settings(StudyOptions(out=Path("x"), quick=True))))
    assert QUICK["versions"]["difflab"] == __version__
    from difflab.studies.dino import DEFAULT_SAMPLERS

    # the quick study's rows: every default sampler of each quick objective
    assert [(r["objective"], r["sampler"]) for r in QUICK["rows"]] == [(o, s) for o in ("dsm", "itd", "cdl")
                                                                       for s in DEFAULT_SAMPLERS]


def test_the_block_shows_no_machine_dependent_number():
    block = readme_block(QUICK, THREADS)
    table = block.split("| objective | sampler", 1)[1]
    assert "wall time" not in table and "multi-GPU" not in table
    for row in QUICK["rows"]:  # every MMD of the JSON is in the block as the report prints it
        assert f"{row['mmd']['mean']:.2e}" in block


def test_the_block_shows_the_spread_over_seeds_and_thread_counts():
    assert QUICK["options"]["seeds"] >= 3  # no row reads as a one-draw, digit-exact promise
    block = readme_block(QUICK, THREADS)
    for row in QUICK["rows"]:
        v = row["mmd"]["values"]
        assert len(v) == QUICK["options"]["seeds"] and f"{min(v):.2e} .. {max(v):.2e}" in block
    assert THREADS["settings"] == QUICK["settings"] and THREADS["options"]["threads"] != QUICK["options"]["threads"]
    mine = {(r["objective"], r["sampler"]): r["mmd"]["values"][0] for r in QUICK["rows"]}
    for row in THREADS["rows"]:
        a, b = mine[row["objective"], row["sampler"]], row["mmd"]["values"][0]
        assert f"| {a:.2e} | {b:.2e} | {b / a:.2f} |" in block


def test_the_quick_start_spread_table_is_the_committed_measurement():
    spread = json.loads((ROOT / "docs" / "quickstart_spread.json").read_text())
    for obj in ("dsm", "itd", "cdl"):
        v = list(spread[obj]["mmd_by_seed"].values())
        assert len(v) >= 3
        row = f"| {v[0]:.2e} | {spread[obj]['mean']:.2e} +- {spread[obj]['std']:.2e} | {min(v):.2e} .. {max(v):.2e} |"
        assert f"(`--objective {obj}`) {row}" in README


def _run(code: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the suite: a loaded machine's cores stay usable
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_first_python_snippet_runs(tmp_path):
    code = python_blocks()[0]
    for old, new in [("overrides=[\"objective.name='itd'\"]",
                      "overrides=[\"objective.name='itd'\", 'train.steps=20', 'train.batch_size=64']"),
                     ("run.sample(2000,", "run.sample(20,")]:
        assert old in code, f"the README's first Python snippet changed: update this test ({old!r})"
        code = code.replace(old, new)
    out = _run(code, tmp_path)
    assert "nfe_per_sample" in out and (tmp_path / "runs" / "itd" / "config.json").exists()


@pytest.mark.slow
def test_second_python_snippet_runs_on_its_own(tmp_path):
    code = python_blocks()[1].replace("n=1000", "n=200")
    assert "import" in code.splitlines()[0]
    _run(code + "\nassert x.shape == (200, 2) and stats.nfe_per_sample == 127\n", tmp_path)


def test_results_rows_say_when_they_were_measured():
    section = README.split("## Results", 1)[1].split("\n\n**", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) >= 10
    for line in rows:
        measured = line.rstrip(" |").rsplit("|", 1)[1].strip()
        assert re.fullmatch(r"(\d{4}-\d{2}-\d{2}|[0-9a-f]{7})([,( ].*)?", measured), line


ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_the_architecture_page_names_only_what_exists():
    """Every file, folder and ``module.name`` that docs/architecture.md names in backticks is in the package."""
    import importlib
    import importlib.util

    from difflab.training.trainer import RUN_FILES

    src = ROOT / "src" / "difflab"
    files = {p.name for p in src.rglob("*.py")} | {p.name + "/" for p in src.iterdir() if p.is_dir()}
    files |= {f + "/" for f in RUN_FILES}  # a run folder's own
    tokens = set(re.findall(r"`([^`\s]+)`", ARCHITECTURE))
    named_files = {t for t in tokens if re.fullmatch(r"[a-z_]+(\.py|/)", t) or re.fullmatch(r"[a-z_]+/[a-z_]+\.py", t)}
    assert len(named_files) > 20
    for t in named_files:
        assert (ROOT / t).exists() or (src / t).exists() if "/" in t.rstrip("/") else t in files, t
    dotted = {t for t in tokens if re.fullmatch(r"[a-z_]+(\.[a-z_]+)?\.[A-Za-z_]+", t)
              and t.rsplit(".")[1] not in ("py", "md", "json", "jsonl", "npz", "png", "toml")}  # (files)
    assert len(dotted) > 8
    from difflab.config import RunConfig
    from difflab.runs import Run
    from difflab.studies.common import Study

    cfg = RunConfig()  # the page's names for instances, and config sections (model.arch)
    instances = {"run": Run, "study": Study, "opts": StudyOptions(out=ROOT),
                 **{sec: getattr(cfg, sec) for sec in ("data", "model", "schedule", "objective", "train")}}
    for t in dotted:
        module, name = t.rsplit(".", 1)
        owners = [instances[module]] if module in instances else []
        if importlib.util.find_spec(f"difflab.{module.split('.')[0]}") is not None:
            owners.append(importlib.import_module(f"difflab.{module}"))
        assert any(hasattr(o, name) for o in owners), t


@pytest.mark.slow
def test_the_own_loop_snippets_train_a_diffusers_unet_and_sample_it_in_parallel(tmp_path):
    """The README's "Your own loop" pair, run together with fewer steps: STF in a plain loop, then Picard."""
    pytest.importorskip("diffusers")
    train, sample = (next(b for b in python_blocks() if key in b) for key in ("loss.backward()", "picard(chain"))
    for old, new in [("range(2000)", "range(2)")]:
        assert old in train, f"the README's own-loop snippet changed: update this test ({old!r})"
        train = train.replace(old, new)
    assert "steps=1000, schedule" in sample
    sample = sample.replace("steps=1000, schedule", "steps=40, schedule").replace("window=100", "window=10")
    out = _run(train + "\nassert torch.isfinite(loss)\n" + sample + "\nassert result.x.shape == (16, 1, 8, 8)\n",
               tmp_path)
    assert out.split()[-4:] == ["torch.Size([16,", "1,", "8,", "8])"] or "torch.Size([16, 1, 8, 8])" in out


def test_flow_study_block_is_the_rendering_of_the_committed_results():
    """The README's flow-matching block renders docs/flow_study.json (a 3-seed run of today's full settings), and the
    figures it shows are committed beside it."""
    from difflab.studies import flow

    r = json.loads((ROOT / "docs" / "flow_study.json").read_text())
    start, end = README.index(flow.README_START), README.index(flow.README_END) + len(flow.README_END)
    assert README[start:end] == flow.readme_block(r)
    assert r["study"] == "flow" and r["options"]["seeds"] >= 3 and r["options"]["quick"] is False
    today = {"ddpm_steps": flow.DDPM_STEPS, **flow.settings(StudyOptions(out=Path("x")))}
    assert r["settings"] == json.loads(json.dumps(today))
    for name in flow.FIGURES:
        assert (ROOT / "docs" / f"flow_{name}.png").stat().st_size > 5000


def test_cdl_cost_block_is_the_rendering_of_the_committed_measurements():
    """The README's CDL-at-image-scale block renders docs/cdl_*.json, measured at today's CDL defaults."""
    import importlib.util

    from difflab.objectives.cdl import CDLLoss

    spec = importlib.util.spec_from_file_location("cdl_results", ROOT / "scripts" / "cdl_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    start, end = README.index(mod.START), README.index(mod.END) + len(mod.END)
    files = [mod.load(name) for name in ("cost", "ratio", "finetune", "dino")]
    assert README[start:end] == mod.render(*files)
    cdl = CDLLoss()
    assert (cdl.n_cdl, cdl.n_alpha, cdl.cdl_weight, cdl.nodes) == (2, 16, 4.0, "ratio")  # the block's "today's default"
    cost, ratio, ft, dino = files
    assert cost["digits"]["batch"] == 128 and len(ft["seeds"]) >= 2 and len(dino["seeds"]) >= 3
    for seed in ft["seeds"].values():  # the new default's fine-tune ran with the objective's defaults
        assert {k: v for k, v in seed["models"]["dsm+cdl"]["objective"]["options"].items()} == {}
