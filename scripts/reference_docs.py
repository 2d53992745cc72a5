"""Write the generated reference pages, docs/reference/cli.md and docs/reference/config.md, and the README's
table of train flags, from the ``difflab`` parser and the config options' declarations (tests/test_options.py
keeps the committed files equal to them).

    python scripts/reference_docs.py           # rewrite the pages and the README's block
    python scripts/reference_docs.py --check   # exit 1 naming a file that is out of date
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.reference import FLAGS_END, FLAGS_START, cli_reference, config_reference, flags_table


def readme(root: Path) -> str:
    """README.md with its flags block rendered afresh."""
    text = (root / "README.md").read_text()
    start, end = text.index(FLAGS_START), text.index(FLAGS_END) + len(FLAGS_END)
    return text[:start] + flags_table() + text[end:]


PAGES = {"docs/reference/cli.md": lambda root: cli_reference(), "docs/reference/config.md":
         lambda root: config_reference(), "README.md": readme}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the pages are current")
    a = p.parse_args()
    root, stale = Path(__file__).resolve().parents[1], []
    for rel, render in PAGES.items():
        path, text = root / rel, render(root)
        if a.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    for rel in stale:
        print(f"{rel} is out of date: run python scripts/reference_docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
