"""Publish a flow-matching study into the repository: its results.json as docs/flow_study.json, four figures as
docs/flow_*.png, and README.md's flow-study block rendered from them (between the markers).

    python scripts/flow_results.py runs/flow            # after: difflab study flow --seeds 3 --out runs/flow

tests/test_readme.py checks that the README block is exactly the rendering of the committed JSON file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from difflab.studies.flow import FIGURES, README_END, README_START, readme_block


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs" / "flow"
    results = json.loads((out / "results.json").read_text())
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copy(out / "results.json", docs / "flow_study.json")
    for name in FIGURES:
        shutil.copy(out / results["figures"][name], docs / f"flow_{name}.png")
    readme = root / "README.md"
    head, rest = readme.read_text().split(README_START, 1)
    readme.write_text(head + readme_block(results) + rest.split(README_END, 1)[1])
    print(f"README.md and docs/flow_study.json updated from {out / 'results.json'}")


if __name__ == "__main__":
    main()
