"""The report of a comparison, built from its finished units alone (``OUT/units/*.json``), so it can be rebuilt at any
time (``difflab compare --out DIR --report``) and is the same whichever executor ran the units.

results.json holds every number; report.md is rendered from it: a ranking per sampler (mean +- std over seeds, the
range, and a paired t-test against the best, :mod:`~difflab.studies.paired`), the cost of each row, the few-step rows
and the training curves, beside the real-vs-real floor.
"""

from __future__ import annotations

import json
from pathlib import Path

from difflab.errors import require
from difflab.studies.few_steps import LABELS as FEW_LABELS
from difflab.studies.few_steps import budgets, few_steps_table, mean_few
from difflab.studies.paired import paired_test, verdict
from difflab.studies.report import fmt, mean_std, pm, table


def unit_path(out: Path, key: str) -> Path:
    """Where unit ``key`` of the comparison in ``out`` writes its result."""
    return Path(out) / "units" / f"{key}.json"


def read_plan(out: Path) -> dict:
    """The plan of the comparison in ``out`` (its settings, variants and units)."""
    path = Path(out) / "plan.json"
    require(path.is_file(), f"{out} holds no comparison (no plan.json): run difflab compare --data ... --out {out}")
    return json.loads(path.read_text())


def gather(out: Path) -> tuple[dict, dict, dict]:
    """(plan, judge record, {key: unit result}) of a comparison; every planned unit must be finished."""
    p = read_plan(out)
    missing = [u["key"] for u in p["units"] if not unit_path(out, u["key"]).exists()]
    require(not missing, f"{len(missing)} of {len(p['units'])} units of {out} are not finished "
                         f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): run the same difflab "
                         "compare command again to finish them (finished units are kept)")
    judge = json.loads((Path(out) / "cache" / "judge" / "judge.json").read_text())
    return p, judge, {u["key"]: json.loads(unit_path(out, u["key"]).read_text()) for u in p["units"]}


def results(p: dict, judge: dict, units: dict) -> dict:
    """Every number of the report, from the plan, the judge and the units."""
    s = p["settings"]
    by_variant = {v["name"]: [units[f"{v['name']}-s{k}"] for k in range(p["seeds"])] for v in p["variants"]}
    labels = {v["name"]: v["label"] for v in p["variants"]}
    rows, ranking = [], {}
    for sampler in s["samplers"]:
        per = {name: [u["samplers"][sampler]["value"] for u in us] for name, us in by_variant.items()}
        for name, us in by_variant.items():
            rows.append({"variant": name, "label": labels[name], "sampler": sampler,
                         "sampler_label": us[0]["samplers"][sampler]["label"], "value": mean_std(per[name]),
                         "nfe_per_sample": _mean(u["samplers"][sampler]["nfe_per_sample"] for u in us),
                         "wall_time_s": _mean(u["samplers"][sampler]["wall_time_s"] for u in us)})
        order = sorted(per, key=lambda name: sum(per[name]) / len(per[name]))
        best = order[0]
        ranking[sampler] = [{"rank": i + 1, "variant": name, "label": labels[name], "value": mean_std(per[name]),
                             "vs_best": None if name == best else paired_test(per[best], per[name])}
                            for i, name in enumerate(order)]
    return {"study": "compare", "data": s["data"], "settings": s, "seeds": p["seeds"], "variants": p["variants"],
            "judge": judge, "rows": rows, "ranking": ranking,
            "few_steps": {name: mean_few([u["few_steps"] for u in us]) for name, us in by_variant.items()},
            "curves": {name: _mean_curve([u["curve"] for u in us]) for name, us in by_variant.items()},
            "losses": {name: {f"seed {u['seed']}": [u["loss"]["step"], u["loss"]["loss"]] for u in us}
                       for name, us in by_variant.items()},
            "units": {k: {"steps": u["steps"], "threads": u["threads"]} for k, u in units.items()}}


def numbers(r: dict) -> dict:
    """Every number of a comparison's results.json that does not depend on the clock: what any executor, any
    ``--jobs``, must give alike."""
    rows = [{k: v for k, v in row.items() if k != "wall_time_s"} for row in r["rows"]]
    return {"rows": rows, **{k: r[k] for k in ("ranking", "few_steps", "curves", "losses", "judge", "units")}}


def build_report(out: Path, log=None) -> Path:
    """results.json, the figures and report.md of the comparison in ``out``; returns report.md's path."""
    from difflab.studies.cache import versions, write_report

    out = Path(out)
    p, judge, units = gather(out)
    r = results(p, judge, units)
    if log:
        log(f"report: {len(units)} units; figures, results.json and report.md in {out}")
    r["figures"] = figures(out, r)
    r["versions"] = versions()
    return write_report(out, r, render)


def figures(out: Path, r: dict) -> dict:
    """Samples of seed 0 (variant x sampler), the score during training, the losses, the few-step rows."""
    import torch

    from difflab.data import get_dataset
    from difflab.plots import image_panels, line_plot, sample_grid, small_multiples
    from difflab.runs import load_samples

    s, label = r["settings"], r["judge"]["label"]
    names = [v["name"] for v in r["variants"]]
    labels = {v["name"]: v["label"] for v in r["variants"]}
    figs = {"training": "fig_training.png", "loss": "fig_loss.png", "few_steps": "fig_few_steps.png"}
    line_plot({labels[n]: (c["step"], c["value"]) for n, c in r["curves"].items()}, out / figs["training"],
              "training step", f"{label} (DDIM-{s['curve_steps']}, EMA weights)", logy=True,
              title=f"{label} during training (mean over {r['seeds']} seed(s))")
    small_multiples({labels[n]: {k: tuple(v) for k, v in seeds.items()} for n, seeds in r["losses"].items()},
                    out / figs["loss"], "training step", "loss (log-interval mean)")
    few = {}
    for n, per in r["few_steps"].items():
        for sm, v in per.items():
            few.setdefault(FEW_LABELS[sm], {})[labels[n]] = (v["nfe"], v["value"])
    small_multiples(few, out / figs["few_steps"], "network calls per sample", label, logy=True, logx=True)
    panels = {(n, sm): load_samples(out / "samples" / f"{n}-s0-{sm}.npz")[0] for n in names for sm in s["samplers"]}
    cols = {row["sampler"]: row["sampler_label"] for row in r["rows"]}
    titles = {(row["variant"], row["sampler"]): f"{label} {fmt(row['value']['values'][0])}" for row in r["rows"]}
    ds = get_dataset(s["data"])
    if s["images"]:
        figs["samples"] = "fig_samples.png"
        image_panels({k: x[:64] for k, x in panels.items()}, names, list(s["samplers"]), ds.sample(64, seed=0),
                     out / figs["samples"], row_labels=labels, col_labels=cols, titles=titles)
    elif ds.shape == (2,):
        figs["samples"] = "fig_samples.png"
        sample_grid(panels, names, list(s["samplers"]), ds.sample(s["n_samples"], seed=0).to(torch.float64),
                    out / figs["samples"], row_labels=labels, col_labels=cols, titles=titles)
    return figs


def render(r: dict) -> str:
    """report.md from results.json."""
    label, figs = r["judge"]["label"], r["figures"]
    lines = [*_intro(r), "", *rankings(r), "## Every row: score and cost", "", _rows_table(r), ""]
    if "samples" in figs:
        lines += [f"![samples]({figs['samples']})", ""]
    lines += [f"## Few steps: {label} at {budgets(r)} network calls", "",
              "DDIM (eta 0), EDM Heun (2N - 1 calls: the largest N within the budget), DPM-Solver++ 2M, and "
              "flow-Euler / flow-Heun for a flow-matching model; the cell says what each used (in brackets); "
              f"{r['settings']['n_samples']:,} samples, mean over seeds.", "",
              few_steps_table(r["few_steps"], fmt, {v["name"]: v["label"] for v in r["variants"]}), "",
              f"![few steps]({figs['few_steps']})", "",
              "## Training", "", f"![{label} during training]({figs['training']})", "",
              f"![training loss]({figs['loss']})", "",
              "Software: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def rankings(r: dict, level: str = "##") -> list[str]:
    """One section per sampler: the objectives ranked, with their spread and the paired test against the best."""
    lines = []
    for sampler, ranked in r["ranking"].items():
        lines += [f"{level} Ranking by {r['judge']['label']}, {_sampler_label(r, sampler)}", "",
                  _ranking_table(r, ranked), ""]
    return lines


def _intro(r: dict) -> list[str]:
    s, j = r["settings"], r["judge"]
    steps = sorted({u["steps"] for u in r["units"].values()})
    budget = f"{steps[0]:,} steps" if len(steps) == 1 else f"{steps[0]:,} to {steps[-1]:,} steps (a wall-clock budget)"
    metric = {"mmd": "MMD (kernel variance 0.03, in the reference's standardised coordinates)",
              "classifier": "the classifier FD (the Frechet distance in the features of a small classifier trained on "
                            "the set's labels; not an FID)",
              "inception": "the FID (Inception-v3 features)"}[j["features"]]
    threads = sorted({u["threads"] for u in r["units"].values()})
    return [
        f"# Which objective helps on {s['data']}?",
        "",
        f"{len(r['variants'])} objective(s) x {r['seeds']} seed(s), each trained for {budget} (an equal budget) "
        f"with the `{s['arch']}` network at {', '.join(map(str, threads))} thread(s)"
        + (f"; shared overrides: `{' '.join(s['overrides'])}`" if s["overrides"] else "") + ". "
        f"Each run's EMA weights give {s['n_samples']:,} samples per sampler (the same noise for every run), "
        f"scored by {metric} against {j['n_ref']:,} reference {'images' if s['images'] else 'points'}. "
        f"Lower is better; the real-vs-real floor (data against data, {j['floor']['n']} draws) is "
        f"{pm(j['floor'], fmt)}.",
        "",
        "The verdict compares each objective with the best by a paired t-test over seeds (seed k of every "
        "objective shares its initial weights, data order and sampling noise): *within noise* when p >= 0.05; no "
        "correction for the several comparisons is applied. "
        + ("With one seed there is no test: give --seeds 2 or more." if r["seeds"] == 1 else
           f"With {r['seeds']} seeds it has {r['seeds'] - 1} degree(s) of freedom"
           + (", so only differences of a consistent size across seeds pass it." if r["seeds"] < 4 else ".")),
    ]


def _ranking_table(r: dict, ranked: list[dict]) -> str:
    rows = []
    for x in ranked:
        t = x["vs_best"]
        rows.append([str(x["rank"]), x["label"], pm(x["value"], fmt), _span(x["value"]),
                     "-" if t is None else f"{t['diff']:+.3g}", "best" if t is None else verdict(t)])
    floor = r["judge"]["floor"]
    rows.append(["", "real vs real (floor)", pm(floor, fmt), _span(floor), "-", "-"])
    return table(["rank", "objective", f"{r['judge']['label']} (mean +- std)", "min .. max over seeds",
                  "vs best (mean difference)", "paired t-test over seeds"], rows)


def _rows_table(r: dict) -> str:
    return table(["objective", "sampler", r["judge"]["label"], "NFE / sample", "wall time (s)"],
                 [[x["label"], x["sampler_label"], pm(x["value"], fmt), fmt(x["nfe_per_sample"]),
                   fmt(x["wall_time_s"])] for x in r["rows"]])


def _sampler_label(r: dict, sampler: str) -> str:
    return next(x["sampler_label"] for x in r["rows"] if x["sampler"] == sampler)


def _span(stat: dict) -> str:
    v = stat.get("values", [])
    return f"{fmt(min(v))} .. {fmt(max(v))}" if len(v) > 1 else "-"


def _mean(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _mean_curve(curves: list[dict]) -> dict:
    """The mean over seeds at the steps every seed has."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    return {"step": common, "value": [sum(c["value"][c["step"].index(k)] for c in curves) / len(curves)
                                      for k in common]}
