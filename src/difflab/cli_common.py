"""What every ``difflab`` command's parser shares, for cli.py and the commands kept in their own modules
(cli_fid.py, cli_info.py, cli_phema.py): the flags each ends with."""

from __future__ import annotations

import argparse


def command_ends(p: argparse.ArgumentParser, fn, what: str, quiet: str | None = None) -> None:
    """The flags every command ends with (--quiet where it reports progress, --json) and the function it runs."""
    if quiet:
        p.add_argument("--quiet", action="store_true", help=quiet)
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on the last line")
    p.set_defaults(fn=fn)
