"""The Dino study (the CDL paper's 2-D benchmark).

For each objective and seed: train with an equal budget, then sample 2,000 points with sequential DDPM-1000,
DDIM-50, EDM Heun-18 and parallel Picard DDPM (T = 1000, tol 0.1). Reports MMD (mean +- std over seeds), Picard
iterations, NFE per sample, wall time and the held-out likelihood (ITD estimate), beside the paper's numbers and
the real-vs-real MMD floor; figures: samples (objective x sampler), MMD per Picard iteration, training losses.
Also each model's far-field gain (how its denoiser extrapolates far from the data, where Picard iterates go) beside
the exact Dino denoiser's; ``--samplers ...,picard-ddpm-clip`` adds parallel DDPM with x0_hat clipped to 3.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import get_dataset
from difflab.diagnostics import noise_classification
from difflab.metrics import mmd, pathwise_distance
from difflab.plots import classification_plot, line_plot, sample_grid, small_multiples
from difflab.runs import Run
from difflab.studies.cache import Study, Units, write_outputs
from difflab.studies.common import FLOW_OBJECTIVES, SAMPLERS, STANDARD_SAMPLERS, StudyOptions
from difflab.studies.few_steps import budgets, few_steps, few_steps_table, mean_few
from difflab.studies.labels import OBJECTIVE_LABELS, sampler_label
from difflab.studies.measures import loss_curve, run_nll
from difflab.studies.report import fmt, mean_std, pm, sci, table

OBJECTIVES = ("dsm", "itd", "cdl", "cdl-ft", "edm", "stf", "sa2", "sa3", "sa4", *FLOW_OBJECTIVES)
DEFAULT_OBJECTIVES = ("dsm", "itd", "cdl", "cdl-ft")  # the CDL paper's comparison; edm,stf: STF's; sa2..sa4: SA's
QUICK_OBJECTIVES = ("dsm", "itd", "cdl")
DEFAULT_SAMPLERS = (*STANDARD_SAMPLERS, "picard-ddpm-taa-x0")  # + the fastest parallel variant beside ParaDiGMS
LABELS = OBJECTIVE_LABELS
# CDL paper, Dino, parallel DDPM, T = 1000, tol 0.1, 2,000 samples, no window (the paper's setting)
PAPER = [
    {"model": "DDPM loss (paper)", "sampler": "parallel DDPM-1000", "mmd": 3.11e-3, "iterations": 37,
     "nfe_per_sample": 14397, "wall_time_s": 1.871},
    {"model": "CDL (paper)", "sampler": "parallel DDPM-1000", "mmd": 1.23e-3, "iterations": 36,
     "nfe_per_sample": 13983, "wall_time_s": 1.368},
]
# The level the paper's MMD-per-Picard-iteration curves settle at: for the DDPM-loss model it
# is not its final MMD above (3.4e-3 vs 3.11e-3); CDL's is about its final one (1.2e-3 vs 1.23e-3).
PAPER_PLATEAU = {"DDPM loss (paper)": 3.4e-3, "CDL (paper)": 1.2e-3}


def _sci(v: float) -> str:
    """A paper number as written there: 3.11e-3, 3.4e-3."""
    mantissa, exp = f"{v:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def picard_reference_lines(floor_std: float) -> dict[str, float]:
    """The dashed levels of the MMD-per-Picard-iteration figure, by legend label: each paper model's plateau (its
    label quotes the plateau and the final MMD, both from PAPER / PAPER_PLATEAU) and the real-vs-real floor spread."""
    lines = {}
    for p in PAPER:
        level = PAPER_PLATEAU[p["model"]]
        name = p["model"].removesuffix(" (paper)")
        lines[f"paper, {name}: plateau {_sci(level)}, final MMD {_sci(p['mmd'])}"] = level
    lines["real-vs-real floor spread"] = max(floor_std, 1e-5)
    return lines

# window: the parallel sampler's window (0: the whole chain, the paper's protocol; 250 gives about the same
# iterations and MMD at a third of the CPU time, which keeps the full 3-seed study within an hour on 2 cores)
FULL = {"steps": 6000, "ft_steps": 2000, "ft_lr": 1e-3, "n_samples": 2000, "n_ref": 8000, "n_nll": 2000,
        "n_alpha": 64, "window": 250, "floor_draws": 5, "chain": {}, "n_classify": 500, "snapshots": 10,
        "step_counts": [10, 20, 50, 100, 1000], "nfe_counts": [5, 10, 20],
        "zetas": [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0],
        "far_t": [700, 400, 200, 50], "far_radii": [10.0, 1000.0]}
QUICK = {**FULL, "steps": 3000, "ft_steps": 1000, "window": 100}


def settings(opts: StudyOptions) -> dict:
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    if opts.picard_window is not None:
        s["window"] = opts.picard_window
    return s



def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES, QUICK_OBJECTIVES if opts.quick else DEFAULT_OBJECTIVES, DEFAULT_SAMPLERS)
    s = settings(opts)
    study = Study("dino", opts)
    study.pin_settings(s)
    ds = get_dataset("dino")
    ref = ds.eval_data(s["n_ref"])
    held_out = ds.sample(s["n_nll"], seed=2)

    floor = study.cached("floor", lambda: mean_std(mmd(ds.sample(s["n_samples"], 100 + i), ref)
                                                   for i in range(s["floor_draws"])),
                         what=f"real-vs-real MMD floor ({s['floor_draws']} draws of {s['n_samples']:,} points "
                              f"against {s['n_ref']:,})")
    u = Units()
    for obj in opts.objectives:
        _objective_units(study, obj, ref, held_out, s, u)
    progress = {obj: _mean_curve(v) for obj, v in u.progress.items()}
    by_steps = {obj: {sm: [sum(r[sm][i] for r in v) / len(v) for i in range(len(s["step_counts"]))]
                      for sm in ("ddim", "ddpm")} for obj, v in u.by_steps.items()}
    figs = _figures(study, s, u, floor, ref, progress, by_steps)
    results = {"settings": s, "floor": floor, "rows": u.rows, "nll": u.nll, "paper": PAPER, "figures": figs,
               "picard_mmd_curves": u.curves, "noise_classification": u.classify, "mmd_vs_step": progress,
               "mmd_vs_sampling_steps": by_steps, "few_steps": {obj: mean_few(v) for obj, v in u.few.items()},
               "far_field": {"exact": _far_field(None, s), **{k: _mean_far(v) for k, v in u.far.items()}},
               "wall_time_s": study.elapsed()}
    return write_outputs(study, results, render)


def _objective_units(study: Study, obj: str, ref: torch.Tensor, held_out: torch.Tensor, s: dict, u: Units) -> None:
    """Train and measure every seed of objective ``obj``; add its MMD rows (one per sampler) and likelihood to
    ``u``."""
    per_sampler = {k: [] for k in study.opts.samplers}
    nll_vals = []
    for seed in range(study.opts.seeds):
        run_dir = study.train_objective("dino", obj, seed, s)
        nll_vals.append(_run_units(study, obj, seed, run_dir, ref, held_out, s, u))
        for sampler in study.opts.samplers:
            per_sampler[sampler].append(_sampler_unit(study, obj, seed, run_dir, sampler, ref, s, u))
    for sampler, vals in per_sampler.items():
        u.rows.append(_row(obj, sampler, u.labels[sampler], vals))
    u.nll[obj] = {**mean_std(nll_vals), "bits_per_dim": mean_std(v / (2 * 0.6931471805599453) for v in nll_vals)}


def _run_units(study: Study, obj: str, seed: int, run_dir: Path, ref: torch.Tensor, held_out: torch.Tensor, s: dict,
               u: Units) -> float:
    """The cached units of one trained run that need no study sampler (loss and training curves, MMD against steps
    and at few steps, far-field gain, noise classification for seed 0); returns its held-out -log p (nats)."""
    key = f"{obj}-s{seed}"
    u.losses.setdefault(LABELS.get(obj, obj), {})[f"seed {seed}"] = loss_curve(run_dir)
    u.progress.setdefault(obj, []).append(study.cached(
        f"progress-{key}", lambda r=run_dir: _progress(r, ref, s, study),
        what="MMD during training (DDIM-50 samples from every kept checkpoint)"))
    u.by_steps.setdefault(obj, []).append(study.cached(
        f"steps-{key}", lambda r=run_dir: _by_steps(r, ref, s, study),
        what=f"MMD against sampling steps (DDIM and DDPM with {', '.join(map(str, s['step_counts']))} steps)"))
    u.few.setdefault(obj, []).append(study.cached(
        f"fewsteps-{key}", lambda r=run_dir: few_steps(Run.load(r), lambda xs: mmd(xs, ref), s, study),
        what=f"MMD at {', '.join(map(str, s['nfe_counts']))} network calls (DDIM, Heun, DPM-Solver++ 2M)"))
    unit = study.cached(f"nll-{key}", lambda r=run_dir: run_nll(r, held_out, s["n_alpha"]),
                        what=f"held-out likelihood (ITD estimate, {s['n_nll']:,} points x {s['n_alpha']} "
                             "log-SNR values)")
    u.far.setdefault(obj, []).append(study.cached(f"farfield-{key}", lambda r=run_dir: _far_field(r, s),
                                                  what="far-field gain of the EMA denoiser"))
    if seed == 0:
        u.classify[LABELS.get(obj, obj)] = study.cached(
            f"classify-{key}", lambda r=run_dir: _classify(r, held_out[: s["n_classify"]], s),
            what=f"noise classification ({s['n_classify']:,} held-out points, {len(s['zetas'])} log-SNR "
                 "levels)")
    return unit["nll_nats"]


def _sampler_unit(study: Study, obj: str, seed: int, run_dir: Path, sampler: str, ref: torch.Tensor, s: dict,
                  u: Units) -> dict:
    """One study sampler's samples of a run (cached), their MMD, cost and distance to the sequential twin; seed 0
    also gives the figures their panel and Picard curve."""
    key = f"{obj}-s{seed}"
    x, st = study.sample(
        f"{key}-{sampler}", run_dir, sampler, s["n_samples"], seed=0,
        chain_overrides=s["chain"].get(sampler),
        parallel_overrides={"window": s["window"]} if s["window"] else None,
        callback_mmd=(lambda e: mmd(e, ref)) if seed == 0 else None)
    m = study.cached(f"mmd-{key}-{sampler}", lambda x=x: {"mmd": mmd(x, ref)},
                     what=f"MMD against {s['n_ref']:,} reference points")["mmd"]
    unit = {**{k: st.get(k) for k in ("nfe_per_sample", "wall_time_s", "iterations", "mean_sweeps", "steps")},
            "mmd": m, "distance": _distance(study, key, run_dir, sampler, x, s, float(ref.std()))}
    u.labels[sampler] = sampler_label(sampler, st["steps"])
    if seed == 0:
        u.panels[(obj, sampler)] = x
        u.titles[(obj, sampler)] = f"MMD {sci(m)}"
        if st.get("curve"):
            u.curves[LABELS.get(obj, obj)] = st["curve"]
    return unit


def _row(obj: str, sampler: str, label: str, vals: list[dict]) -> dict:
    """The results row of (objective, sampler) from its per-seed units."""
    return {"objective": obj, "sampler": sampler, "label": label,
            "mmd": mean_std(v["mmd"] for v in vals),
            "iterations": _mean_or_none(v["iterations"] for v in vals),
            "mean_sweeps": _mean_or_none(v.get("mean_sweeps") for v in vals),
            "nfe_per_sample": _mean_or_none(v["nfe_per_sample"] for v in vals),
            "wall_time_s": _mean_or_none(v["wall_time_s"] for v in vals),
            "distance_mean": _mean_or_none((v["distance"] or {}).get("mean") for v in vals),
            "distance_max": max((v["distance"]["max"] for v in vals if v["distance"]), default=None)}


def _figures(study: Study, s: dict, u: Units, floor: dict, ref: torch.Tensor, progress: dict,
             by_steps: dict) -> dict:
    """Draw the study's figures into its folder; returns {name: file} of those drawn."""
    opts = study.opts
    figs = {"samples": "fig_samples.png", "picard_mmd": "fig_picard_mmd.png", "loss": "fig_loss.png",
            "classify": "fig_noise_classification.png", "progress": "fig_mmd_vs_step.png"}
    study.log("figures: samples, MMD per Picard sweep, MMD during training and against sampling steps, noise "
              "classification, losses; far-field gain of the exact denoiser")
    figs["steps"] = "fig_mmd_vs_sampling_steps.png"
    small_multiples({f"{sm.upper()}": {LABELS.get(o, o): (s["step_counts"], v[sm]) for o, v in by_steps.items()}
                     for sm in ("ddim", "ddpm")}, study.out / figs["steps"], "sampling steps", "MMD", logy=True,
                    logx=True)
    line_plot({LABELS.get(k, k): (v["step"], v["mmd"]) for k, v in progress.items()}, study.out / figs["progress"],
              "training step", "MMD (DDIM-50, EMA weights)", logy=True,
              title=f"MMD during training (mean over {opts.seeds} seed(s))")
    classification_plot(u.classify, study.out / figs["classify"])
    sample_grid(u.panels, list(opts.objectives), list(opts.samplers), ref[: s["n_samples"]],
                study.out / figs["samples"], row_labels=LABELS, col_labels=u.labels, titles=u.titles)
    if u.curves:
        line_plot({k: (list(range(1, len(v) + 1)), v) for k, v in u.curves.items()}, study.out / figs["picard_mmd"],
                  "Picard iteration (sweep)", "MMD of the current end points", logy=True,
                  title="MMD per Picard iteration (seed 0)",
                  hlines=picard_reference_lines(floor["std"]))
    else:
        figs.pop("picard_mmd")
    small_multiples(u.losses, study.out / figs["loss"], "training step", "loss (log-interval mean)")
    return figs


def _distance(study: Study, key: str, run_dir: Path, sampler: str, x: torch.Tensor, s: dict, std: float):
    """A parallel sampler's pathwise distance to its sequential twin (same chain, same noise) in data standard
    deviations (mean, median, max over the samples); None for a sequential sampler."""
    if SAMPLERS[sampler][2] is None:
        return None
    name, options, _ = SAMPLERS[sampler]
    overrides = s["chain"].get(sampler) or {}
    twin_key = f"{key}-twin-{name}-" + "-".join(f"{k}{v}" for k, v in sorted({**options, **overrides}.items()))
    return study.cached(f"distance-{key}-{sampler}", lambda: pathwise_distance(
        x, study.twin(twin_key, run_dir, sampler, s["n_samples"], 0, overrides), std),
        what="distance to the sequential twin")


def _mean_or_none(values):
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _bar(study: Study | None, total: int, desc: str, unit: str):
    """The study's progress reporter for a stage (silent without a study)."""
    from difflab.progress import progress

    return study.progress(total, desc, unit) if study is not None else progress(total, desc, unit, enabled=False)


def _progress(run_dir: Path, ref: torch.Tensor, s: dict, study: Study | None = None) -> dict:
    """MMD of DDIM-50 samples from every kept checkpoint of a run (its EMA weights): the training curve."""
    from difflab.training.checkpoint import list_checkpoints

    steps, values = [], []
    checkpoints = list_checkpoints(run_dir)
    with _bar(study, len(checkpoints), f"MMD during training {run_dir.name}", "checkpoint") as bar:
        for ck in checkpoints:
            run = Run.load(ck)
            x, _ = run.sample(s["n_samples"], 0, "ddim", steps=50, local=True)
            steps.append(run.step)
            values.append(mmd(x, ref))
            bar.update(1)
    return {"step": steps, "mmd": values}


def _by_steps(run_dir: Path, ref: torch.Tensor, s: dict, study: Study | None = None) -> dict:
    """MMD of DDIM (eta 0) and DDPM (beta variance) samples with few to many steps: where SA should help most."""
    run = Run.load(run_dir)
    out = {}
    counts = [min(n, run.config.schedule.T) for n in s["step_counts"]]
    with _bar(study, 2 * sum(counts), f"MMD against sampling steps {run_dir.name}", "step") as bar:
        for name in ("ddim", "ddpm"):
            out[name] = []
            for n in counts:
                x, _ = run.sample(s["n_samples"], 0, name, steps=n, callback=lambda j, x: bar.update(1), local=True)
                out[name].append(mmd(x, ref))
    return out


def _far_field(run_dir: Path | None, s: dict) -> dict:
    """Far-field gain ||D(x)|| / ||x|| of a run's EMA denoiser (None: the exact Dino denoiser) at the noise levels
    of DDPM steps ``far_t`` and radii ``far_radii`` (in data standard deviations)."""
    from difflab.diagnostics import far_field_gain
    from difflab.schedules import DDPMSchedule

    abar = DDPMSchedule().abar[s["far_t"]]
    sigmas = ((1 - abar) / abar).sqrt().tolist()
    den = get_dataset("dino").denoiser() if run_dir is None else Run.load(run_dir).denoiser
    return {"t": s["far_t"], **far_field_gain(den, (2,), sigmas, s["far_radii"]).to_dict()}


def _mean_far(units: list[dict]) -> dict:
    """The mean gain over seeds, with the per-seed maxima (the slope that sets how fast far iterates grow)."""
    gains = [torch.tensor(u["gain"]) for u in units]
    return {**units[0], "gain": torch.stack(gains).mean(0).tolist(),
            "max_per_seed": [float(g.max()) for g in gains]}


def _mean_curve(curves: list[dict]) -> dict:
    """The mean over seeds at the steps every seed has."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    return {"step": common, "mmd": [sum(c["mmd"][c["step"].index(k)] for c in curves) / len(curves)
                                    for k in common]}


def _classify(run_dir: Path, x: torch.Tensor, s: dict) -> list[dict]:
    """The implied classifier "clean vs noised to zeta" on held-out points, per zeta (seed 0 of each objective)."""
    return noise_classification(Run.load(run_dir).denoiser, x, s["zetas"], n_alpha=s["n_alpha"])


def span(stat: dict) -> str:
    """'min .. max' of a :func:`mean_std` record's values ('-' for a single value)."""
    v = stat.get("values", [])
    return f"{sci(min(v))} .. {sci(max(v))}" if len(v) > 1 else "-"


def mmd_table(r: dict, wall_time: bool = True, spread: bool = False) -> str:
    """The MMD / cost table of a results.json: every row, the paper's numbers and the floor; ``wall_time=False``
    leaves out the one column that depends on the machine (the README's copy); ``spread`` adds each row's range
    over the seeds."""
    rows = []
    for row in r["rows"]:
        far = "-" if row.get("distance_mean") is None else \
            f"{sci(row['distance_mean'])} / {sci(row['distance_max'])}"
        rows.append([LABELS.get(row["objective"], row["objective"]), row["label"], pm(row["mmd"]), span(row["mmd"]),
                     fmt(row["iterations"]), fmt(row.get("mean_sweeps")), fmt(row["nfe_per_sample"]), far,
                     fmt(row["wall_time_s"])])
    for p in r["paper"]:
        rows.append([p["model"], p["sampler"], sci(p["mmd"]), "-", fmt(p["iterations"]), "-",
                     fmt(p["nfe_per_sample"]), "-", fmt(p["wall_time_s"]) + " (multi-GPU)"])
    floor = r["floor"]
    rows.append(["real vs real (floor)", f"{floor['n']} draws", pm(floor), span(floor), "-", "-", "-", "-", "-"])
    header = ["objective", "sampler", "MMD (mean +- std)", "min .. max over seeds", "Picard iterations",
              "sweeps / sample", "NFE / sample", "distance to sequential (mean / max, data std)", "wall time (s)"]
    keep = [i for i in range(len(header)) if (wall_time or i < len(header) - 1) and (spread or i != 3)]
    return table([header[i] for i in keep], [[row[i] for i in keep] for row in rows])


def nll_table(r: dict) -> str:
    return table(["objective", "-log p (nats, mean +- std over seeds)", "bits/dim"],
                 [[LABELS.get(k, k), pm(v, fmt), pm(v["bits_per_dim"], fmt)] for k, v in r["nll"].items()])


def threads_table(r: dict, other: dict) -> str:
    """Seed 0 of every row ``other`` (the same study at another thread count) shares with ``r``, at both counts, and
    the held-out likelihood."""
    t, u = r["options"]["threads"], other["options"]["threads"]
    mine = {(row["objective"], row["sampler"]): row for row in r["rows"]}
    rows = []
    for row in other["rows"]:
        a, b = mine[row["objective"], row["sampler"]]["mmd"]["values"][0], row["mmd"]["values"][0]
        rows.append([LABELS.get(row["objective"], row["objective"]), row["label"], sci(a), sci(b), f"{b / a:.2f}"])
    for k, v in other["nll"].items():
        a, b = r["nll"][k]["values"][0], v["values"][0]
        rows.append([LABELS.get(k, k), "-log p (nats)", fmt(a), fmt(b), f"{b - a:+.3f} nats"])
    return table(["objective", "MMD of", f"seed 0, {t} thread{'s' * (t != 1)}", f"seed 0, {u} threads",
                  "ratio (difference)"], rows)


README_START, README_END = "<!-- quick-study:start -->", "<!-- quick-study:end -->"


def readme_block(r: dict, other: dict | None = None, source: str = "docs/quick_study.json",
                 other_source: str = "docs/quick_study_threads.json") -> str:
    """The README's quick-study block (markers included) from the results.json of ``difflab study dino --quick``
    (and ``other``, the same study at another thread count): no wall times (they are in the run's report.md)."""
    seeds = r["options"]["seeds"]
    lines = [
        README_START,
        f"_Generated by `make readme` from `{source}` (the results.json of `difflab study dino --quick --seeds "
        f"{seeds} --threads {r['options']['threads']}`; wall times are in the run's report.md)"
        + (f" and `{other_source}` (seed 0 at {other['options']['threads']} threads)" if other else "")
        + "; do not edit by hand._",
        "",
        mmd_table(r, wall_time=False, spread=seeds > 1),
        "",
        "#### Held-out likelihood (ITD estimate)",
        "",
        nll_table(r),
    ]
    if other is not None:
        lines += ["", "#### The same study at another thread count (seed 0)", "", threads_table(r, other)]
    lines += ["", "![quick study samples](docs/quick_study_samples.png)", README_END]
    return "\n".join(lines)


def render(r: dict) -> str:
    """report.md from results.json."""
    figs = r["figures"]
    lines = [*_intro(r), "", "## MMD, cost and speed", "", mmd_table(r),
             "", "## Held-out likelihood (ITD estimate)", "", nll_table(r),
             "", "## Figures", "", f"![samples]({figs['samples']})", ""]
    if "picard_mmd" in figs:
        lines += [f"![MMD per Picard iteration]({figs['picard_mmd']})", ""]
    for section in (_classification_section, _steps_section, _few_steps_section, _far_field_section):
        lines += section(r)
    lines += [f"![MMD during training]({figs['progress']})", "", f"![training loss]({figs['loss']})", "",
              f"Total wall time of this study run: {fmt(r['wall_time_s'])} s. Software: "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def _intro(r: dict) -> list[str]:
    """The report's title and the paragraph that says how every number was made."""
    s = r["settings"]
    window = "the whole chain" if not s["window"] else f"a window of {s['window']}"
    return [
        "# Dino study",
        "",
        f"Each objective trained for {s['steps']:,} steps (an equal budget) per seed, {r['options']['seeds']} seed(s) "
        f"(the CDL fine-tune: {s['ft_steps']:,} more steps on the DSM run, lr {s['ft_lr']:g}); "
        f"{s['n_samples']:,} samples per sampler against {s['n_ref']:,} fresh data points (MMD, b = 0.03). "
        f"Parallel DDPM: Picard iteration, tol 0.1, {window}, per-sample convergence, beta_tilde variance "
        "(the CDL parallel code); sequential DDPM uses beta (the CDL sequential code). Picard iterations: the "
        "sweeps of the slowest sample (the call's sequential depth; the extrapolated start adds one sequential "
        "step); sweeps / sample: their mean. Distance to sequential: each parallel sample's RMS distance to its "
        "sequential twin (the same chain and noise, step by step) in data standard deviations, mean over samples "
        "and seeds / the largest. TAA: triangular Anderson acceleration; extrapolated start: one true step, then "
        "the clean estimate frozen along the pre-drawn noise.",
    ]


def _classification_section(r: dict) -> list[str]:
    """The noise-classification table and figure ([] without them)."""
    if not r.get("noise_classification"):
        return []
    zetas = [c["zeta"] for c in next(iter(r["noise_classification"].values()))]
    return ["## Noise classification (seed 0)", "",
            "The classifier implied by each denoiser, log p(x) - log p_zeta(x) > 0, on held-out points and on "
            "the same points noised to log-SNR zeta: accuracy / cross-entropy (bits).", "",
            table(["objective", *[f"zeta {z:g}" for z in zetas]],
                  [[LABELS.get(k, k) if k in LABELS else k,
                    *[f"{c['accuracy']:.3f} / {c['cross_entropy']:.3f}" for c in v]]
                   for k, v in r["noise_classification"].items()]),
            "", f"![noise classification]({r['figures']['classify']})", ""]


def _steps_section(r: dict) -> list[str]:
    """MMD against the number of DDIM and DDPM steps, table and figure ([] without them)."""
    if not r.get("mmd_vs_sampling_steps"):
        return []
    counts = r["settings"]["step_counts"]
    return ["## MMD against the number of sampling steps", "",
            table(["objective", *[f"DDIM-{n}" for n in counts], *[f"DDPM-{n}" for n in counts]],
                  [[LABELS.get(k, k), *[sci(x) for x in v["ddim"]], *[sci(x) for x in v["ddpm"]]]
                   for k, v in r["mmd_vs_sampling_steps"].items()]),
            "", f"![MMD against sampling steps]({r['figures']['steps']})", ""]


def _few_steps_section(r: dict) -> list[str]:
    """MMD at small budgets of network calls ([] without them)."""
    if not r.get("few_steps"):
        return []
    return [f"## Few steps: MMD at {budgets(r)} network calls", "",
            "DDIM (eta 0), EDM Heun (2N - 1 calls: the largest N within the budget) and DPM-Solver++ 2M (on "
            "the DDPM grid, trailing spacing), each at a budget of network calls per sample (the NFE column "
            "says what each used); mean over seeds. SA's claim is about this regime.", "",
            few_steps_table(r["few_steps"], sci, LABELS), ""]


def _far_field_section(r: dict) -> list[str]:
    """Each denoiser's far-field gain beside the exact one's ([] without it)."""
    if not r.get("far_field"):
        return []
    ff = r["far_field"]
    ex = ff["exact"]
    cols = [f"t {t}, R {R:g}" for R in ex["radii"] for t in ex["t"]]
    return ["## Far-field gain", "",
            "How each denoiser extrapolates: ||D(x, sigma_t)|| / ||x|| at ||x|| = R sqrt(2), far outside the "
            "data (|x| < 2.7), where unconverged Picard iterates go. The exact denoiser pulls such states "
            "back to the data (gain near 0); a gain above 1 pushes them further out, the DDPM steps amplify "
            "them and the parallel sampler needs more sweeps. Mean over seeds; last column: the largest gain "
            "of each seed.", "",
            table(["denoiser", *cols, "max per seed"],
                  [[LABELS.get(k, k) if k != "exact" else "exact Dino denoiser",
                    *[f"{g:.3f}" for row in v["gain"] for g in row],
                    " / ".join(f"{m:.2f}" for m in v.get("max_per_seed", [max(map(max, v["gain"]))]))]
                   for k, v in ff.items()]),
            ""]
