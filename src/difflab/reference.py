"""The CLI and config reference pages, rendered from their one home: the ``difflab`` parser and the config
options' declarations (``scripts/reference_docs.py`` writes them to ``docs/reference/``; a test keeps them equal).
"""

from __future__ import annotations

import argparse

from difflab.options import choices_text, default_text, interval, options

CONFIG_INTRO = """# Config reference

Every key of a run's config, generated from the declarations in `src/difflab/config.py`. Set a key in a TOML file
(`difflab train --config run.toml`, one table per section), with `--set section.key=value` (a TOML value; bare
words are strings), or with its flag where it has one. A run's `config.json` records the resolved values (automatic
defaults filled in), and `difflab train --print-config` prints them as TOML that `--config` reads back. Runtime
settings (`train.steps`, `train.threads`, `train.device`, `train.log`) may change with `--resume`; a fine-tune
(`train.init`) takes every data, model and schedule key it does not set from its parent run, except
`model.precond`.
"""

CLI_INTRO = """# CLI reference

Every command and flag, generated from the `difflab` parser (`difflab CMD --help` prints the same). Every command
validates its input before any work starts; bad input ends in one line `error: ...` and exit status 2. With
`--json` a command prints one JSON object as its last line.
"""


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, angle brackets as entities)."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def config_reference(cfg_cls=None) -> str:
    """The config page: one table per section, a row per key (default, allowed values, flag, meaning)."""
    if cfg_cls is None:
        from difflab.config import RunConfig as cfg_cls
    lines, section = [CONFIG_INTRO], None
    for o in options(cfg_cls):
        if o.section != section:
            section = o.section
            lines += ["", f"## `[{section}]`", "", "| key | default | allowed | flag | meaning |",
                      "|---|---|---|---|---|"]
        allowed = choices_text(o, ", ") or interval(o.spec)
        if o.spec.at_most is not None:
            allowed = ", ".join(t for t in (allowed, f"<= {o.spec.at_most:,}") if t)
        lines.append(f"| `{o.key}` | {cell(default_text(o))} | {cell(allowed)} | "
                     f"{f'`{o.flag}`' if o.flag else ''} | {cell(o.spec.help)} |")
    return "\n".join(lines) + "\n"


FLAGS_START, FLAGS_END = "<!-- train-flags:start -->", "<!-- train-flags:end -->"


def flags_table(cfg_cls=None) -> str:
    """The README's block: each ``difflab train`` flag with the config key it sets and its default."""
    if cfg_cls is None:
        from difflab.config import RunConfig as cfg_cls
    rows = [f"| `{o.flag}` | `{o.key}` | {cell(default_text(o))} |" for o in options(cfg_cls) if o.flag]
    return "\n".join([FLAGS_START, "| flag | config key | default |", "|---|---|---|", *rows, FLAGS_END])


def _actions(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _argument(a: argparse.Action) -> str:
    if not a.option_strings:
        return f"`{a.metavar or a.dest}`"
    takes = a.nargs != 0
    metavar = a.metavar or (("{" + ",".join(map(str, a.choices)) + "}") if a.choices else a.dest.upper())
    return "`" + ", ".join(a.option_strings) + (f" {metavar}" if takes else "") + "`"  # (a code span: as it is)


def _commands(parser: argparse.ArgumentParser):
    """(name, help, sub-parser) of each command a parser dispatches to."""
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        helps = {c.dest: c.help for c in sub._choices_actions}
        for cmd, p in sub.choices.items():
            yield cmd, helps.get(cmd), p


def _command(name: str, about: str | None, parser: argparse.ArgumentParser, lines: list[str]) -> None:
    rows = [a for a in _actions(parser) if not isinstance(a, argparse._SubParsersAction)]
    lines += ["", f"{'#' * (1 + name.count(' '))} `{name}`", ""]
    if about or parser.description:
        lines += [cell(about or parser.description), ""]
    if rows:
        lines += ["| argument | meaning |", "|---|---|"]
        for a in rows:
            text = (a.help or "").replace("%%", "%")
            lines.append(f"| {_argument(a)} | {cell(text)}{' (required)' if a.required and a.option_strings else ''} |")
    if parser.epilog:
        lines += ["", "```text", parser.epilog.strip("\n"), "```"]
    for cmd, about, p in _commands(parser):
        _command(f"{name} {cmd}", about, p, lines)


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The CLI page: a section per command (and sub-command) with a table of its arguments and its epilog."""
    if parser is None:
        from difflab.cli import build_parser

        parser = build_parser()
    lines = [CLI_INTRO]
    for cmd, about, p in _commands(parser):
        _command(f"difflab {cmd}", about, p, lines)
    return "\n".join(lines) + "\n"
