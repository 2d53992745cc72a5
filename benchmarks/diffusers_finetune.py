"""Fine-tuning a diffusers UNet2DModel on the 8x8 digits: DSM from scratch, then CDL, STF, SA-2 and more DSM.

One run trains a ``model.arch="diffusers"`` DSM model on the digits with the digits study's U-Net recipe (batch 128,
lr 1e-3 with warm-up and cosine decay, EMA 0.999), fine-tunes it (``train.init``) with CDL, STF (default base,
n 1024) and SA-2 (lambda 1) at the study's fine-tune lr, and continues it with DSM for the same steps (the control:
the same extra steps, the plain objective). A fine-tune keeps the network's eps preconditioning. Every model is
scored by the classifier Frechet distance of ``--n`` samples (DDIM-50 and DDPM-1000 with variance beta, fixed
seeds) against all 1,797 digits, as the digits study scores them, beside the real-vs-real floor at the same n; the
time per training step of each objective comes from its run's log (median over log intervals), with its ratio to
DSM's. Runs, samples and the classifier are kept in ``--work``, so a re-run skips finished work.

    python benchmarks/diffusers_finetune.py [--dsm-steps 3000] [--ft-steps 1000] [--n 500] [--threads 1]
        [--work /tmp/diffusers_finetune] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from difflab.config import load_config
from difflab.data import get_dataset
from difflab.metrics.classifier import ClassifierFeatures, classifier_for
from difflab.metrics.frechet import feature_statistics, frechet_distance
from difflab.runs import Run, load_samples, save_samples
from difflab.studies.common import SAMPLERS
from difflab.studies.digits import FULL
from difflab.studies.labels import sampler_label
from difflab.studies.report import mean_std
from difflab.training import train
from difflab.training.checkpoint import list_checkpoints, load_checkpoint

# model key -> (label, objective overrides); "dsm" is the base, the others fine-tune it
FINE_TUNES = {
    "dsm+dsm": ("DSM + DSM (control)", ['objective.name="dsm"']),
    "dsm+cdl": ("DSM + CDL", ['objective.name="cdl"']),
    "dsm+cdl-old": ("DSM + CDL, the old default (8 x 32 iid nodes)",
                    ['objective.name="cdl"', "objective.options.n_cdl=8", "objective.options.n_alpha=32",
                     "objective.options.cdl_weight=1.0", 'objective.options.nodes="iid"']),
    "dsm+cdl-8x4": ("DSM + CDL, 8 x 4 ratio nodes", ['objective.name="cdl"', "objective.options.n_cdl=8",
                                                   "objective.options.n_alpha=4", "objective.options.cdl_weight=1.0"]),
    # the ablation behind today's default: is it the node count or the node rule that hurts 8 x 4?
    "dsm+cdl-8x4-iid": ("DSM + CDL, 8 x 4 iid nodes",
                        ['objective.name="cdl"', "objective.options.n_cdl=8", "objective.options.n_alpha=4",
                         "objective.options.cdl_weight=1.0", 'objective.options.nodes="iid"']),
    "dsm+cdl-8x32": ("DSM + CDL, 8 x 32 ratio nodes",
                     ['objective.name="cdl"', "objective.options.n_cdl=8", "objective.options.n_alpha=32",
                      "objective.options.cdl_weight=1.0"]),
    "dsm+stf": ("DSM + STF (n 1024)", ['objective.name="stf"', "objective.options.reference_size=1024"]),
    "dsm+sa2": ("DSM + SA-2 (lambda 1)", ['objective.name="sa"', "objective.options.K=2", "objective.options.lam=1.0"]),
}
SCORED_SAMPLERS = ("ddim", "ddpm")  # DDIM-50 (eta 0) and DDPM-1000 (variance beta): the studies' protocol
FLOOR_DRAWS = 5


def log(msg: str, t0: float) -> None:
    print(f"[diffusers_finetune {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def train_run(run_dir: Path, overrides: list[str], threads: int, progress: bool, t0: float) -> Path:
    """Train ``run_dir`` unless it holds a checkpoint at the configured step count; resume a partial one."""
    cfg = load_config(overrides=overrides)
    done = list_checkpoints(run_dir)
    if done and load_checkpoint(run_dir)[1]["step"] >= cfg.train.steps:
        log(f"{run_dir.name}: finished already ({cfg.train.steps} steps), skipped", t0)
        return run_dir
    log(f"train {run_dir.name} ({cfg.train.steps} steps{', resumed' if done else ''})", t0)
    if done:
        train(None, run_dir, resume=True, progress=progress, threads=threads)
    else:
        train(cfg, run_dir, overwrite=True, progress=progress, threads=threads)
    return run_dir


def step_rate(run_dir: Path) -> dict:
    """Training speed from a run's log.jsonl: the median steps/s over its log intervals."""
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["steps_per_s"] for r in recs if "loss" in r and r.get("steps_per_s")]
    rate = statistics.median(rates)
    return {"steps_per_s": rate, "ms_per_step": 1e3 / rate, "log_intervals": len(rates),
            "final_loss": recs[-1]["loss"] if recs else None}


def samples(work: Path, key: str, run_dir: Path, sampler: str, n: int, seed: int, t0: float, tag: str = "") -> tuple:
    """n samples of a run with a study sampler, cached as ``work/samples/key[tag]-sampler-n-seed.npz``."""
    path = work / "samples" / f"{key}{tag}-{sampler}-n{n}-s{seed}.npz"
    if path.exists():
        return load_samples(path)
    name, options, _ = SAMPLERS[sampler]
    log(f"sample {key}: {n} samples, {sampler_label(sampler, options['steps'])}", t0)
    run = Run.load(run_dir)
    x, stats = run.sample(n, seed, name, batch_size=n, **options)
    record = run.record(stats, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_samples(path, x, record)
    return x, record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dsm-steps", type=int, default=3000, help="DSM training steps from scratch")
    p.add_argument("--ft-steps", type=int, default=1000, help="steps of each fine-tune (and of the DSM control)")
    p.add_argument("--n", type=int, default=500, help="samples per model and sampler (and real images per floor draw)")
    p.add_argument("--batch", type=int, default=FULL["batch_size"], help="training batch size")
    p.add_argument("--lr", type=float, default=FULL["lr"], help="learning rate of the DSM run")
    p.add_argument("--ft-lr", type=float, default=FULL["ft_lr"], help="learning rate of the fine-tunes")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--train-seed", type=int, default=0, help="train.seed of every run (the DSM parent's too)")
    p.add_argument("--only", help=f"comma-separated fine-tunes (default: all of {', '.join(FINE_TUNES)})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work", type=Path, default=Path("/tmp/diffusers_finetune"), help="runs and samples (kept)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--progress", action="store_true", help="training progress lines on stderr")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    work = a.work
    (work / "runs").mkdir(parents=True, exist_ok=True)

    common = ['data.name="digits"', f"train.batch_size={a.batch}", "train.log_every=50", f"train.seed={a.train_seed}",
              f"train.threads={a.threads}"]
    tag = f"-seed{a.train_seed}" if a.train_seed else ""  # seed 0 keeps the names of earlier runs
    keys = a.only.split(",") if a.only else list(FINE_TUNES)
    unknown = [k for k in keys if k not in FINE_TUNES]
    if unknown:
        p.error(f"unknown fine-tune {', '.join(unknown)}; choose from {', '.join(FINE_TUNES)}")
    dsm_dir = train_run(work / "runs" / f"dsm-{a.dsm_steps}{tag}",
                        [*common, 'model.arch="diffusers"', 'objective.name="dsm"', f"train.steps={a.dsm_steps}",
                         f"train.lr={a.lr}", f"train.ckpt_every={max(a.dsm_steps // 4, 1)}"], a.threads, a.progress, t0)
    runs = {"dsm": ("DSM (diffusers UNet2DModel, eps)", dsm_dir, a.dsm_steps, None)}
    for key in keys:
        label, obj = FINE_TUNES[key]
        run_dir = train_run(work / "runs" / f"{key.replace('+', '-')}-{a.ft_steps}-from-{a.dsm_steps}{tag}",
                            [*common, *obj, f'train.init="{dsm_dir}"', f"train.steps={a.ft_steps}",
                             f"train.lr={a.ft_lr}", f"train.ckpt_every={max(a.ft_steps // 4, 1)}"],
                            a.threads, a.progress, t0)
        runs[key] = (label, run_dir, a.ft_steps, str(dsm_dir))

    log("feature classifier for the digits (trained on first use, then cached), the real-vs-real floor", t0)
    ds = get_dataset("digits")
    classifier = classifier_for("digits", work / "cache" / "classifiers")
    features = ClassifierFeatures(classifier)
    ref = feature_statistics(features.extract(ds.train_data().float()))

    def fd(x: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(features.extract(x.float().clamp(-1, 1))), *ref)

    floor = mean_std(fd(ds.sample(a.n, seed=100 + i)) for i in range(FLOOR_DRAWS))

    base_rate = step_rate(dsm_dir)["steps_per_s"]
    models = {}
    for key, (label, run_dir, steps, init) in runs.items():
        speed = step_rate(run_dir)
        scores = {}
        for sampler in SCORED_SAMPLERS:
            x, rec = samples(work, key, run_dir, sampler, a.n, a.seed, t0, tag)
            scores[sampler] = {"label": sampler_label(sampler, rec["steps"]), "fd": fd(x),
                               "sample_wall_s": rec.get("wall_time_s"), "nfe_per_sample": rec.get("nfe_per_sample")}
        models[key] = {"label": label, "run": str(run_dir), "steps": steps, "init": init,
                       "objective": Run.load(run_dir).config.to_dict()["objective"], **speed,
                       "ratio_to_dsm_time_per_step": base_rate / speed["steps_per_s"], "scores": scores}
    for m in models.values():
        for sampler, sc in m["scores"].items():
            sc["fd_minus_base"] = sc["fd"] - models["dsm"]["scores"][sampler]["fd"]
            sc["fd_over_floor"] = sc["fd"] / floor["mean"] if floor["mean"] > 0 else None
    import diffusers

    result = {"benchmark": "diffusers_finetune",
              "settings": {"train_seed": a.train_seed,
                           "dsm_steps": a.dsm_steps, "ft_steps": a.ft_steps, "n": a.n, "batch_size": a.batch,
                           "lr": a.lr, "ft_lr": a.ft_lr, "sampling_seed": a.seed, "threads": a.threads,
                           "samplers": {s: {"sampler": SAMPLERS[s][0], **SAMPLERS[s][1]} for s in SCORED_SAMPLERS},
                           "unet_config": Run.load(dsm_dir).config.model.diffusers,
                           "parameters": sum(t.numel() for t in Run.load(dsm_dir).denoiser.parameters())},
              "classifier": {"heldout_accuracy": classifier.heldout_accuracy},
              "floor": {"n": a.n, "draws": FLOOR_DRAWS, "drawn_vs_all": floor},
              "models": models,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
              "wall_time_s": time.perf_counter() - t0}
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")
    print()
    print(table(result))


def table(r: dict) -> str:
    """A compact markdown table of a result."""
    labels = [r["models"]["dsm"]["scores"][s]["label"] for s in SCORED_SAMPLERS]
    head = ["model", "steps", "ms / step", "x DSM", *(f"FD {x}" for x in labels), *(f"d FD {x}" for x in labels)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in r["models"].values():
        sc = [m["scores"][s] for s in SCORED_SAMPLERS]
        lines.append("| " + " | ".join([m["label"], f"{m['steps']:,}", f"{m['ms_per_step']:.0f}",
                                        f"{m['ratio_to_dsm_time_per_step']:.2f}", *(f"{x['fd']:.3g}" for x in sc),
                                        *(f"{x['fd_minus_base']:+.3g}" for x in sc)]) + " |")
    f = r["floor"]["drawn_vs_all"]
    lines.append(f"| real vs real (floor, n {r['floor']['n']}, {f['n']} draws) | - | - | - | "
                 + " | ".join([f"{f['mean']:.3g} +- {f['std']:.2g}"] * len(labels)) + " |" + " - |" * len(labels))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
