"""Config options declared once. Each field of a config section carries its metadata in the field itself
(:func:`option`: default, help, choices, range, CLI flag), and everything else is derived from it: the range and
choice checks of :func:`difflab.config.validate`, the ``difflab train`` flags and their ``--help`` (:func:`add_flags`,
:func:`flag_overrides`), and the config reference table (:func:`config_table`).

Adding an option with a flag is one declaration in its section's dataclass::

    warmup_steps: int = option(200, "linear learning-rate warm-up steps", ge=0, flag=True)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field

from difflab.errors import DifflabError, require, suggest

KEY = "difflab"  # the field-metadata key that holds an option's Spec


@dataclass(frozen=True)
class Spec:
    """What one config field means and accepts (the dataclass field keeps the default)."""

    help: str
    choices: tuple | Callable[[], tuple] | None = None  # allowed values (None may be one); a list field: per item
    gt: float | None = None  # value > gt, and so on (a list: each item); None (an automatic default) is not checked
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    at_most: int | None = None  # an upper bound that catches a typo (a width of 1e9) before it runs out of memory
    pattern: tuple[str, str] | None = None  # (regex the whole string matches, how the allowed forms read)
    flag: str | None = None  # the ``difflab train`` flag, e.g. "--steps"
    metavar: str | None = None
    shown: str | None = None  # how the default reads where it is not the literal value ("by the network: ...")
    runtime: bool = False  # a runtime setting: not part of what a run computes, accepted with --resume
    inherited: bool = True  # a fine-tune takes it from its parent run (data, model, schedule sections)
    saved_default: object = None  # the value of a saved config that lacks the key (a default that changed), or
    has_saved_default: bool = False  # None itself when this is set

    def allowed(self) -> tuple | None:
        return self.choices() if callable(self.choices) else self.choices


def option(default=MISSING, help: str = "", *, factory=None, flag: bool | str | None = None, **spec):
    """A dataclass field with its :class:`Spec`. ``flag=True`` names the flag after the key (``--batch-size``
    for ``batch_size``); a string names it; ``factory`` makes a mutable default (``{}``, ``[]``)."""
    if "saved_default" in spec:
        spec["has_saved_default"] = True
    meta = {KEY: Spec(help=help, flag=flag, **spec)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One config key: its section, field (with the default) and spec, as :func:`options` lists them."""

    section: str
    field: dataclasses.Field
    spec: Spec
    hint: object  # the resolved type annotation

    @property
    def name(self) -> str:
        return self.field.name

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def default(self):
        f = self.field
        return f.default_factory() if f.default_factory is not MISSING else f.default

    @property
    def flag(self) -> str | None:
        return f"--{self.name.replace('_', '-')}" if self.spec.flag is True else self.spec.flag

    @property
    def dest(self) -> str | None:
        return self.flag[2:].replace("-", "_") if self.flag else None

    @property
    def base_type(self):
        """The annotation without ``| None`` (int, float, str, bool, list, dict)."""
        hint = self.hint
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return typing.get_origin(hint) or hint

    @property
    def is_table(self) -> bool:
        """A free-form keyword table (objective.options, model.unet), merged key by key."""
        return self.base_type is dict


def sections(cfg_cls) -> dict[str, type]:
    """The section dataclasses of a run config class, by section name."""
    return {f.name: f.default_factory for f in dataclasses.fields(cfg_cls)}


def options(cfg_cls) -> Iterator[Option]:
    """Every key of a run config class (RunConfig or a subclass), section by section, in declaration order."""
    for sec, cls in sections(cfg_cls).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            require(KEY in f.metadata, f"config field {sec}.{f.name} is declared without option(): give it a help")
            yield Option(sec, f, f.metadata[KEY], hints[f.name])


def check(opt: Option, value) -> None:
    """The choice, pattern and range checks of one key's value (its type was checked when it was set)."""
    s, where = opt.spec, f"config {opt.key}"
    allowed = s.allowed()
    if allowed is not None:
        names = [str(c) for c in allowed if c is not None]
        for v in value if opt.base_type is list else [value]:
            require(v in allowed, f"{where} = {v!r} is not one of {', '.join(names)}{suggest(str(v), names)}")
    if s.pattern is not None and value is not None:
        require(re.fullmatch(s.pattern[0], value) is not None, f"{where} = {value!r} is not one of {s.pattern[1]}")
    for v in value if isinstance(value, list) else [value]:  # (a list: each item in range)
        if v is None or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if s.lt is not None or s.le is not None:
            require(_within(v, s), f"{where} must be in {interval(s)}, got {v!r}")
        elif s.gt is not None or s.ge is not None:
            require(_within(v, s), f"{where} must be {interval(s)}, got {v!r}")
        if s.at_most is not None:
            require(v <= s.at_most, f"{where} = {v!r} is too large (at most {s.at_most:,})")


def _within(value, s: Spec) -> bool:
    return ((s.gt is None or value > s.gt) and (s.ge is None or value >= s.ge)
            and (s.lt is None or value < s.lt) and (s.le is None or value <= s.le))


def interval(s: Spec) -> str:
    """The range as it reads in a message or a table: '> 0', '>= 0', '[0, 1)', '<= 8'."""
    if s.lt is None and s.le is None:
        return f"> {s.gt:g}" if s.gt is not None else f">= {s.ge:g}" if s.ge is not None else ""
    right = f"{s.lt:g})" if s.lt is not None else f"{s.le:g}]"
    if s.gt is None and s.ge is None:
        return f"< {s.lt:g}" if s.lt is not None else f"<= {s.le:g}"
    return f"{'(' if s.gt is not None else '['}{s.gt if s.gt is not None else s.ge:g}, {right}"


def default_text(opt: Option) -> str:
    """How an option's default reads in ``--help`` and the reference: its ``shown`` text, or the value."""
    if opt.spec.shown is not None:
        return opt.spec.shown
    v = opt.default
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None or v == []:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, dict) else str(v)


def choices_text(opt: Option, sep: str = " | ") -> str:
    allowed = opt.spec.allowed()
    if allowed is not None:
        return sep.join(str(c) for c in allowed if c is not None)
    return opt.spec.pattern[1].replace(", ", sep) if opt.spec.pattern else ""


def flag_help(opt: Option) -> str:
    """The flag's ``--help`` line: its choices, its help, the config key it sets and its default."""
    text = f"{choices_text(opt)}: {opt.spec.help}" if choices_text(opt) else opt.spec.help
    notes = [opt.key]
    if opt.base_type is list:
        notes.append("repeatable or comma-separated; none: empty")
    if opt.spec.runtime:
        notes.append("a runtime setting: also with --resume")
    return f"{text} ({'; '.join(notes)})   [{default_text(opt)}]".replace("%", "%%")


METAVARS = {int: "N", float: "X", str: "NAME", list: "NAME[,NAME]"}


def add_flags(parser: argparse.ArgumentParser, cfg_cls) -> None:
    """One flag per option that declares one; unset flags stay None, so only what was given overrides the config."""
    for opt in options(cfg_cls):
        if not opt.flag:
            continue
        kind = opt.base_type
        if kind is bool:
            parser.add_argument(opt.flag, dest=opt.dest, action="store_true", default=None, help=flag_help(opt))
        elif kind is list:
            parser.add_argument(opt.flag, dest=opt.dest, action="append", metavar=opt.spec.metavar or METAVARS[list],
                                help=flag_help(opt))
        else:
            parser.add_argument(opt.flag, dest=opt.dest, type=kind, metavar=opt.spec.metavar or METAVARS[kind],
                                help=flag_help(opt))


def flag_overrides(args: argparse.Namespace, cfg_cls) -> list[str]:
    """The given flags as ``section.key=value`` overrides (in TOML syntax, as ``--set`` takes them)."""
    out = []
    for opt in options(cfg_cls):
        value = getattr(args, opt.dest, None) if opt.flag else None
        if value is None:
            continue
        if opt.base_type is list:
            value = [n.strip() for v in value for n in v.split(",") if n.strip() and n.strip() != "none"]
        out.append(f"{opt.key}={json.dumps(value)}")
    return out


def check_type(where: str, value, hint):
    """Coerce/validate value against a field annotation; ints are accepted for floats, bools never for numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    expected = origin or hint
    if expected is float and isinstance(value, float):
        require(math.isfinite(value), f"config {where} must be a finite number, got {value!r}")
        return value
    if isinstance(value, bool) and expected is not bool:
        raise DifflabError(f"config {where} must be {expected.__name__}, got a boolean {value!r}")
    if not isinstance(value, expected):
        raise DifflabError(f"config {where} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    if expected is list and typing.get_args(hint):  # list[float]: each item too
        return [check_type(f"{where}[{i}]", v, typing.get_args(hint)[0]) for i, v in enumerate(value)]
    return value
