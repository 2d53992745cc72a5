"""Publish a flow-matching study into the repository: its results.json as docs/flow_study.json, four figures as
docs/flow_*.png, and the flow-study block of docs/results.md rendered from them (between the markers).

    python scripts/flow_results.py runs/flow            # after: difflab study flow --seeds 3 --out runs/flow

tests/test_readme.py checks that the page's block is exactly the rendering of the committed JSON file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from difflab.studies.flow import FIGURES, README_END, README_START, readme_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_blocks import RESULTS, replace_block  # noqa: E402


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        return print(__doc__)
    root = Path(__file__).resolve().parents[1]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs" / "flow"
    results = json.loads((out / "results.json").read_text())
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copy(out / "results.json", docs / "flow_study.json")
    for name in FIGURES:
        shutil.copy(out / results["figures"][name], docs / f"flow_{name}.png")
    replace_block(RESULTS, README_START, README_END, readme_block(results))
    print(f"{RESULTS.relative_to(root)} and docs/flow_study.json updated from {out / 'results.json'}")


if __name__ == "__main__":
    main()
