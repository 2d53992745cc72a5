"""Where the generated result blocks live: the docs page each publishing script writes into, and the block as that
page shows it.

The renderers (``difflab.studies.dino.readme_block``, ``difflab.studies.flow.readme_block``,
``scripts/cdl_results.py``'s ``render``) write figure paths from the repository root (``docs/flow_few.png``), as
the README once showed them; a page in docs/ links them from its own folder (``flow_few.png``). tests/test_readme.py
checks each page's block against ``for_page(the rendering)``.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"  # the quick-study, flow-study and CDL-cost blocks


def for_page(block: str) -> str:
    """The block as a page in docs/ shows it: its figures linked from docs/ itself."""
    return block.replace("](docs/", "](")


def replace_block(page: Path, start: str, end: str, block: str) -> None:
    """Replace what lies between the markers ``start`` and ``end`` of ``page`` (markers included) with ``block``."""
    text = page.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{page} has no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    page.write_text(head + for_page(block) + rest.split(end, 1)[1])
