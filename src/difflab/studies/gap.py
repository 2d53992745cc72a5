"""The estimation-gap study (SA Fig. 4) on the Dino: DSM against SA-2/3/4 at an equal training budget.

From real points noised to step t0 each model follows its own eta = 1 trajectory; the accumulated gap
D_s = c_s e_s + gamma_s D_{s+1} between its noise estimates and the noise implied by the original points is
plotted against the step (the paper: SA-2 cuts the final gap about 2.5x on CIFAR-10)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflab.data import get_dataset
from difflab.diagnostics.gap import estimation_gap
from difflab.plots import line_plot
from difflab.runs import Run
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.labels import OBJECTIVE_LABELS
from difflab.studies.report import fmt, mean_std, pm, table

OBJECTIVES = ("dsm", "sa2", "sa3", "sa4")
FULL = {"steps": 6000, "t0": 300, "n_points": 2000}
QUICK = {**FULL, "steps": 3000}


def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES, ("dsm", "sa2") if opts.quick else OBJECTIVES)
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    study = Study("gap", opts)
    study.pin_settings(s)
    x0 = get_dataset("dino").eval_data(s["n_points"], seed=3)
    rows, curves = [], {}
    for obj in opts.objectives:
        finals, all_gaps = [], []
        for seed in range(opts.seeds):
            run_dir = study.train_objective("dino", obj, seed, s)

            def compute(r=run_dir):
                return estimation_gap(Run.load(r).denoiser, x0, t0=s["t0"])

            g = study.cached(f"gap-{obj}-s{seed}", compute,
                             what=f"estimation gap along eta = 1 trajectories of {s['n_points']:,} points from "
                                  f"step {s['t0']}")
            finals.append(g["gap"][-1])
            all_gaps.append(g["gap"])
            steps = g["step"]
        curves[obj] = {"step": steps, "gap": np.mean(all_gaps, axis=0).tolist()}
        rows.append({"objective": obj, "final_gap": mean_std(finals)})
    base = next((r["final_gap"]["mean"] for r in rows if r["objective"] == "dsm"), None)
    for r in rows:
        r["dsm_over_this"] = base / r["final_gap"]["mean"] if base else None
    figs = {"gap": "fig_estimation_gap.png"}
    study.log("figure: estimation gap")
    line_plot({OBJECTIVE_LABELS.get(k, k): (v["step"], v["gap"]) for k, v in curves.items()}, study.out / figs["gap"],
              "step s (the trajectory runs from t0 down to 1)", "|| batch mean of D_s ||", logy=True,
              title=f"estimation gap from t0 = {s['t0']} (mean over {opts.seeds} seed(s))")
    return write_outputs(study, {"settings": s, "rows": rows, "curves": curves, "figures": figs,
                                 "wall_time_s": study.elapsed()}, render)


def render(r: dict) -> str:
    s = r["settings"]
    lines = ["# Estimation gap (SA)", "",
             f"Each model trained {s['steps']:,} steps on the Dino; {s['n_points']:,} held-out points noised to "
             f"step {s['t0']}, then each model's own eta = 1 trajectory. Final gap = at step 1.", "",
             table(["objective", "final gap (mean +- std)", "DSM / this"],
                   [[OBJECTIVE_LABELS.get(x["objective"], x["objective"]), pm(x["final_gap"]),
                     fmt(x["dsm_over_this"])] for x in r["rows"]]),
             "", f"![estimation gap]({r['figures']['gap']})", "",
             f"Total wall time of this study run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
