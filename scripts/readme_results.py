"""Publish the quick Dino study into the repository: its results.json as docs/quick_study.json (and, given, the
same study at another thread count as docs/quick_study_threads.json), its sample figure as
docs/quick_study_samples.png, and the quick-study block of docs/results.md rendered from them (between the
markers).

    python scripts/readme_results.py [runs/readme] [runs/readme-threads]     # `make readme` runs both studies

tests/test_readme.py checks that the page's block is exactly the rendering of the committed JSON files.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from difflab.studies.dino import README_END, README_START, readme_block

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_blocks import RESULTS, replace_block  # noqa: E402


def main() -> None:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        return print(__doc__)
    root = Path(__file__).resolve().parents[1]
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs" / "readme"
    results = json.loads((out / "results.json").read_text())
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copy(out / "results.json", docs / "quick_study.json")
    shutil.copy(out / results["figures"]["samples"], docs / "quick_study_samples.png")
    other = None
    if len(sys.argv) > 2:
        other = json.loads((Path(sys.argv[2]) / "results.json").read_text())
        shutil.copy(Path(sys.argv[2]) / "results.json", docs / "quick_study_threads.json")
    replace_block(RESULTS, README_START, README_END, readme_block(results, other))
    print(f"{RESULTS.relative_to(root)} and docs/quick_study*.json updated from {out / 'results.json'}")


if __name__ == "__main__":
    main()
