"""``difflab compare`` with --jobs 1 and --jobs N, side by side in one run: the wall-time ratio, and whether the two
give the same numbers (they must: every unit runs at the same thread count whatever --jobs is).

Each compare runs as the user runs it (the ``difflab`` command, a fresh folder), one after the other, and the pair
is measured ``--repeats`` times (the ratio's spread; the first repeat is the one reported, the last one's folders
are kept); the load average before and after each is recorded, since another process on the machine changes the
ratio.

    python benchmarks/compare_jobs.py --out runs/bench-compare [--jobs 2] [--repeats 2] [--data digits]
        [--objectives dsm,stf,sa2] [--seeds 2] [--extra "--budget-steps 200"]

Writes OUT/timing.json (and prints it); ``python scripts/compare_results.py OUT`` publishes it on docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from difflab.studies.compare_report import numbers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the two compares (jobs1/, jobsN/) and timing.json")
    p.add_argument("--jobs", type=int, default=2, help="the parallel run's --jobs   [2]")
    p.add_argument("--data", default="digits")
    p.add_argument("--objectives", default="dsm,stf,sa2")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="measure the pair this many times (the ratio's spread)   [2]")
    p.add_argument("--extra", default="", help="more difflab compare flags, e.g. \"--budget-steps 200\"")
    a = p.parse_args()
    out = Path(a.out)
    exe = shutil.which("difflab", path=str(Path(sys.executable).parent)) or "difflab"
    pairs, first = [], None
    for rep in range(a.repeats):  # the pair again: how far the ratio moves from one measurement to the next
        runs = {}
        for jobs in (1, a.jobs):
            folder = out / f"jobs{jobs}"
            shutil.rmtree(folder, ignore_errors=True)
            cmd = [exe, "compare", "--data", a.data, "--objectives", a.objectives, "--seeds", str(a.seeds),
                   "--executor", "local", "--jobs", str(jobs), "--out", str(folder), "--quiet", *shlex.split(a.extra)]
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            runs[str(jobs)] = {"command": " ".join(["difflab", *cmd[1:]]), "wall_s": time.perf_counter() - t0,
                               "load_before": load, "load_after": os.getloadavg()[0]}
            print(f"repeat {rep + 1}, --jobs {jobs}: {runs[str(jobs)]['wall_s']:.1f} s", flush=True)
        r1, rn = (numbers(json.loads((out / f"jobs{j}" / "results.json").read_text())) for j in (1, a.jobs))
        first = first or r1
        pairs.append({"runs": runs, "ratio": runs["1"]["wall_s"] / runs[str(a.jobs)]["wall_s"],
                      "identical": r1 == rn == first})  # (every repeat gives the first one's numbers too)
    timing = {"date": date.today().isoformat(), "cores": len(os.sched_getaffinity(0)), "jobs": a.jobs,
              "runs": pairs[0]["runs"], "ratio": pairs[0]["ratio"], "repeats": pairs,
              "identical": all(q["identical"] for q in pairs), "results": f"jobs{a.jobs}/results.json"}
    (out / "timing.json").write_text(json.dumps(timing, indent=1) + "\n")
    print(json.dumps(timing, indent=1))
    return 0 if timing["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
