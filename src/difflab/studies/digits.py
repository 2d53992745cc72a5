"""The digits study: DSM against EDM, EDM + STF, CDL and SA-2 on scikit-learn's 8x8 digits with a small U-Net.

Every objective trains with the same budget (steps x batch). Samples from DDIM-50 and EDM Heun-18 are scored by the
Frechet distance in the 64-d features of a small classifier trained on the digits (a *classifier* Frechet distance,
not an FID) against all 1,797 images, beside two real-vs-real floors; the same classifier says how many samples it
reads confidently as a digit and how evenly the ten classes are covered. The likelihood is the ITD estimate on
training images (there is no held-out split of 1,797 images worth the name) in bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from difflab.data import get_dataset
from difflab.metrics.classifier import ClassifierFeatures, classifier_for
from difflab.metrics.frechet import feature_statistics, frechet_distance
from difflab.metrics.kid import kid
from difflab.plots import image_panels, small_multiples
from difflab.runs import Run
from difflab.studies.cache import Study, Units, write_outputs
from difflab.studies.common import FLOW_OBJECTIVES, StudyOptions
from difflab.studies.few_steps import budgets, few_steps, few_steps_table, mean_few
from difflab.studies.labels import OBJECTIVE_LABELS, sampler_label
from difflab.studies.measures import loss_curve, run_nll
from difflab.studies.report import fmt, mean_std, pm, table

OBJECTIVES = ("dsm", "itd", "cdl", "cdl-ft", "edm", "stf", "sa2", "sa3", "sa4", *FLOW_OBJECTIVES)
DEFAULT_OBJECTIVES = ("dsm", "edm", "stf", "cdl", "sa2")
DEFAULT_SAMPLERS = ("ddim", "heun")
LABELS = {**OBJECTIVE_LABELS, "stf": "EDM + STF (n 1024)"}  # (this study's STF reference size, FULL's)
BIN = 0.125  # the pixels take 17 levels on [-1, 1], 1/8 apart
BITS_PER_LEVEL = 3.0  # -log2 BIN: -log2 P(bin) <= E_u[-log2 p(x + u)] + 3 per pixel, u ~ U(bin) (Jensen)

# The tiny U-Net (189k parameters) keeps the full study within about 40 minutes on 2 CPU cores; the small preset
# (1.75M) is slower by 3x for a similar picture at this budget. lr 1e-3 with warm-up and cosine decay; EMA 0.999.
FULL = {"steps": 4000, "ft_steps": 1000, "ft_lr": 2e-4, "batch_size": 128, "lr": 1e-3, "preset": "tiny",
        "n_samples": 1000, "n_nll": 500, "n_alpha": 64, "floor_draws": 5, "grid": 64, "kid_subsets": 50,
        "stf_reference": 1024, "confident": 0.9, "nfe_counts": [5, 10, 20]}
QUICK = {**FULL, "steps": 800, "ft_steps": 300, "n_samples": 500, "n_nll": 200, "n_alpha": 32}


def settings(opts: StudyOptions) -> dict:
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    s["train_overrides"] = ['model.arch="unet"', f'model.preset="{s["preset"]}"', f"train.batch_size={s['batch_size']}",
                            f"train.lr={s['lr']}", "train.log_every=50", f"train.ckpt_every={max(s['steps'] // 4, 1)}"]
    s["objective_config"] = {"stf": ['objective.name="stf"', 'objective.options.base="edm"',
                                     f"objective.options.reference_size={s['stf_reference']}"]}
    return s


@dataclass
class _Judge:
    """The feature classifier and the real set as it sees it: what every sample set is scored against."""

    classifier: object
    features: ClassifierFeatures
    real_feats: np.ndarray  # (N, feature_dim) of all 1,797 images
    ref: tuple  # their (mu, sigma)

    def score(self, x: torch.Tensor, s: dict) -> dict:
        return _score(x, self.features, self.classifier, self.real_feats, self.ref, s)

    def fd(self, x: torch.Tensor) -> float:
        return _fd(self.features.extract(x.float().clamp(-1, 1)), self.ref)



def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES, DEFAULT_OBJECTIVES, DEFAULT_SAMPLERS)
    s = settings(opts)
    study = Study("digits", opts, arch="unet")
    study.pin_settings(s)
    ds = get_dataset("digits")
    real = ds.train_data().float()
    judge = _judge(study, real)
    floor = study.cached("floor", lambda: _floors(ds, judge.features, judge.ref, s),
                         what=f"real-vs-real floors ({s['floor_draws']} draws and {s['floor_draws']} half splits)")
    real_score = study.cached("score-real", lambda: judge.score(ds.sample(s["n_samples"], seed=100), s),
                              what=f"scores of {s['n_samples']:,} real images")
    x_nll = ds.eval_data(s["n_nll"], seed=2)
    g = torch.Generator().manual_seed(3)  # uniform dequantisation: a point uniform in each pixel's bin
    x_deq = x_nll + (torch.rand(x_nll.shape, generator=g, dtype=x_nll.dtype) - 0.5) * BIN

    u = Units()
    for obj in opts.objectives:
        _objective_units(study, obj, judge, x_nll, x_deq, s, u)
    figs = {"samples": "fig_samples.png", "loss": "fig_loss.png"}
    study.log("figures: sample grids, losses")
    image_panels(u.panels, list(opts.objectives), list(opts.samplers), real[: s["grid"]], study.out / figs["samples"],
                 row_labels=LABELS, col_labels=u.labels, titles=u.titles)
    small_multiples(u.losses, study.out / figs["loss"], "training step", "loss (log-interval mean)", logy=True)
    results = {"settings": {k: v for k, v in s.items() if k not in ("train_overrides", "objective_config")},
               "classifier": {"heldout_accuracy": judge.classifier.heldout_accuracy,
                              "feature_dim": judge.real_feats.shape[1]},
               "floor": floor, "real": real_score, "rows": u.rows, "nll": u.nll, "figures": figs,
               "few_steps": {obj: mean_few(v) for obj, v in u.few.items()},
               "wall_time_s": study.elapsed()}
    return write_outputs(study, results, render)


def _judge(study: Study, real: torch.Tensor) -> _Judge:
    """The digits' feature classifier (trained on first use, then cached in the study) and the real set's
    features (N, feature_dim) and statistics."""
    study.log("feature classifier for the digits (trained on first use, then cached), features of the real set")
    classifier = classifier_for("digits", study.out / "cache" / "classifiers")
    features = ClassifierFeatures(classifier)
    real_feats = features.extract(real)
    return _Judge(classifier, features, real_feats, feature_statistics(real_feats))


def _objective_units(study: Study, obj: str, judge: _Judge, x_nll: torch.Tensor, x_deq: torch.Tensor, s: dict,
                     u: Units) -> None:
    """Train and measure every seed of objective ``obj``; add its rows (one per sampler) and likelihood to ``u``."""
    per_sampler = {k: [] for k in study.opts.samplers}
    nll_vals = []
    for seed in range(study.opts.seeds):
        key = f"{obj}-s{seed}"
        run_dir = study.train_objective("digits", obj, seed, s)
        u.losses.setdefault(LABELS.get(obj, obj), {})[f"seed {seed}"] = loss_curve(run_dir)
        units = {name: study.cached(f"{name}-{key}", lambda r=run_dir, x=x: run_nll(r, x, s["n_alpha"]),
                                    what=f"likelihood (ITD estimate, {s['n_nll']:,} {kind} images x "
                                         f"{s['n_alpha']} log-SNR values)")
                 for name, x, kind in (("nll", x_nll, "training"), ("nll-deq", x_deq, "dequantised"))}
        nll_vals.append({**units["nll"], "dequantised": units["nll-deq"]})
        u.few.setdefault(obj, []).append(study.cached(
            f"fewsteps-{key}", lambda r=run_dir: few_steps(Run.load(r), judge.fd, s, study),
            what=f"classifier FD at {', '.join(map(str, s['nfe_counts']))} network calls (DDIM, Heun, "
                 "DPM-Solver++ 2M)"))
        for sampler in study.opts.samplers:
            per_sampler[sampler].append(_sampler_unit(study, obj, seed, run_dir, sampler, judge, s, u))
    for sampler, vals in per_sampler.items():
        u.rows.append({"objective": obj, "sampler": sampler, "label": u.labels[sampler],
                       **{k: mean_std(v[k] for v in vals) for k in ("fd", "kid", "confident", "coverage")},
                       "nfe_per_sample": float(np.mean([v["nfe_per_sample"] for v in vals])),
                       "wall_time_s": float(np.mean([v["wall_time_s"] for v in vals]))})
    u.nll[obj] = {**{k: mean_std(v[k] for v in nll_vals) for k in ("nll_nats", "bits_per_dim")},
                  "discrete_bound": mean_std(v["dequantised"]["bits_per_dim"] + BITS_PER_LEVEL for v in nll_vals)}


def _sampler_unit(study: Study, obj: str, seed: int, run_dir: Path, sampler: str, judge: _Judge, s: dict,
                  u: Units) -> dict:
    """One study sampler's samples of a run (cached) and their scores and cost; seed 0 also gives the figure its
    panel."""
    key = f"{obj}-s{seed}"
    x, st = study.sample(f"{key}-{sampler}", run_dir, sampler, s["n_samples"], seed=0)
    score = study.cached(f"score-{key}-{sampler}", lambda x=x: judge.score(x, s),
                         what="classifier Frechet distance, KID, confidence and coverage")
    u.labels[sampler] = sampler_label(sampler, st["steps"])
    if seed == 0:
        u.panels[(obj, sampler)] = x[: s["grid"]]
        u.titles[(obj, sampler)] = f"classifier FD {fmt(score['fd'])}"
    return {**score, **{k: st.get(k) for k in ("nfe_per_sample", "wall_time_s")}}


def _fd(feats: np.ndarray, ref) -> float:
    return frechet_distance(*feature_statistics(feats), *ref)


def _floors(ds, features: ClassifierFeatures, ref, s: dict) -> dict:
    """Real against real: n_samples images drawn (with replacement) from the set against the whole set, and
    the set's two disjoint random halves against each other (mean +- std over ``floor_draws`` draws)."""
    n, draws = len(ds), s["floor_draws"]
    drawn = [_fd(features.extract(ds.sample(s["n_samples"], seed=100 + i).float()), ref) for i in range(draws)]
    halves = []
    for i in range(draws):
        perm = torch.from_numpy(np.random.default_rng(200 + i).permutation(n))
        a, b = ds.train_data()[perm[: n // 2]].float(), ds.train_data()[perm[n // 2:]].float()
        halves.append(_fd(features.extract(a), feature_statistics(features.extract(b))))
    return {"drawn_vs_all": mean_std(drawn), "half_vs_half": mean_std(halves)}


@torch.no_grad()
def _score(x: torch.Tensor, features: ClassifierFeatures, classifier, real_feats: np.ndarray, ref, s: dict) -> dict:
    """Classifier Frechet distance and KID against the data; the share of samples the classifier reads with
    probability >= ``confident``; class coverage = entropy of the predicted-class histogram / log 10 (1: even)."""
    x = x.float().clamp(-1, 1)  # as pixels are: a sample off the range scores as its clamped image
    feats = features.extract(x)
    k_mean, _ = kid(feats, real_feats, subsets=s["kid_subsets"], subset_size=min(len(x), 1000))
    p = torch.softmax(classifier(x), dim=1)
    hist = torch.bincount(p.argmax(1), minlength=p.shape[1]).double() / len(x)
    hist = hist[hist > 0]
    confident = (p.max(1).values >= s["confident"]).double().mean()
    return {"fd": _fd(feats, ref), "kid": float(k_mean), "confident": float(confident),
            "coverage": float(-(hist * hist.log()).sum()) / math.log(p.shape[1])}


def render(r: dict) -> str:
    """report.md from results.json."""
    lines = [*_intro(r), "", "## Sample quality", "", _quality_table(r), *_rankings(r),
             "", f"![samples]({r['figures']['samples']})", "", *_likelihood_section(r)]
    if r.get("few_steps"):
        lines += ["", f"## Few steps: classifier FD at {budgets(r)} network calls", "",
                  "DDIM (eta 0), EDM Heun (2N - 1 calls: the largest N within the budget) and DPM-Solver++ 2M (the "
                  "DDPM grid, trailing spacing), each at a budget of network calls per sample (in brackets: what "
                  f"it used); {r['settings']['n_samples']:,} samples, mean over seeds.", "",
                  few_steps_table(r["few_steps"], fmt, LABELS)]
    lines += ["", f"![training loss]({r['figures']['loss']})", "",
              f"Total wall time of this study run: {fmt(r['wall_time_s'])} s. Software: "
              + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def _intro(r: dict) -> list[str]:
    """The report's title and what was trained, and what the classifier Frechet distance and the scores are."""
    s, c, o = r["settings"], r["classifier"], r["options"]
    ft = (f" (an equal budget; the CDL fine-tune: {s['ft_steps']:,} more steps on the DSM run)"
          if "cdl-ft" in o["objectives"] else " (an equal budget)")
    return [
        "# Digits study",
        "",
        f"Every objective trained {s['steps']:,} steps at batch {s['batch_size']}{ft} on scikit-learn's 1,797 "
        f"8x8 digits with the `{s['preset']}` U-Net, {o['seeds']} seed(s). {s['n_samples']:,} samples per sampler.",
        "",
        f"**Classifier Frechet distance** (not an FID): the Frechet distance between Gaussians fitted to the "
        f"{c['feature_dim']}-d penultimate features of a small CNN trained on the digits (held-out accuracy "
        f"{fmt(c['heldout_accuracy'])}), samples against all 1,797 images. Lower is better; the floors show what "
        "real images score. KID in the same features. *Confident*: the share of samples the classifier gives "
        f"probability >= {s['confident']} to one class (real digits: see the floor row). *Coverage*: entropy of the "
        "predicted-class histogram / log 10 (1 = all ten digits equally often). KID is the unbiased estimate (it can "
        "fall below zero when two sets are alike).",
    ]


def _quality_table(r: dict) -> str:
    """Every (objective, sampler) row's scores and cost, then the two real-vs-real floors."""
    s, floor, real = r["settings"], r["floor"], r["real"]
    rows = [[LABELS.get(x["objective"], x["objective"]), x["label"], pm(x["fd"], fmt), pm(x["kid"], fmt),
             pm(x["confident"], fmt), pm(x["coverage"], fmt), fmt(x["nfe_per_sample"]), fmt(x["wall_time_s"])]
            for x in r["rows"]]
    rows.append([f"real: {s['n_samples']:,} drawn images vs all (floor)", f"{floor['drawn_vs_all']['n']} draws",
                 pm(floor["drawn_vs_all"], fmt), fmt(real["kid"]), fmt(real["confident"]), fmt(real["coverage"]),
                 "-", "-"])
    rows.append(["real: half vs half (floor)", f"{floor['half_vs_half']['n']} splits", pm(floor["half_vs_half"], fmt),
                 "-", "-", "-", "-", "-"])
    return table(["objective", "sampler", "classifier FD", "KID", "confident", "coverage", "NFE / sample",
                  "wall time (s)"], rows)


def _rankings(r: dict) -> list[str]:
    """One line per sampler: the objectives from the lowest classifier FD up."""
    lines = []
    for sampler in dict.fromkeys(x["sampler"] for x in r["rows"]):
        ranked = sorted((x for x in r["rows"] if x["sampler"] == sampler), key=lambda x: x["fd"]["mean"])
        lines += ["", f"Ranking by classifier FD, {ranked[0]['label']}: " + " < ".join(
            f"{LABELS.get(x['objective'], x['objective'])} {fmt(x['fd']['mean'])}" for x in ranked) + "."]
    return lines


def _likelihood_section(r: dict) -> list[str]:
    """The ITD likelihood at the pixels and the discrete bound, with what each means."""
    return ["## Likelihood (ITD estimate)", "",
            f"-log p of {r['settings']['n_nll']} training images (nats, and bits/dim) of the continuous density on "
            "[-1, 1], at the pixel values: the models were trained on 17-level pixels, so their density piles up on "
            "the levels and can exceed 1 (negative bits/dim); this number is not a likelihood of the discrete data. "
            f"The discrete bound: the same images uniformly dequantised within their 1/8-wide bins, + "
            f"{BITS_PER_LEVEL:g} bits/dim, an upper bound on -log2 P(image) per pixel (Jensen) for a model that "
            "never saw dequantised data (so a loose one: a uniform distribution over the 17 levels scores "
            "log2 17 = 4.09 bits/dim).",
            "",
            table(["objective", "-log p (nats)", "bits/dim at the pixels", "discrete bound (bits/dim)"],
                  [[LABELS.get(k, k), pm(v["nll_nats"], fmt), pm(v["bits_per_dim"], fmt),
                    pm(v["discrete_bound"], fmt)] for k, v in r["nll"].items()])]
