"""Each config option is declared once (difflab.options.option) and everything else derives from it: validation,
the train flags and their help, and the reference pages (docs/reference/), which must equal their rendering."""

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from difflab.cli import build_parser, samplers_epilog
from difflab.config import RunConfig, TrainConfig, apply, load_config, parse_override, to_toml, validate
from difflab.errors import DifflabError
from difflab.options import add_flags, flag_overrides, options
from difflab.reference import cli_reference, config_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("page", "render"), [("cli.md", cli_reference), ("config.md", config_reference)])
def test_the_reference_pages_are_the_rendering_of_the_declarations(page, render):
    assert (ROOT / "docs" / "reference" / page).read_text() == render(), \
        f"docs/reference/{page} is out of date: run python scripts/reference_docs.py"


def test_the_pages_script_checks_what_the_test_checks():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "reference_docs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


# --- adding an option is one declaration -------------------------------------------------------------------------


def architecture_snippet() -> str:
    """The docs' example of adding a config option (docs/architecture.md, "A config option")."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    return next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "warmup_frac" in b)


def test_one_declaration_gives_a_checked_key_a_flag_its_help_and_a_reference_row():
    scope = {"__name__": "architecture_snippet"}
    exec(architecture_snippet(), scope)  # the page's snippet, as written there
    WarmupRun = scope["WarmupRun"]  # noqa: N806
    p = argparse.ArgumentParser()
    add_flags(p, WarmupRun)
    help_text = " ".join(p.format_help().split())
    assert "--warmup-frac X warm-up as a fraction of the steps (train.warmup_frac) [0]" in help_text
    args = p.parse_args(["--warmup-frac", "0.25", "--steps", "10"])
    given = flag_overrides(args, WarmupRun)
    assert given == ["train.steps=10", "train.warmup_frac=0.25"]
    cfg = WarmupRun()
    for o in given:
        apply(cfg, parse_override(o))
    assert validate(cfg).train.warmup_frac == 0.25 and cfg.train.steps == 10
    cfg2 = WarmupRun()
    apply(cfg2, {"train": {"warmup_frac": 1.5}})
    with pytest.raises(DifflabError, match=r"config train.warmup_frac must be in \[0, 1\], got 1.5"):
        validate(cfg2)
    with pytest.raises(DifflabError, match="must be float"):
        apply(WarmupRun(), {"train": {"warmup_frac": "half"}})
    assert "warmup_frac = 0.25" in to_toml(cfg)
    assert "| `train.warmup_frac` | 0 | [0, 1] | `--warmup-frac` | warm-up as a fraction of the steps |" in \
        config_reference(WarmupRun)
    assert "warmup_frac" not in config_reference()  # (the snippet changed nothing of RunConfig)


def test_a_field_without_a_declaration_is_refused():
    @dataclass
    class Bare(TrainConfig):
        undeclared: int = 3

    @dataclass
    class BareRun(RunConfig):
        train: Bare = field(default_factory=Bare)

    with pytest.raises(DifflabError, match="train.undeclared is declared without option"):
        list(options(BareRun))


# --- the declarations' checks, as they read ----------------------------------------------------------------------


@pytest.mark.parametrize(("override", "msg"), [
    ("train.lr=-1", "config train.lr must be > 0, got -1.0"),
    ("schedule.T=1", "config schedule.T must be >= 2, got 1"),
    ("train.ema_decay=1.0", r"config train.ema_decay must be in \[0, 1\), got 1.0"),
    ("train.label_dropout=1.5", r"config train.label_dropout must be in \[0, 1\], got 1.5"),
    ("model.width=100000000", "config model.width = 100000000 is too large \\(at most 65,536\\)"),
    ('model.arch="mpl"', "config model.arch = 'mpl' is not one of auto, mlp, unet, diffusers \\(did you mean 'mlp'"),
    ('model.preset="smal"', "config model.preset = 'smal' is not one of tiny, small, cifar10"),
    ('objective.name="cdx"', "config objective.name = 'cdx' is not one of dsm, .* \\(did you mean 'cdl'"),
    ('train.log=["tensorbord"]', "config train.log = 'tensorbord' is not one of tensorboard, wandb"),
    ('train.device="gpu"', "config train.device = 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("schedule.beta_end=1.5", r"config schedule.beta_end must be in \(0, 1\), got 1.5"),
])
def test_each_declared_check_refuses_in_one_line(override, msg):
    with pytest.raises(DifflabError, match=msg):
        load_config(overrides=[override])


def test_every_key_has_a_help_and_every_flag_sets_one_key():
    keys = [o.key for o in options(RunConfig)]
    assert len(keys) == len(set(keys)) and all(o.spec.help for o in options(RunConfig))
    flags = [o.flag for o in options(RunConfig) if o.flag]
    assert len(flags) == len(set(flags)) >= 22
    train = next(a for a in build_parser()._subparsers._actions if isinstance(a, argparse._SubParsersAction))
    parser_flags = {s for a in train.choices["train"]._actions for s in a.option_strings}
    assert set(flags) <= parser_flags


def test_the_sample_help_lists_every_sampler_with_its_own_defaults():
    from difflab.samplers import SEQUENTIAL

    text = samplers_epilog()
    for name in SEQUENTIAL:
        assert f"\n  {name} " in text
    assert "--steps=18" in text and "--steps=50" in text and "--spacing=trailing" in text  # heun, ddim, dpmpp-2m


def test_the_readme_flags_table_is_the_rendering_of_the_declarations():
    from difflab.reference import FLAGS_END, FLAGS_START, flags_table

    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(FLAGS_START), readme.index(FLAGS_END) + len(FLAGS_END)
    assert readme[start:end] == flags_table(), "README.md's flags table is out of date: run " \
                                                "python scripts/reference_docs.py"
