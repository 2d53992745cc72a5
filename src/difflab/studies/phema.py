"""The post-hoc EMA study (EDM2): the best EMA length found after one training run.

Each data set trains one DSM run that tracks the power-function EMA profiles ``TRACKED`` (snapshots every
train.phema_every steps) beside its fixed EMA (train.ema_decay 0.999). After training, the EMA of every relative
standard deviation in ``STDS`` is rebuilt from the snapshots and sampled: the Dino scored by MMD (DDPM-1000, 2,000
samples), the digits by the classifier Frechet distance (DDIM-50, 1,000 samples; the digits study's classifier). The
fixed EMA and the raw weights are scored beside them, and the profile ``CHECK``, tracked directly as well, measures
the reconstruction: its rebuilt weights (from ``TRACKED`` only) against the tracked copy, relative to the distance
between the two tracked profiles, and the score of each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflab.data import get_dataset
from difflab.plots import line_plot
from difflab.runs import Run
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.report import fmt, mean_std, pm, sci, table

TRACKED, CHECK = (0.05, 0.10), 0.07
STDS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.17, 0.22)
DATASETS = ("dino", "digits")
FULL = {"dino": {"steps": 6000, "n": 2000, "sampler": "ddpm", "sampler_steps": 1000},
        "digits": {"steps": 4000, "n": 1000, "sampler": "ddim", "sampler_steps": 50, "preset": "tiny",
                   "batch_size": 128, "lr": 1e-3}}
QUICK = {"dino": {**FULL["dino"], "steps": 2000, "n": 1000},
         "digits": {**FULL["digits"], "steps": 800, "n": 500}}


def settings(opts: StudyOptions) -> dict:
    """Per data set: its budget and sampler, overridden by ``opts.overrides`` (flat keys apply to both)."""
    base = QUICK if opts.quick else FULL
    s = {data: {**base[data], **opts.overrides} for data in DATASETS}
    for data, d in s.items():
        d["train_overrides"] = [f'data.name="{data}"', f"train.phema={list((*TRACKED, CHECK))}",
                                f"train.steps={d['steps']}", "train.log_every=50"]
        if data == "digits":
            d["train_overrides"] += ['model.arch="unet"', f'model.preset="{d["preset"]}"',
                                     f"train.batch_size={d['batch_size']}", f"train.lr={d['lr']}"]
    return s


def run(opts: StudyOptions) -> Path:
    opts.validate(("dsm",), ("dsm",))
    s = settings(opts)
    study = Study("phema", opts)
    study.pin_settings(s)
    rows, curves = [], {}
    for data in DATASETS:
        per_seed = [_seed_units(study, data, seed, s[data]) for seed in range(opts.seeds)]
        curves[data] = {"std": list(STDS), "score": np.mean([u["phema"] for u in per_seed], axis=0).tolist(),
                        "fixed": float(np.mean([u["fixed"] for u in per_seed]))}
        best = [int(np.argmin(u["phema"])) for u in per_seed]
        rows.append({"data": data, "metric": _metric(data, s[data]), "fixed": mean_std(u["fixed"] for u in per_seed),
                     "raw": mean_std(u["raw"] for u in per_seed),
                     "by_std": {f"{x:g}": mean_std(u["phema"][i] for u in per_seed) for i, x in enumerate(STDS)},
                     "best_std": [STDS[i] for i in best],
                     "best": mean_std(u["phema"][i] for u, i in zip(per_seed, best, strict=True)),
                     "check": {k: mean_std(u["check"][k] for u in per_seed)
                               for k in ("weight_error", "profile_error", "score_tracked", "score_rebuilt")}})
    study.log("figures: quality against EMA length")
    figs = {data: f"fig_ema_length_{data}.png" for data in DATASETS}  # (one per data set: different scales)
    for data, name in figs.items():
        c = curves[data]
        line_plot({"post-hoc EMA": (c["std"], c["score"])}, study.out / name,
                  "EMA length: relative standard deviation sigma_rel", _metric(data, s[data]), logy=data == "dino",
                  hlines={"fixed EMA (decay 0.999)": c["fixed"]},
                  title=f"{data}: one training run, every EMA length (mean of {opts.seeds})")
    return write_outputs(study, {"settings": s, "tracked": list(TRACKED), "check_std": CHECK, "rows": rows,
                                 "curves": curves, "figures": figs, "wall_time_s": study.elapsed()}, render)


def _metric(data: str, d: dict) -> str:
    how = f"{d['sampler'].upper()}-{d['sampler_steps']}"
    return f"MMD ({how})" if data == "dino" else f"classifier FD ({how})"


def _seed_units(study: Study, data: str, seed: int, d: dict) -> dict:
    """Train one run of ``data`` and score its EMAs: every std in STDS rebuilt, the fixed EMA, the raw weights and
    the directly tracked CHECK profile against its reconstruction."""
    run_dir = study.train_run(f"{data}-dsm-s{seed}", [*d["train_overrides"], f"train.seed={seed}"])
    score = _scorer(study, data, d)
    key = f"{data}-s{seed}"

    def rebuilt(std: float) -> float:
        from difflab.training.phema import reconstruct

        return score(_with_state(Run.load(run_dir), reconstruct(run_dir, std, from_stds=TRACKED)))

    phema = [study.cached(f"{key}-std{std:g}", lambda x=std: rebuilt(x),
                          what=f"score of the EMA rebuilt at sigma_rel {std:g}") for std in STDS]
    fixed = study.cached(f"{key}-fixed", lambda: score(Run.load(run_dir)), what="score of the fixed EMA (0.999)")
    raw = study.cached(f"{key}-raw", lambda: score(Run.load(run_dir, ema=False)), what="score of the raw weights")
    check = study.cached(f"{key}-check", lambda: _check(run_dir, score),
                         what=f"sigma_rel {CHECK:g}: tracked copy against its reconstruction")
    return {"phema": phema, "fixed": fixed, "raw": raw, "check": check}


def _with_state(run: Run, state: dict) -> Run:
    run.denoiser.load_state_dict(state)
    return run


def _check(run_dir: Path, score) -> dict:
    """The reconstruction of CHECK from TRACKED against the tracked CHECK copy (the last snapshots): the weights'
    distance relative to the distance between the two tracked profiles, the profile error, and both scores."""
    from safetensors.torch import load_file

    from difflab.training.phema import list_snapshots, plan_reconstruction, reconstruct, snapshot_path

    last = max(snap.step for snap in list_snapshots(run_dir))
    tracked = {s: load_file(snapshot_path(run_dir, last, s)) for s in (*TRACKED, CHECK)}
    rebuilt = reconstruct(run_dir, CHECK, from_stds=TRACKED)

    def dist(a: dict, b: dict) -> float:
        return float(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a if a[k].is_floating_point()) ** 0.5)

    return {"weight_error": dist(rebuilt, tracked[CHECK]) / dist(*(tracked[s] for s in TRACKED)),
            "profile_error": plan_reconstruction(run_dir, CHECK, from_stds=TRACKED).error,
            "score_tracked": score(_with_state(Run.load(run_dir), tracked[CHECK])),
            "score_rebuilt": score(_with_state(Run.load(run_dir), rebuilt))}


def _scorer(study: Study, data: str, d: dict):
    """A function of a run -> its samples' score: the Dino's MMD, or the digits' classifier Frechet distance."""
    ds = get_dataset(data)
    if data == "dino":
        from difflab.metrics import mmd

        ref = ds.eval_data()
        return lambda run: float(mmd(_samples(run, d), ref))
    from difflab.metrics.classifier import ClassifierFeatures, classifier_for
    from difflab.metrics.features import default_cache
    from difflab.metrics.frechet import feature_statistics, frechet_distance

    # the classifier 'difflab fid --features classifier:digits' uses (trained once, kept in $DIFFLAB_CACHE)
    features = ClassifierFeatures(classifier_for("digits", default_cache() / "classifiers"))
    ref = feature_statistics(features.extract(ds.train_data().float()))

    def fd(run: Run) -> float:
        x = _samples(run, d).float().clamp(-1, 1)
        return float(frechet_distance(*feature_statistics(features.extract(x)), *ref))

    return fd


def _samples(run: Run, d: dict) -> torch.Tensor:
    with torch.no_grad():
        return run.sample(d["n"], seed=0, sampler=d["sampler"], steps=d["sampler_steps"])[0]


def render(r: dict) -> str:
    lines = ["# Post-hoc EMA (EDM2)", "",
             f"One DSM training run per data set tracks the power-function EMA profiles sigma_rel "
             f"{', '.join(f'{x:g}' for x in r['tracked'])} (and {r['check_std']:g}, to check the reconstruction) "
             "beside the fixed EMA (decay 0.999). After training, the EMA of each length below is rebuilt from "
             "the first two profiles' snapshots and scored (lower is better).", ""]
    for row in r["rows"]:
        s = r["settings"][row["data"]]
        lines += [f"**{row['data']}**: {row['metric']}, {s['steps']:,} steps, {s['n']:,} samples.", "",
                  table(["EMA", "score"], [["raw weights (no EMA)", pm(row["raw"])],
                                           ["fixed EMA (0.999)", pm(row["fixed"])],
                                           *[[f"post-hoc sigma_rel {k}", pm(v)] for k, v in row["by_std"].items()],
                                           [f"best post-hoc (sigma_rel {', '.join(f'{x:g}' for x in row['best_std'])})",
                                            pm(row["best"])]]), ""]
        c = row["check"]
        lines += [f"Reconstruction of sigma_rel {r['check_std']:g} from the two tracked profiles: weights within "
                  f"{sci(c['weight_error']['mean'])} of the distance between the tracked profiles (profile error "
                  f"{sci(c['profile_error']['mean'])}); score {sci(c['score_rebuilt']['mean'], 4)} rebuilt vs "
                  f"{sci(c['score_tracked']['mean'], 4)} tracked.", "",
                  f"![{row['data']}]({r['figures'][row['data']]})", ""]
    lines += [f"Total wall time of this study run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
