"""The guidance study: class-conditional digits with classifier-free guidance at W = 0, 1, 3.

A class-conditional U-Net is trained on the labelled digits with label dropout; every sampler draws the same
number of samples of each class (sample k of class k mod 10) at each guidance weight, and the feature classifier
of the digits study says how many it reads as the asked-for class, per class and overall, and how confidently.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import get_dataset
from difflab.metrics.classifier import classifier_for
from difflab.plots import image_panels
from difflab.studies.cache import Study, write_outputs
from difflab.studies.common import StudyOptions
from difflab.studies.labels import OBJECTIVE_LABELS, sampler_label
from difflab.studies.report import fmt, mean_std, pm, table

OBJECTIVES = ("dsm", "edm", "sa2", "stf")
FULL = {"steps": 1500, "batch_size": 128, "lr": 1e-3, "preset": "tiny", "label_dropout": 0.1,
        "weights": [0.0, 1.0, 3.0], "per_class": 100, "stf_reference": 1024, "grid_per_class": 8}
QUICK = {**FULL, "steps": 800, "per_class": 50}
K = 10  # the digits' classes


def settings(opts: StudyOptions) -> dict:
    s = {**(QUICK if opts.quick else FULL), **opts.overrides}
    s["train_overrides"] = ['model.arch="unet"', f'model.preset="{s["preset"]}"', "model.conditional=true",
                            f"train.label_dropout={s['label_dropout']}", f"train.batch_size={s['batch_size']}",
                            f"train.lr={s['lr']}", "train.log_every=50", f"train.ckpt_every={max(s['steps'] // 4, 1)}"]
    s["objective_config"] = {"stf": ['objective.name="stf"', 'objective.options.base="edm"',
                                     f"objective.options.reference_size={s['stf_reference']}"]}
    return s


def run(opts: StudyOptions) -> Path:
    opts.validate(OBJECTIVES, ("dsm",), ("ddim",))
    s = settings(opts)
    study = Study("guidance", opts, arch="unet")
    study.pin_settings(s)
    study.log("feature classifier for the digits (trained on first use, then cached)")
    classifier = classifier_for("digits", study.out / "cache" / "classifiers")
    n = K * s["per_class"]
    rows, panels, titles, labels = [], {}, {}, {}
    for obj in opts.objectives:
        for sampler in opts.samplers:
            for w in s["weights"]:
                per_seed = []
                for seed in range(opts.seeds):
                    run_dir = study.train_objective("digits", obj, seed, s)
                    key = f"{obj}-s{seed}-{sampler}-w{w:g}"
                    x, st = study.sample(key, run_dir, sampler, n, seed=0,
                                         chain_overrides={"class_labels": "all", "guidance": w})
                    per_seed.append(study.cached(f"score-{key}", lambda x=x: _score(x, classifier)))
                    labels[sampler] = sampler_label(sampler, st["steps"])
                    if seed == 0:  # rows: the classes; the first few samples of each
                        order = torch.arange(n).reshape(s["per_class"], K).T[:, : s["grid_per_class"]].reshape(-1)
                        panels[(f"{obj}-{sampler}", f"{w:g}")] = x[order]
                        titles[(f"{obj}-{sampler}", f"{w:g}")] = f"accuracy {fmt(per_seed[0]['accuracy'])}"
                rows.append({"objective": obj, "sampler": sampler, "label": labels[sampler], "guidance": w,
                             "accuracy": mean_std(p["accuracy"] for p in per_seed),
                             "confidence": mean_std(p["confidence"] for p in per_seed),
                             "per_class": [mean_std(p["per_class"][k] for p in per_seed)["mean"] for k in range(K)]})
    figs = {"samples": "fig_guidance.png"}
    study.log("figure: samples by class and guidance weight")
    real = get_dataset("digits")
    order = torch.cat([(real.labels == k).nonzero()[: s["grid_per_class"], 0] for k in range(K)])
    row_keys = [f"{o}-{p}" for o in opts.objectives for p in opts.samplers]
    image_panels(panels, row_keys, [f"{w:g}" for w in s["weights"]], real.images[order].float(),
                 study.out / figs["samples"], ncol=s["grid_per_class"],
                 row_labels={f"{o}-{p}": f"{OBJECTIVE_LABELS.get(o, o)}, {labels[p]}" for o in opts.objectives
                             for p in opts.samplers},
                 col_labels={f"{w:g}": f"guidance W = {w:g}" for w in s["weights"]}, titles=titles)
    results = {"settings": {k: v for k, v in s.items() if k not in ("train_overrides", "objective_config")},
               "classifier": {"heldout_accuracy": classifier.heldout_accuracy}, "rows": rows, "figures": figs,
               "wall_time_s": study.elapsed()}
    return write_outputs(study, results, render)


@torch.no_grad()
def _score(x: torch.Tensor, classifier) -> dict:
    """Accuracy of the classifier's reading against the asked-for class (sample k: class k mod 10), overall and
    per class, and the mean probability it gives the asked-for class."""
    x = x.float().clamp(-1, 1)  # as pixels are
    asked = torch.arange(len(x)) % K
    p = torch.softmax(classifier(x), dim=1)
    hit = (p.argmax(1) == asked).double()
    return {"accuracy": float(hit.mean()), "confidence": float(p[torch.arange(len(x)), asked].mean()),
            "per_class": [float(hit[asked == k].mean()) for k in range(K)]}


def render(r: dict) -> str:
    s, o = r["settings"], r["options"]
    lines = [
        "# Guidance study (class-conditional digits)", "",
        f"Class-conditional `{s['preset']}` U-Nets trained {s['steps']:,} steps at batch {s['batch_size']} on "
        f"scikit-learn's 1,797 labelled 8x8 digits, each label dropped with probability {s['label_dropout']:g} "
        f"(the unconditional model of classifier-free guidance), {o['seeds']} seed(s). {s['per_class']} samples of "
        "each class per weight W, with the guided denoiser (1 + W) D(x, class) - W D(x, no class). *Accuracy*: the "
        f"share the digits feature classifier (held-out accuracy {fmt(r['classifier']['heldout_accuracy'])}) reads "
        "as the asked-for class; *confidence*: the mean probability it gives that class.", ""]
    header = ["objective", "sampler", "W", "accuracy", "confidence", *(f"class {k}" for k in range(K))]
    lines.append(table(header, [[OBJECTIVE_LABELS.get(x["objective"], x["objective"]), x["label"],
                                 f"{x['guidance']:g}", pm(x["accuracy"], fmt), pm(x["confidence"], fmt),
                                 *(fmt(v, 2) for v in x["per_class"])] for x in r["rows"]]))
    lines += ["", f"![samples by class and guidance]({r['figures']['samples']})", "",
              "Rows of each panel: the classes 0-9 (the first panel: real digits). Total wall time of this study "
              f"run: {fmt(r['wall_time_s'])} s.", ""]
    return "\n".join(lines)
