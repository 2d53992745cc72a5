"""Publish a study's results on docs/results.md: its results.json kept as docs/<name>_study.json, its figures as
docs/<name>_<figure>.png, and the page's block rendered from the JSON by the study's own report (title and wall time
left out, figure links pointing at the copies).

    python scripts/study_results.py phema runs/phema-full          # copy the study's files, re-render the block
    python scripts/study_results.py autoguide runs/autoguide-3
    python scripts/study_results.py phema                          # re-render from the committed JSON only

tests/test_study_results.py checks that each block is exactly the rendering of the committed file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_blocks import RESULTS, replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("phema", "autoguide")  # the studies published this way


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}-study:start -->", f"<!-- {name}-study:end -->"


def block(name: str, r: dict) -> str:
    """The page's block: the study's report without its title and wall time, figures linked as docs/ copies."""
    text = importlib.import_module(f"difflab.studies.{name}").render(r)
    lines = [ln for ln in text.splitlines()[1:] if not ln.startswith("Total wall time")]
    body = "\n".join(lines).strip("\n")
    for key, fig in r["figures"].items():
        body = body.replace(f"]({fig})", f"](docs/{name}_{key}.png)")
    start, end = markers(name)
    return f"{start}\n{body}\n{end}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", choices=STUDIES)
    p.add_argument("out", nargs="?", help="the study's --out folder (omit: re-render the committed JSON)")
    a = p.parse_args()
    saved = ROOT / "docs" / f"{a.name}_study.json"
    if a.out:
        out = Path(a.out)
        r = json.loads((out / "results.json").read_text())
        saved.write_text(json.dumps(r, indent=1) + "\n")
        for key, fig in r["figures"].items():
            shutil.copyfile(out / fig, ROOT / "docs" / f"{a.name}_{key}.png")
    r = json.loads(saved.read_text())
    replace_block(RESULTS, *markers(a.name), block(a.name, r))
    print(f"wrote {RESULTS.relative_to(ROOT)} ({a.name} block)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
