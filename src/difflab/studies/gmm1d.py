"""The 1-D mixture study (CDL Fig. 1): where is a trained denoiser wrong, and where do samplers go?

On 0.5 N(-5, 1) + 0.5 N(5, 1) the optimal denoiser is known at every noise level, so the error of a trained one
is mapped over (DDPM step t, state x_t), with sequential DDPM trajectories and the iterates of the parallel
(Picard) sampler drawn over it, one panel per objective. The Picard iterates start in the high-error region the
sequential sampler never visits. Also reported: Picard iterations per objective (paper: CDL 24, DDPM 26), the
on-path and off-path error, and the samples' fit (Kolmogorov-Smirnov distance to the mixture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from difflab.data import GMM1D
from difflab.diagnostics import eps_error_map, noise_classification
from difflab.plots import classification_plot, error_heatmaps
from difflab.runs import Run
from difflab.samplers import draw_noise, picard, run_chain
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.labels import OBJECTIVE_LABELS
from difflab.studies.measures import sample_with_curve
from difflab.studies.report import fmt, mean_std, pm, table

OBJECTIVES = ("dsm", "itd", "cdl", "cdl-ft")
LABELS = OBJECTIVE_LABELS
PAPER = {"CDL": 24, "DDPM": 26}
FULL = {"steps": 6000, "ft_steps": 2000, "ft_lr": 1e-3, "n_picard": 500, "n_paths": 4, "tol": 0.1,
        "T_steps": 1000, "show_sweeps": (2, 8), "n_classify": 500, "n_alpha": 64, "n_error_paths": 64,
        "error_sweeps": 5,
        "zetas": [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]}
QUICK = {**FULL, "steps": 2000, "ft_steps": 700, "n_picard": 200}


def ks_to_mixture(x: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the samples' empirical CDF and the mixture's CDF."""
    v = np.sort(x.reshape(-1).double().numpy())
    cdf = 0.5 * norm.cdf(v, -5, 1) + 0.5 * norm.cdf(v, 5, 1)
    n = len(v)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES)
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    study = Study("gmm1d", opts)
    study.pin_settings(s)
    truth = GMM1D().denoiser()
    rows, maps, paths, picard_paths = [], {}, {}, {}
    held_out = GMM1D().sample(s["n_classify"], seed=2)
    classify = {"exact denoiser": study.cached("classify-exact", lambda: noise_classification(
        truth, held_out, s["zetas"], n_alpha=s["n_alpha"]), what=_classify_what(s))}
    for obj in opts.objectives:
        its, summ, ks, path_err = [], [], [], []
        for seed in range(opts.seeds):
            key = f"{obj}-s{seed}"
            run_dir = study.train_objective("gmm1d", obj, seed, s)
            run = Run.load(run_dir)
            model, sched = run.denoiser, run.schedule
            ddpm = {"steps": s["T_steps"], "variance": "beta_tilde"}
            chain = run.chain("ddpm", **ddpm)

            def stats(chain=chain, key=key, run=run, sched=sched, ddpm=ddpm):
                x, st = sample_with_curve(run, "picard-ddpm", s["n_picard"], 0, {"tol": s["tol"]},
                                          progress=opts.progress, **ddpm)
                study.log(f"{key}: denoiser error along {s['n_error_paths']} sequential paths and the first "
                          f"{s['error_sweeps']} Picard sweeps")
                return {"iterations": st["iterations"], "nfe_per_sample": st["nfe_per_sample"],
                        "ks": ks_to_mixture(x), **path_errors(chain, run.denoiser, truth, sched, s)}

            st = study.cached(f"parallel-{key}", stats,
                              what=f"parallel DDPM-{s['T_steps']} (tol {s['tol']:g}) on {s['n_picard']:,} samples")
            study.log(f"{key}: denoiser error map over (step, state)")
            emap = eps_error_map(model, truth, sched)
            path_err.append(st)
            its.append(st["iterations"])
            ks.append(st["ks"])
            summ.append(emap.summary())
            if seed == 0:
                label = LABELS.get(obj, obj)
                classify[label] = study.cached(f"classify-{key}", lambda m=model: noise_classification(
                    m, held_out, s["zetas"], n_alpha=s["n_alpha"]), what=_classify_what(s))
                maps[label] = emap
                study.log(f"{key}: sequential and parallel trajectories of {s['n_paths']} samples for the figure")
                paths[label], picard_paths[label] = _trajectories(chain, sched, s)
        rows.append({"objective": obj, "iterations": mean_std(its), "ks": mean_std(ks),
                     "on_path_error": mean_std(v["on_path_error"] for v in summ),
                     "off_path_error": mean_std(v["off_path_error"] for v in summ),
                     "sequential_path_error": mean_std(v["sequential_path_error"] for v in path_err),
                     "parallel_path_error": mean_std(v["parallel_path_error"] for v in path_err)})
    figs = {"error_map": "fig_error_map.png", "classify": "fig_noise_classification.png"}
    study.log("figures: error maps with trajectories, noise classification")
    error_heatmaps(maps, study.out / figs["error_map"], paths, picard_paths)
    classification_plot(classify, study.out / figs["classify"])
    results = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "rows": rows,
               "paper_iterations": PAPER, "figures": figs, "noise_classification": classify,
               "wall_time_s": study.elapsed()}
    return write_outputs(study, results, render)


def _classify_what(s: dict) -> str:
    return f"noise classification ({s['n_classify']:,} held-out points, {len(s['zetas'])} log-SNR levels)"


@torch.no_grad()
def path_errors(chain, model, truth, sched, s) -> dict:
    """Mean |eps_theta - eps*| at the states the samplers visit: along sequential DDPM paths, and along the
    parallel sampler's iterates of its first ``error_sweeps`` sweeps (where Picard starts: off the data's paths)."""
    from difflab.denoisers import eps_hat

    noise = draw_noise(7, range(s["n_error_paths"]), (1,), chain.n_steps, chain.stochastic)
    sig = sched.sigma[torch.cat([sched.timesteps(chain.n_steps), torch.zeros(1, dtype=torch.long)])][:-1]
    ab = sched.abar[sched.timesteps(chain.n_steps)]

    def mean_error(states):  # states (n_steps + 1, M, 1); the last (clean) state is not a denoiser input
        x = states[:-1]
        y = (x / ab.sqrt()[:, None, None]).reshape(-1, 1)
        s_rows = sig.repeat_interleave(x.shape[1])
        return float((eps_hat(model, y, s_rows) - eps_hat(truth, y, s_rows)).abs().mean())

    seq = [chain.prior_scale * noise.x_T]
    run_chain(chain, noise, callback=lambda j, x: seq.append(x.clone()))
    iterates = []
    picard(chain, noise, tol=s["tol"], max_sweeps=s["error_sweeps"],
           callback=lambda it, x, X: iterates.append(X.clone()))
    return {"sequential_path_error": mean_error(torch.stack(seq)),
            "parallel_path_error": sum(mean_error(X) for X in iterates) / len(iterates)}


@torch.no_grad()
def _trajectories(chain, sched, s):
    """Sequential paths and chosen Picard iterates of the same few samples, as (t values, states) for plotting."""
    noise = draw_noise(123, range(s["n_paths"]), (1,), chain.n_steps, chain.stochastic)
    t = np.concatenate([sched.timesteps(chain.n_steps).numpy(), [0]])  # the DDPM step of every state
    seq = [chain.prior_scale * noise.x_T[:, 0]]
    run_chain(chain, noise, callback=lambda j, x: seq.append(x[:, 0].clone()))
    iterates = []

    def keep(it, x, X):
        if it in s["show_sweeps"]:
            iterates.append((t, X[:, :, 0].clone().numpy(), f"parallel, after sweep {it}"))

    picard(chain, noise, tol=s["tol"], callback=keep)
    return (t, torch.stack(seq).numpy()), iterates


def render(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# 1-D two-mode mixture study (CDL Fig. 1)",
        "",
        f"Data 0.5 N(-5, 1) + 0.5 N(5, 1); each objective trained {s['steps']:,} steps per seed, "
        f"{r['options']['seeds']} seed(s). Parallel DDPM ({s['T_steps']} steps, beta_tilde variance, tol {s['tol']}, "
        f"no window) on {s['n_picard']:,} samples. Error = |eps_theta(x_t, t) - eps*(x_t, t)| against the exact "
        "denoiser; on-path: weighted by the data's marginal p_t(x_t); off-path: grid cells where p_t(x_t) < 1e-3; "
        f"along paths: at the states {s['n_error_paths']} samples visit, sequentially and in the parallel sampler's "
        f"first {s['error_sweeps']} sweeps.",
        "",
    ]
    rows = [[LABELS.get(row["objective"], row["objective"]), pm(row["iterations"], fmt),
             pm(row["on_path_error"], fmt), pm(row["off_path_error"], fmt),
             pm(row["sequential_path_error"], fmt), pm(row["parallel_path_error"], fmt), pm(row["ks"], fmt)]
            for row in r["rows"]]
    rows += [[f"{k} (paper)", str(v), "-", "-", "-", "-", "-"] for k, v in r["paper_iterations"].items()]
    lines.append(table(["objective", "Picard iterations", "on-path error", "off-path error",
                        "error along sequential paths", f"error along Picard iterates (sweeps 1-{s['error_sweeps']})",
                        "KS distance of samples"], rows))
    lines += ["", f"![error map]({r['figures']['error_map']})", "",
              "White: sequential DDPM paths; blue to green: the parallel sampler's trajectories of the same samples "
              "(same noise) after sweeps " + " and ".join(str(v) for v in s["show_sweeps"]) + ".", "",
              "## Noise classification (seed 0)", "",
              "Accuracy / cross-entropy (bits) of the classifier implied by each denoiser, clean held-out points "
              "against the same points noised to log-SNR zeta; the exact denoiser's classifier is the Bayes optimum.",
              "",
              table(["denoiser", *[f"zeta {z:g}" for z in s["zetas"]]],
                    [[k, *[f"{c['accuracy']:.3f} / {c['cross_entropy']:.3f}" for c in v]]
                     for k, v in r["noise_classification"].items()]),
              "", f"![noise classification]({r['figures']['classify']})", "",
              f"Total wall time of this study run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
