"""The flow-matching study on the Dino.

Trains DSM (the DDPM eps loss, the reference) and the flow-matching family with an equal budget per seed: fm
(rectified flow), fm-ot (minibatch OT pairing within blocks of 256 rows, OT-CFM's batch size: the exact assignment
over all 1,024 rows costs 15x a step), fm-stf (stable velocity targets over 4,096 references, StableVM's idea) and
fm-sa2 (SA-2 on the flow-Euler grid). Measures, per model and seed, the MMD of 2,000 samples
against fresh data:

- DDPM-1000 (every model through its denoiser: the DDPM-1000-equivalent of the CDL study);
- few steps at equal network calls: flow-Euler 5/10/20/50/100 and flow-Heun (2N - 1 calls) for the flow models,
  DDIM and DPM-Solver++ 2M for DSM (OT-CFM's claim: straighter paths need fewer steps);
- parallel flow-Euler-100 (Picard, tol 0.1): sweeps, NFE and the distance to its sequential twin;
- MMD during training (flow-Euler-50 on kept checkpoints): StableVM's claim, fm-stf faster than fm;
- straightness of the learned ODE paths, S = mean_j |(x_1 - x_0) - v(x_{t_j}, t_j)|^2 along flow-Euler-100 paths
  (0 for straight paths; Liu et al.'s measure), beside the exact Dino field's;
- the target variance of plain flow matching, V_FM(t) = E|u - v*|^2, and of the stable velocity target with n
  references, from the exact Dino mixture (the STF variance study on the flow path).
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import get_dataset
from difflab.denoisers import flow_velocity
from difflab.metrics import mmd, pathwise_distance
from difflab.plots import line_plot, small_multiples
from difflab.runs import Run
from difflab.schedules import flow_times
from difflab.studies.cache import Study, Units, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.labels import OBJECTIVE_LABELS
from difflab.studies.measures import loss_curve
from difflab.studies.report import fmt, mean_std, pm, sci, table

OBJECTIVES = ("dsm", "fm", "fm-ot", "fm-stf", "fm-sa2")
QUICK_OBJECTIVES = OBJECTIVES
CONFIG = {"dsm": ['objective.name="dsm"'],
          "fm": ['objective.name="fm"'],
          "fm-ot": ['objective.name="fm"', "objective.options.ot=true", "objective.options.ot_block=256"],
          "fm-stf": ['objective.name="stf"', 'objective.options.base="fm"', "objective.options.reference_size=4096"],
          "fm-sa2": ['objective.name="sa"', 'objective.options.grid="flow"', "objective.options.K=2",
                     "objective.options.lam=1.0"]}
LABELS = {k: OBJECTIVE_LABELS[k] for k in OBJECTIVES}
FULL = {"steps": 6000, "n_samples": 2000, "n_ref": 8000, "snapshots": 10, "nfe_counts": [5, 10, 20, 50, 100],
        "picard_steps": 100, "picard_tol": 0.1, "straight_steps": 100, "n_straight": 1000,
        "variance_t": [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95], "variance_n": [64, 1024],
        "variance_rows": 400}
QUICK = {**FULL, "steps": 3000}


DDPM_STEPS = 1000  # the DDPM row's steps (settings["ddpm_steps"] overrides it: tests)


def settings(opts: StudyOptions) -> dict:
    return {**(QUICK if opts.quick else FULL), **opts.overrides}


def is_flow(obj: str) -> bool:
    return obj.startswith("fm")



def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES, QUICK_OBJECTIVES if opts.quick else OBJECTIVES, ["ddpm"])
    s = settings(opts)
    study = Study("flow", opts)
    study.pin_settings(s)
    s = {"ddpm_steps": DDPM_STEPS, **s}
    ds = get_dataset("dino")
    ref = ds.eval_data(s["n_ref"])
    floor = study.cached("floor", lambda: mean_std(mmd(ds.sample(s["n_samples"], 100 + i), ref) for i in range(5)),
                         what=f"real-vs-real MMD floor (5 draws of {s['n_samples']:,} points)")
    u = Units()
    for obj in opts.objectives:
        _objective_units(study, obj, ref, s, u)
    exact = study.cached("straight-exact", lambda: straightness(ds.denoiser(), s),
                         what="straightness of the exact Dino field")
    variance = study.cached("variance", lambda: target_variance(ds.denoiser(), s),
                            what="flow-matching and stable-velocity target variance (exact Dino mixture)")
    few_mean = {o: _mean_few(v) for o, v in u.few.items()}
    prog = {o: _mean_curve(v) for o, v in u.progress.items()}
    figs = _figures(study, s, u, ref, floor, few_mean, prog, exact, variance)
    st_mean = {o: mean_std(x["S"] for x in v) for o, v in u.straight.items()}
    results = {"settings": s, "floor": floor, "rows": u.rows, "few_steps": few_mean, "mmd_vs_step": prog,
               "straightness": {"exact": exact["S"], **{o: v for o, v in st_mean.items()}},
               "variance": variance, "figures": figs, "wall_time_s": study.elapsed()}
    return write_outputs(study, results, render)


def _objective_units(study: Study, obj: str, ref: torch.Tensor, s: dict, u: Units) -> None:
    """Train and measure every seed of objective ``obj``: MMD of DDPM samples, at few steps, during training, and
    for a flow model of parallel flow-Euler and the straightness of its paths; add its rows to ``u``."""
    per = {"ddpm": [], "picard": []}
    for seed in range(study.opts.seeds):
        key = f"{obj}-s{seed}"
        run_dir = _train(study, obj, seed, s)
        u.losses.setdefault(LABELS[obj], {})[f"seed {seed}"] = loss_curve(run_dir)
        per["ddpm"].append(study.cached(f"ddpm-{key}",
                                        lambda r=run_dir: _mmd_of(r, "ddpm", {"steps": s["ddpm_steps"]}, ref, s),
                                        what=f"MMD of DDPM-{s['ddpm_steps']} samples"))
        u.few.setdefault(obj, []).append(study.cached(f"few-{key}", lambda r=run_dir, o=obj: _few(r, o, ref, s),
                                                      what=f"MMD at {s['nfe_counts']} network calls"))
        u.progress.setdefault(obj, []).append(study.cached(
            f"progress-{key}", lambda r=run_dir, o=obj: _progress(r, o, ref, s),
            what="MMD during training (kept checkpoints)"))
        if is_flow(obj):
            per["picard"].append(study.cached(f"picard-{key}", lambda r=run_dir: _picard(r, ref, s),
                                              what=f"parallel flow-Euler-{s['picard_steps']}"))
            u.straight.setdefault(obj, []).append(study.cached(
                f"straight-{key}", lambda r=run_dir: straightness(Run.load(r).denoiser, s),
                what="straightness of flow-Euler paths"))
        if seed == 0:
            x, _ = Run.load(run_dir).sample(s["n_samples"], 0, _sampler(obj), steps=20, local=True)
            u.panels[obj] = x
    u.rows.append({"objective": obj, "sampler": f"DDPM-{s['ddpm_steps']}",
                   "mmd": mean_std(x["mmd"] for x in per["ddpm"]), "nfe_per_sample": s["ddpm_steps"]})
    if per["picard"]:
        u.rows.append({"objective": obj, "sampler": f"parallel flow-Euler-{s['picard_steps']}, tol "
                                                    f"{s['picard_tol']:g}",
                       "mmd": mean_std(x["mmd"] for x in per["picard"]),
                       "iterations": _mean(x["iterations"] for x in per["picard"]),
                       "mean_sweeps": _mean(x["mean_sweeps"] for x in per["picard"]),
                       "nfe_per_sample": _mean(x["nfe_per_sample"] for x in per["picard"]),
                       "distance_mean": _mean(x["distance"]["mean"] for x in per["picard"])})


def _figures(study: Study, s: dict, u: Units, ref: torch.Tensor, floor: dict, few_mean: dict, prog: dict,
             exact: dict, variance: dict) -> dict:
    """Draw the study's figures into its folder; returns {name: file}."""
    seeds = study.opts.seeds
    figs = {"few": "fig_mmd_vs_nfe.png", "progress": "fig_mmd_vs_step.png", "variance": "fig_variance.png",
            "straight": "fig_straightness.png", "loss": "fig_loss.png", "samples": "fig_samples.png"}
    line_plot({f"{LABELS[o]}, {name}": (x["nfe"], x["mmd"]) for o, per in few_mean.items() for name, x in per.items()},
              study.out / figs["few"], "network calls per sample", "MMD", logy=True,
              title=f"MMD against network calls (mean over {seeds} seed(s))",
              hlines={"real-vs-real floor spread (std; MMD is unbiased: the floor's mean is ~0)": floor["std"]})
    line_plot({LABELS[o]: (v["step"], v["mmd"]) for o, v in prog.items()}, study.out / figs["progress"],
              "training step", "MMD (EMA weights; flow-Euler-50, DSM: DDIM-50)", logy=True,
              title=f"MMD during training (mean over {seeds} seed(s))")
    line_plot({**{"V_FM (n = 1)": (variance["t"], variance["fm"])},
               **{f"V_stable, n = {n}": (variance["t"], v) for n, v in variance["stable"].items()}},
              study.out / figs["variance"], "t", "E |target - v*|^2", logy=True,
              title="Target variance on the Dino (exact mixture)")
    times = flow_times(s["straight_steps"])[:-1].tolist()  # the paths' times, from 1 (noise) down
    line_plot({LABELS[o]: (times, [sum(x["per_t"][j] for x in v) / len(v) for j in range(len(times))])
               for o, v in u.straight.items()} | {"exact Dino field": (times, exact["per_t"])},
              study.out / figs["straight"], "t (1: noise, 0: data)", "|(x_1 - x_0) - v(x_t, t)|^2",
              logy=True, title="Straightness along the ODE paths (0: straight)")
    small_multiples(u.losses, study.out / figs["loss"], "training step", "loss (log-interval mean)")
    _samples_figure(u.panels, ref[: s["n_samples"]], study.out / figs["samples"])
    return figs


def _sampler(obj: str) -> str:
    """The few-step sampler of a model's figures: flow-Euler for a flow model, DDIM for DSM."""
    return "flow-euler" if is_flow(obj) else "ddim"


def _train(study: Study, obj: str, seed: int, s: dict) -> Path:
    steps = study.budget(['data.name="dino"', *CONFIG[obj]], obj, s["steps"])
    k = s.get("snapshots", 0)
    keep = [f"train.ckpt_every={max(1, steps // k)}", "train.keep_checkpoints=100000"] if k else []
    return study.train_run(f"{obj}-s{seed}", ['data.name="dino"', *CONFIG[obj], f"train.seed={seed}",
                                              f"train.steps={steps}", *keep, *s.get("train_overrides", [])])


def _mmd_of(run_dir: Path, sampler: str, options: dict, ref: torch.Tensor, s: dict) -> dict:
    x, st = Run.load(run_dir).sample(s["n_samples"], 0, sampler, local=True, **options)
    return {"mmd": mmd(x, ref), "nfe_per_sample": st.nfe_per_sample}


def _few(run_dir: Path, obj: str, ref: torch.Tensor, s: dict) -> dict:
    """{sampler: {"nfe", "mmd"}} at each budget of network calls (Heun: the largest 2N - 1 within it)."""
    run = Run.load(run_dir)
    names = ("flow-euler", "flow-heun") if is_flow(obj) else ("ddim", "dpmpp-2m")
    out = {}
    for name in names:
        nfe, vals = [], []
        for n in s["nfe_counts"]:
            steps = max(1, (n + 1) // 2) if name == "flow-heun" else n
            x, st = run.sample(s["n_samples"], 0, name, steps=steps, local=True)
            nfe.append(st.nfe_per_sample)
            vals.append(mmd(x, ref))
        out[name] = {"nfe": nfe, "mmd": vals}
    return out


def _progress(run_dir: Path, obj: str, ref: torch.Tensor, s: dict) -> dict:
    from difflab.training.checkpoint import list_checkpoints

    steps, vals = [], []
    for ck in list_checkpoints(run_dir):
        run = Run.load(ck)
        x, _ = run.sample(s["n_samples"], 0, _sampler(obj), steps=50, local=True)
        steps.append(run.step)
        vals.append(mmd(x, ref))
    return {"step": steps, "mmd": vals}


def _picard(run_dir: Path, ref: torch.Tensor, s: dict) -> dict:
    run = Run.load(run_dir)
    steps = s["picard_steps"]
    x, st = run.sample(s["n_samples"], 0, "picard-flow-euler", steps=steps, parallel={"tol": s["picard_tol"]},
                       local=True)
    twin, _ = run.sample(s["n_samples"], 0, "flow-euler", steps=steps, local=True)
    return {"mmd": mmd(x, ref), "iterations": st.iterations, "mean_sweeps": st.extra["mean_sweeps"],
            "nfe_per_sample": st.nfe_per_sample,
            "distance": pathwise_distance(x, twin, float(ref.std()))}


@torch.no_grad()
def straightness(denoiser, s: dict) -> dict:
    """S = mean_j E|(x_1 - x_0) - v(x_{t_j}, t_j)|^2 along flow-Euler paths of ``straight_steps`` steps from
    ``n_straight`` noise draws (x_1 the noise, x_0 the path's end): 0 when every path is a straight line. Also the
    per-step values (t from 1 down)."""
    from difflab.samplers import draw_noise

    n = s["straight_steps"]
    t = flow_times(n)
    x = draw_noise(0, range(s["n_straight"]), (2,), n, False, torch.float64).x_T
    x1, vs = x.clone(), []
    for j in range(n):
        v = flow_velocity(denoiser, x, t[j].to(x.dtype))
        vs.append(v)
        x = x + (t[j + 1] - t[j]) * v
    per_t = [float(((x1 - x - v) ** 2).sum(1).mean()) for v in vs]
    return {"S": sum(per_t) / n, "per_t": per_t}


@torch.no_grad()
def target_variance(exact, s: dict) -> dict:
    """E|target - v*(x_t, t)|^2 at each t for the plain conditional target u = n - x0 (flow matching) and for the
    stable velocity target with n references (the row's own point and n - 1 fresh draws), from the exact mixture."""
    from difflab.objectives.stf import stf_target

    g = torch.Generator().manual_seed(0)
    R = s["variance_rows"]
    fm, stable = [], {n: [] for n in s["variance_n"]}
    for t in s["variance_t"]:
        sig = t / (1 - t)
        x0 = exact.sample(R, g)
        x = x0 + sig * torch.randn(R, 2, generator=g, dtype=torch.float64)
        best = exact(x, sig)
        fm.append(float((((x0 - best) / t) ** 2).sum(1).mean()))
        for n in s["variance_n"]:
            refs = exact.sample(R * (n - 1), g).reshape(R, n - 1, 2)
            T = torch.cat([stf_target(x[r:r + 1], torch.tensor([sig], dtype=torch.float64),
                                      torch.cat([x0[r:r + 1], refs[r]])) for r in range(R)])
            stable[n].append(float((((T - best) / t) ** 2).sum(1).mean()))
    return {"t": list(s["variance_t"]), "fm": fm, "stable": stable}


def _samples_figure(panels: dict, ref: torch.Tensor, path: Path) -> None:
    from difflab.plots import sample_grid

    objs = list(panels)
    sample_grid({(o, "s"): x for o, x in panels.items()}, objs, ["s"], ref, path, row_labels=LABELS,
                col_labels={"s": "flow-Euler-20 (DSM: DDIM-20)"}, titles={})


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _mean_few(units: list[dict]) -> dict:
    return {k: {"nfe": units[0][k]["nfe"], "mmd": [sum(u[k]["mmd"][i] for u in units) / len(units)
                                                   for i in range(len(units[0][k]["nfe"]))]} for k in units[0]}


def _mean_curve(curves: list[dict]) -> dict:
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    return {"step": common, "mmd": [sum(c["mmd"][c["step"].index(k)] for c in curves) / len(curves)
                                    for k in common]}


def few_table(r: dict) -> str:
    counts = r["settings"]["nfe_counts"]
    names = {"flow-euler": "flow-Euler", "flow-heun": "flow-Heun", "ddim": "DDIM", "dpmpp-2m": "DPM-Solver++ 2M"}
    rows = [[LABELS[o], names[k], *(f"{sci(v)} ({n:g})" for v, n in zip(u["mmd"], u["nfe"], strict=True))]
            for o, per in r["few_steps"].items() for k, u in per.items()]
    return table(["objective", "sampler", *(f"{n} calls" for n in counts)], rows)


def mmd_table(r: dict) -> str:
    rows = [[LABELS[row["objective"]], row["sampler"], pm(row["mmd"]), fmt(row.get("iterations")),
             fmt(row.get("mean_sweeps")), fmt(row["nfe_per_sample"]),
             "-" if row.get("distance_mean") is None else sci(row["distance_mean"])] for row in r["rows"]]
    f = r["floor"]
    rows.append(["real vs real (floor)", "5 draws", pm(f), "-", "-", "-", "-"])
    return table(["objective", "sampler", "MMD (mean +- std over seeds)", "Picard iterations", "sweeps / sample",
                  "NFE / sample", "distance to sequential (data std)"], rows)


def render(r: dict) -> str:
    s = r["settings"]
    var = r["variance"]
    lines = [
        "# Flow-matching study (Dino)", "",
        f"Each objective trained for {s['steps']:,} steps per seed, {r['options']['seeds']} seed(s); "
        f"{s['n_samples']:,} samples against {s['n_ref']:,} fresh data points (MMD, b = 0.03).", "",
        "## MMD, DDPM-1000 and parallel flow-Euler", "", mmd_table(r), "",
        "## Few steps: MMD at equal network calls (mean over seeds; the NFE used in brackets)", "", few_table(r), "",
        f"![MMD against network calls]({r['figures']['few']})", "",
        "## Straightness of the ODE paths", "",
        f"S = mean over the flow-Euler-{s['straight_steps']} steps of E|(x_1 - x_0) - v(x_t, t)|^2 along each "
        f"model's own paths from {s['n_straight']:,} noise draws (x_1 the noise, x_0 where the path ends); 0 for "
        "straight paths.", "",
        straightness_table(r), "",
        f"![straightness]({r['figures']['straight']})", "",
        "## Target variance (exact Dino mixture)", "",
        table(["t", "V_FM", *(f"V_stable n = {n}" for n in var["stable"])],
              [[f"{t:g}", sci(var["fm"][i]), *(sci(v[i]) for v in var["stable"].values())]
               for i, t in enumerate(var["t"])]), "",
        f"![target variance]({r['figures']['variance']})", "",
        f"![MMD during training]({r['figures']['progress']})", "", f"![samples]({r['figures']['samples']})", "",
        f"![training loss]({r['figures']['loss']})", "",
        f"Total wall time: {fmt(r['wall_time_s'])} s. Software: "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
    ]
    return "\n".join(lines)


README_START, README_END = "<!-- flow-study:start -->", "<!-- flow-study:end -->"
FIGURES = ("few", "progress", "straight", "variance")  # the figures the README shows, as docs/flow_<name>.png


def straightness_table(r: dict) -> str:
    st = r["straightness"]
    return table(["model", "straightness S (mean +- std over seeds)"],
                 [["exact Dino field (independent coupling)", fmt(st["exact"])]]
                 + [[LABELS[o], pm(v, fmt)] for o, v in st.items() if o != "exact"])


def readme_block(r: dict, source: str = "docs/flow_study.json") -> str:
    """The README's flow-study block (markers included) from the results.json of ``difflab study flow``."""
    seeds = r["options"]["seeds"]
    return "\n".join([
        README_START,
        f"_Generated by `python scripts/flow_results.py RUN` from `{source}` (the results.json of `difflab study "
        f"flow --seeds {seeds} --threads {r['options']['threads']}`, {r['settings']['steps']:,} training steps per "
        "run); do not edit by hand._",
        "",
        mmd_table(r),
        "",
        "MMD at equal network calls per sample (mean over seeds; the calls used in brackets):",
        "",
        few_table(r),
        "",
        straightness_table(r),
        "",
        "![MMD against network calls](docs/flow_few.png) ![MMD during training](docs/flow_progress.png)",
        "![straightness](docs/flow_straight.png) ![target variance](docs/flow_variance.png)",
        README_END,
    ])
