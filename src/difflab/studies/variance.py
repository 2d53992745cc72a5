"""The target-variance study (STF Figs. 2-3): V_DSM and V_STF(n) against the noise level on three finite data sets
(the Dino training set, the 1-D mixture's training set, the digits), normalised to the maximum of V_DSM as the
paper draws them, with the STF bias; and how much STF divides the variance at the peak, against n - 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difflab.data import get_dataset
from difflab.diagnostics.target_variance import target_variance
from difflab.plots import variance_plot
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.report import fmt, table

DATASETS = ("dino", "gmm1d", "digits")
FULL = {"n_points": 20000, "sigmas": [float(s) for s in np.logspace(-3, 2, 36)], "ref_sizes": [16, 64, 256, 1024],
        "n_x": 256, "n_draws": 16}
QUICK = {**FULL, "sigmas": [float(s) for s in np.logspace(-3, 2, 18)], "ref_sizes": [16, 256], "n_x": 128,
         "n_draws": 8}


def run(opts: StudyOptions) -> Path:
    opts.validate(("stf",), ("stf",))
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    study = Study("variance", opts)
    study.pin_settings(s)
    curves, rows = {}, []
    for name in s.get("datasets", DATASETS):
        def compute(name=name):
            ds = get_dataset(name)
            data = ds.train_data() if name == "digits" else ds.train_data(s["n_points"])
            study.log(f"target variance of {name} ({len(data)} points)")
            return target_variance(data, s["sigmas"], s["ref_sizes"], s["n_x"], s["n_draws"]).to_dict()

        tv = study.cached(f"variance-{name}", compute)
        curves[name] = tv
        v = np.asarray(tv["v_dsm"])
        k = int(v.argmax())
        for n in s["ref_sizes"]:
            ratio = v[k] / max(tv["v_stf"][str(n)][k], 1e-300)
            rows.append({"data": name, "n": n, "sigma_peak": tv["sigma"][k], "ratio": ratio,
                         "bias_over_v_dsm": tv["bias_stf"][str(n)][k] / v[k]})
    figs = {"variance": "fig_target_variance.png"}
    study.log("figure: target variance")
    variance_plot(curves, study.out / figs["variance"])
    return write_outputs(study, {"settings": s, "curves": curves, "peak": rows, "figures": figs,
                                 "wall_time_s": study.elapsed()}, render)


def render(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# Target variance (STF)", "",
        f"Targets in eps form ((x - target) / sigma). V_DSM: the exact posterior spread over every training point; "
        f"V_STF(n): the spread of the stable target over {s['n_draws']} reference batches of size n that contain "
        f"the own point; {s['n_x']} noisy points per level. At the noise level where V_DSM peaks:", "",
        table(["data", "n", "sigma at the peak", "V_DSM / V_STF", "n - 1", "STF bias / V_DSM"],
              [[row["data"], str(row["n"]), fmt(row["sigma_peak"]), fmt(row["ratio"]), str(row["n"] - 1),
                fmt(row["bias_over_v_dsm"])] for row in r["peak"]]),
        "", f"![target variance]({r['figures']['variance']})", "",
        "Reading it: on a finite set V_DSM vanishes as sigma -> 0 only once sigma is below the spacing of the "
        "training points. The Dino and mixture sets here are 20,000 points in 2-D and 1-D, so neighbours are closer "
        "than the smallest sigma shown and V_DSM stays near its maximum there (a second hump at the scale of the "
        "clusters); the 1,797 digits are sparse in 64 dimensions and show the paper's picture, a single peak at "
        "intermediate sigma (about 1 here, for images in [-1, 1]), where STF divides the variance. "
        "V_DSM / V_STF ~ n - 1 needs n much smaller than the set: with n = 1024 of 1,797 digits most neighbours "
        "are in every reference batch and the division saturates, while the bias (the dashed lines) keeps falling.",
        "",
        f"Total wall time of this study run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
