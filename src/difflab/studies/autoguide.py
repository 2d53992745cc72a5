"""The autoguidance study on the Dino (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of
itself").

A DSM model (the default run: MLP, 6,000 steps) is guided by a worse model of the same data, D_w = (1 + W) D -
W D_guide (EDM2's guidance is 1 + W; W = 0 is no guidance), with two guides:

- ``early``: its own checkpoint at a fifth of the steps (kept for this: train.ckpt_every is that step), loaded as
  ``RUN@STEP``. It costs no training, and its errors are the main model's own, less trained.
- ``small``: a separate run of half the width trained for a fifth of the steps: EDM2's recipe, whose guides are both
  smaller and less trained (the 2-D toy's guide is half as wide, an eighth as trained); the paper finds that the two
  degradations add up.

MMD of the samples of DDPM-1000 and EDM Heun-18 (deterministic) without guidance and with each guide at W = 0.5, 1,
2, over --seeds training seeds, beside each guide's own MMD and the real-vs-real floor; a figure of MMD against W.
Two nearest-neighbour measures say what the guidance does to the samples: the share of them *off the data* (farther
than 0.1 from every reference point; real draws: none) and the *reach*, the mean distance from a reference point to
its nearest sample (how well the samples cover the data).
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.config import load_config
from difflab.data import get_dataset
from difflab.errors import require
from difflab.metrics import mmd
from difflab.plots import line_plot
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.labels import sampler_label
from difflab.studies.report import fmt, mean_std, pm, table

GUIDES = ("early", "small")
FULL = {"steps": 6000, "guide_fraction": 0.2, "small_width": 0.5, "guides": list(GUIDES),
        "weights": [0.5, 1.0, 2.0], "n_samples": 2000, "n_ref": 8000, "floor_draws": 5, "chain": {},
        "off_data": 0.1}
QUICK = {**FULL, "steps": 3000, "n_samples": 1000, "floor_draws": 3}


def run(opts: StudyOptions) -> Path:
    opts.validate(("dsm",), ("dsm",), ("ddpm", "heun"))
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    for g in s["guides"]:
        require(g in GUIDES, f"unknown guide {g!r}: use {', '.join(GUIDES)}")
    study = Study("autoguide", opts)
    study.pin_settings(s)
    ds = get_dataset("dino")
    ref = ds.eval_data(s["n_ref"])
    floor = study.cached("floor", lambda: mean_std(mmd(ds.sample(s["n_samples"], 100 + i), ref)
                                                   for i in range(s["floor_draws"])),
                         what=f"real-vs-real MMD floor ({s['floor_draws']} draws of {s['n_samples']:,} points)")
    real = study.cached("real-near", lambda: _near(ds.sample(s["n_samples"], 100), ref, s["off_data"]),
                        what="off-data share and reach of real draws")
    per_seed, labels, guides = [], {}, {}
    for seed in range(opts.seeds):
        units, guides = _seed_units(study, seed, s, ref, labels)
        per_seed.append(units)
    rows = _rows(per_seed, labels, s)
    figs = {"mmd_vs_w": "fig_mmd_vs_guidance.png"}
    study.log("figure: MMD against the autoguidance weight")
    _figure(study.out / figs["mmd_vs_w"], rows, guides, s, floor, opts.seeds)
    return write_outputs(study, {"settings": s, "floor": floor, "real": real, "guides": guides, "rows": rows,
                                 "figures": figs, "wall_time_s": study.elapsed()}, render)


def _seed_units(study: Study, seed: int, s: dict, ref: torch.Tensor, labels: dict) -> tuple[dict, dict]:
    """Train seed ``seed``'s main run and guides; the measures (:func:`_near` and the MMD) of every (sampler, guide,
    W) and of each guide alone, ``{sampler: {"none": m, guide: {"alone": m, "w": [m per W]}}}``, and the guides'
    descriptions."""
    base = ['data.name="dino"', 'objective.name="dsm"', f"train.seed={seed}"]
    extra = list(s.get("train_overrides", []))
    steps = study.budget(base, "dsm", s["steps"])
    guide_step = max(1, round(steps * s["guide_fraction"]))
    main = study.train_run(f"dsm-s{seed}", [*base, f"train.steps={steps}", f"train.ckpt_every={guide_step}",
                                            "train.keep_checkpoints=100000", *extra])
    specs, about = {}, {}
    if "early" in s["guides"]:
        specs["early"] = f"{main}@{guide_step}"  # (RUN@STEP: the checkpoint the main run kept for it)
        about["early"] = {"label": f"early checkpoint (step {guide_step:,} of {steps:,})", "step": guide_step,
                          "steps": steps}
    if "small" in s["guides"]:
        width = max(1, round(load_config(overrides=[*base, *extra]).model.width * s["small_width"]))
        specs["small"] = str(study.train_run(f"small-s{seed}", [*base, f"train.steps={guide_step}", *extra,
                                                                f"model.width={width}"]))
        about["small"] = {"label": f"small run (width {width}, {guide_step:,} steps)", "width": width,
                          "steps": guide_step}

    def score(key: str, run, sampler: str, guide: dict | None = None) -> dict:
        options = {**(s["chain"].get(sampler) or {}), **(guide or {})}
        x, st = study.sample(key, run, sampler, s["n_samples"], seed=0, chain_overrides=options)
        labels[sampler] = sampler_label(sampler, st["steps"])
        m = study.cached(f"mmd-{key}", lambda: {"mmd": mmd(x, ref)}, what=f"MMD against {s['n_ref']:,} reference "
                                                                         "points")
        return {**m, **study.cached(f"near-{key}", lambda: _near(x, ref, s["off_data"]))}

    units = {}
    for sampler in study.opts.samplers:
        units[sampler] = {"none": score(f"dsm-s{seed}-{sampler}", main, sampler)}
        for g, spec in specs.items():
            units[sampler][g] = {
                "alone": score(f"{g}-s{seed}-{sampler}", spec, sampler),
                "w": [score(f"dsm-s{seed}-{sampler}-{g}-w{w:g}", main, sampler, {"guide_with": spec, "guidance": w})
                      for w in s["weights"]]}
    return units, about


def _near(x: torch.Tensor, ref: torch.Tensor, radius: float) -> dict:
    """The share of samples x farther than ``radius`` from every reference point (``off_data``) and the mean
    distance from a reference point to its nearest sample (``reach``)."""
    return {"off_data": float((_nearest(x, ref) > radius).double().mean()), "reach": float(_nearest(ref, x).mean())}


def _nearest(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each point of a's distance to its nearest point of b (float64, in chunks of a's rows)."""
    b = b.double()
    return torch.cat([torch.cdist(a[i:i + chunk].double(), b).min(1).values for i in range(0, len(a), chunk)])


def _rows(per_seed: list[dict], labels: dict, s: dict) -> list[dict]:
    """One row per (sampler, guide, W), the unguided one first, and one per guide alone (:func:`_row`)."""
    rows = []
    for sampler in per_seed[0]:
        none = [u[sampler]["none"] for u in per_seed]
        head = {"sampler": sampler, "label": labels[sampler]}
        rows.append(_row({**head, "guide": None, "guidance": 0.0}, none, none))
        for g in (k for k in per_seed[0][sampler] if k != "none"):
            rows += [_row({**head, "guide": g, "guidance": w}, [u[sampler][g]["w"][i] for u in per_seed], none)
                     for i, w in enumerate(s["weights"])]
            rows.append(_row({**head, "guide": g, "guidance": None, "alone": True},
                             [u[sampler][g]["alone"] for u in per_seed], none))
    return rows


def _row(head: dict, units: list[dict], none: list[dict]) -> dict:
    """``head`` with the MMD over the seeds, the mean over the seeds of each seed's MMD over its unguided one
    (``none``), and the means of the off-data share and the reach."""
    return {**head, "mmd": mean_std(u["mmd"] for u in units),
            "over_unguided": sum(u["mmd"] / b["mmd"] for u, b in zip(units, none, strict=True)) / len(units),
            "off_data": mean_std(u["off_data"] for u in units)["mean"],
            "reach": mean_std(u["reach"] for u in units)["mean"]}


def _figure(path: Path, rows: list[dict], guides: dict, s: dict, floor: dict, seeds: int) -> None:
    """MMD against W: one line per (sampler, guide), from the unguided MMD at W = 0."""
    series = {}
    for r in rows:
        if r["guide"] is None or r.get("alone"):
            continue
        name = f"{r['label']}, {guides[r['guide']]['label']}"
        if name not in series:
            none = next(x for x in rows if x["sampler"] == r["sampler"] and x["guide"] is None)
            series[name] = ([0.0], [none["mmd"]["mean"]])
        series[name][0].append(r["guidance"])
        series[name][1].append(r["mmd"]["mean"])
    line_plot(series, path, "autoguidance weight W (EDM2's guidance: 1 + W)", "MMD", logy=True,
              title=f"Dino, DSM guided by a worse model (mean over {seeds} seed(s))",
              hlines={"real-vs-real MMD, mean + std": max(floor["mean"] + floor["std"], 1e-6)})


def render(r: dict) -> str:
    s, o, g = r["settings"], r["options"], r["guides"]
    lines = [
        "# Autoguidance on the Dino", "",
        f"A DSM model trained {s['steps']:,} steps on the Dino, {o['seeds']} seed(s), sampled with autoguidance "
        "D_w = (1 + W) D - W D_guide (Karras et al. 2024; EDM2's guidance is 1 + W, W = 0 is no guidance) by a "
        "worse model of the same data:", ""]
    lines += [f"- **{k}**: {v['label']}" for k, v in g.items()]
    lines += ["", f"MMD of {s['n_samples']:,} samples against {s['n_ref']:,} reference points (real-vs-real floor "
              f"{pm(r['floor'])}); */ unguided*: the mean over the seeds of each seed's MMD over its unguided MMD "
              f"(below 1: guidance helped); *off data*: the share of samples farther than {s['off_data']:g} from "
              f"every reference point (real draws: {fmt(r['real']['off_data'])}); *reach*: the mean distance from a "
              f"reference point to its nearest sample (real draws: {fmt(r['real']['reach'])}; larger: parts of the "
              "data left uncovered). The guide-alone rows are the guide's own samples.", ""]
    lines.append(table(["sampler", "guide", "W", "MMD", "/ unguided", "off data", "reach"],
                       [[x["label"], "-" if x["guide"] is None else x["guide"],
                         "guide alone" if x.get("alone") else f"{x['guidance']:g}", pm(x["mmd"]),
                         fmt(x["over_unguided"]), fmt(x["off_data"]), fmt(x["reach"])] for x in r["rows"]]))
    lines += ["", f"![MMD against the guidance weight]({r['figures']['mmd_vs_w']})", "",
              f"Total wall time of this study run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
