"""The README and the documentation pages tell the truth: their generated blocks are the renderings of the committed
results, every Python snippet they show runs, and every figure they show is there.

The generated blocks live in docs/results.md (written by scripts/readme_results.py, flow_results.py and
cdl_results.py through scripts/docs_blocks.py), the quick start's spread in docs/safety.md."""

from __future__ import annotations

import importlib.util
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
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
RESULTS = (DOCS / "results.md").read_text()  # the Results table and the generated blocks
SAFETY = (DOCS / "safety.md").read_text()  # "Same command, same numbers": the quick start's spread
GETTING_STARTED = (DOCS / "getting-started.md").read_text()
DIFFUSERS = (DOCS / "diffusers.md").read_text()  # "Your own loop"
QUICK = json.loads((ROOT / "docs" / "quick_study.json").read_text())
THREADS = json.loads((ROOT / "docs" / "quick_study_threads.json").read_text())


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BLOCKS = _script("docs_blocks")  # where the publishing scripts write, and how a page in docs/ shows a block


def python_blocks(text: str = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def pages() -> dict[str, str]:
    """The README and every page of the documentation site, by path from the repository root."""
    return {"README.md": README, **{str(p.relative_to(ROOT)): p.read_text() for p in sorted(DOCS.rglob("*.md"))}}


def block_of(page: str, start: str, end: str) -> str:
    return page[page.index(start):page.index(end) + len(end)]


def test_quick_study_block_is_the_rendering_of_the_committed_results():
    assert BLOCKS.RESULTS == DOCS / "results.md"
    assert block_of(RESULTS, README_START, README_END) == BLOCKS.for_page(readme_block(QUICK, THREADS))


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
        assert f"(`--objective {obj}`) {row}" in SAFETY


def _run(code: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread, as the suite: a loaded machine's cores stay usable
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_docs_show_the_readmes_tested_python_example():
    """Getting started repeats the README's one Python example word for word (the test below runs it)."""
    assert python_blocks(GETTING_STARTED)[0] == python_blocks(README)[0]


@pytest.mark.slow
def test_first_python_snippet_runs(tmp_path):
    code = python_blocks(README)[0]
    for old, new in [("overrides=[\"objective.name='itd'\"]",
                      "overrides=[\"objective.name='itd'\", 'train.steps=20', 'train.batch_size=64']"),
                     ("run.sample(2000,", "run.sample(20,")]:
        assert old in code, f"the README's Python example changed: update this test ({old!r})"
        code = code.replace(old, new)
    out = _run(code, tmp_path)
    assert "nfe_per_sample" in out and (tmp_path / "runs" / "itd" / "config.json").exists()


@pytest.mark.slow
def test_second_python_snippet_runs_on_its_own(tmp_path):
    """Getting started's exact-denoiser snippet."""
    code = next(b for b in python_blocks(GETTING_STARTED) if "GaussianDenoiser" in b).replace("n=1000", "n=200")
    assert "import" in code.splitlines()[0]
    _run(code + "\nassert x.shape == (200, 2) and stats.nfe_per_sample == 127\n", tmp_path)


def test_results_rows_say_when_they_were_measured():
    section = RESULTS.split("## Measurements", 1)[1].split("\n## ", 1)[0]
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
    from difflab.studies.cache import Study

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
    """The "Your own loop" pair of docs/diffusers.md, run together with fewer steps: STF in a plain loop, then
    Picard."""
    pytest.importorskip("diffusers")
    train, sample = (next(b for b in python_blocks(DIFFUSERS) if key in b) for key in ("loss.backward()",
                                                                                      "picard(chain"))
    for old, new in [("range(2000)", "range(2)")]:
        assert old in train, f"the docs' own-loop snippet changed: update this test ({old!r})"
        train = train.replace(old, new)
    assert "steps=1000, schedule" in sample
    sample = sample.replace("steps=1000, schedule", "steps=40, schedule").replace("window=100", "window=10")
    out = _run(train + "\nassert torch.isfinite(loss)\n" + sample + "\nassert result.x.shape == (16, 1, 8, 8)\n",
               tmp_path)
    assert out.split()[-4:] == ["torch.Size([16,", "1,", "8,", "8])"] or "torch.Size([16, 1, 8, 8])" in out


def test_flow_study_block_is_the_rendering_of_the_committed_results():
    """The flow-matching block of docs/results.md renders docs/flow_study.json (a 3-seed run of today's full
    settings), and the figures it shows are committed beside it."""
    from difflab.studies import flow

    r = json.loads((ROOT / "docs" / "flow_study.json").read_text())
    assert block_of(RESULTS, flow.README_START, flow.README_END) == BLOCKS.for_page(flow.readme_block(r))
    assert r["study"] == "flow" and r["options"]["seeds"] >= 3 and r["options"]["quick"] is False
    today = {"ddpm_steps": flow.DDPM_STEPS, **flow.settings(StudyOptions(out=Path("x")))}
    assert r["settings"] == json.loads(json.dumps(today))
    for name in flow.FIGURES:
        assert (ROOT / "docs" / f"flow_{name}.png").stat().st_size > 5000


def test_cdl_cost_block_is_the_rendering_of_the_committed_measurements():
    """The CDL-at-image-scale block of docs/results.md renders docs/cdl_*.json, measured at today's CDL defaults."""
    from difflab.objectives.cdl import CDLLoss

    mod = _script("cdl_results")
    files = [mod.load(name) for name in ("cost", "ratio", "finetune", "dino")]
    assert block_of(RESULTS, mod.START, mod.END) == BLOCKS.for_page(mod.render(*files))
    cdl = CDLLoss()
    assert (cdl.n_cdl, cdl.n_alpha, cdl.cdl_weight, cdl.nodes) == (2, 16, 4.0, "ratio")  # the block's "today's default"
    cost, ratio, ft, dino = files
    assert cost["digits"]["batch"] == 128 and len(ft["seeds"]) >= 2 and len(dino["seeds"]) >= 3
    for seed in ft["seeds"].values():  # the new default's fine-tune ran with the objective's defaults
        assert {k: v for k, v in seed["models"]["dsm+cdl"]["objective"]["options"].items()} == {}


def test_every_python_snippet_of_the_readme_and_the_docs_is_run_by_a_test():
    """A new snippet needs a test that runs it: these are the snippets the tests above run."""
    from test_options import architecture_snippet  # (run by tests/test_options.py)

    tested = {python_blocks(README)[0], next(b for b in python_blocks(GETTING_STARTED) if "GaussianDenoiser" in b),
              *(next(b for b in python_blocks(DIFFUSERS) if k in b) for k in ("loss.backward()", "picard(chain")),
              architecture_snippet()}
    for path, text in pages().items():
        for block in python_blocks(text):
            assert block in tested, f"{path}: a Python snippet no test runs (add it to tests/test_readme.py):\n{block}"


def test_every_figure_and_page_link_resolves():
    """Every image and every relative link of the README and the docs names a file that is there (the site's strict
    build checks the docs too, in tests/test_docs_site.py; this is the quick check, and the README's)."""
    for path, text in pages().items():
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # not inside code
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file = (ROOT / path).parent / target.split("#", 1)[0]
            assert file.exists(), f"{path} links {target}, which is not there"


def test_the_readme_is_a_short_first_page():
    """Set-up, quick start, one Python example and the feature list; the rest is in the docs site."""
    assert len(README.splitlines()) <= 250
    assert len(python_blocks(README)) == 1
    for cmd in ("make demo", "make test", "make docs"):
        assert cmd in README
    from difflab.reference import FLAGS_END, FLAGS_START

    # the results' generated blocks live in docs/results.md; the README keeps only its table of train flags
    assert "<!--" not in README.replace(FLAGS_START, "").replace(FLAGS_END, "")
