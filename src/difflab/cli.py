"""The ``difflab`` command: a thin shell over the library, one sub-command per task.

Every command validates its input before any work starts; bad input ends in one line ``error: ...`` and exit
status 2. With ``--json`` a command prints one JSON object as its last line of output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from difflab import __version__
from difflab.cli_common import command_ends
from difflab.errors import DifflabError, require

EPILOG_TRAIN = """examples:
  difflab train --data dino --objective dsm --steps 20000 --seed 0 --out runs/dsm
  difflab train --config run.toml --set train.lr=3e-4 --set objective.options.antithetic=true --out runs/x
  difflab train --out runs/dsm --resume                 # continue the newest checkpoint exactly
  difflab train --objective cdl --init runs/dsm --steps 2000 --out runs/cdl-ft   # fine-tune a DSM run with CDL

objectives and their options (--set objective.options.NAME=VALUE):
{objectives}

images: difflab train --data digits --objective edm --sample-every 500 --out runs/d   (model.unet.KEY=VALUE sets a
  U-Net option, e.g. --set model.unet.dropout=0.1)

the logged loss: each example's loss summed over its dimensions (the papers' convention), averaged over the
  batch; so it grows with the dimension (2 for the Dino: ~0.5; 64 for the 8x8 digits: 45 over the first 100 steps,
  about 5 by step 2,000).
config sections (TOML, or --set section.key=value): data, model, schedule, objective, train; every key with its
default and range: the docs' config reference (docs/reference/config.md)."""


def train_epilog() -> str:
    """EPILOG_TRAIN with each registered objective's help line (built with the parser: late registrations show)."""
    from difflab.objectives import objectives_help

    return EPILOG_TRAIN.replace("{objectives}", objectives_help())


SAMPLER_NOTES = {  # one line per sampler in 'difflab sample --help'; its options are read from its signature
    "ddpm": "ancestral DDPM on the run's schedule (N NFE)",
    "ddim": "DDIM(eta) on a sub-sequence of the run's timesteps (N NFE)",
    "heun": "EDM's Heun on the sigma grid of Karras et al. (2N-1 NFE)",
    "euler": "heun without the Heun correction (N NFE)",
    "dpmpp-2m": "DPM-Solver++ 2M on the run's DDPM grid (N NFE)",
    "dpmpp-2m-edm": "DPM-Solver++ 2M on EDM's sigma grid (N NFE)",
    "flow-euler": "a flow-matching model's ODE from t = 1 to 0 on diffusers' FlowMatchEulerDiscreteScheduler grid "
                  "(N NFE; the default for an fm model)",
    "flow-heun": "the same grid, Heun (2N-1 NFE)",
}


def samplers_epilog(width: int = 116) -> str:
    """Each sampler with what it is and its flags with their defaults (read from its signature)."""
    import inspect
    import textwrap

    from difflab.samplers import SEQUENTIAL

    lines = ["samplers and their options:"]
    for name, fn in SEQUENTIAL.items():
        params = inspect.signature(fn).parameters
        flags = [f"--{dest.replace('_', '-')}={_default_text(dest, params[kw].default).replace(' ', '_')}"
                 for dest, (kw, _, _) in SAMPLER_FLAGS.items() if kw in params]
        lines.append(textwrap.fill(f"{SAMPLER_NOTES.get(name, '')}: {' '.join(flags)}", width,
                                   initial_indent=f"  {name:<13} ", subsequent_indent=" " * 16,
                                   break_on_hyphens=False))
    lines.append("  T: the run's schedule.T (1000). An fm model also samples with ddim, heun, euler and dpmpp-2m(-edm)"
                 "\n  through its denoiser.")
    return "\n".join(lines)


EPILOG_SAMPLE = """parallel (Picard iteration over the same steps; the JSON stats report iterations and NFE per sample):
  picard-ddpm | picard-ddim | picard-heun | picard-euler | picard-dpmpp-2m[-edm] | picard-flow-euler|heun
         --window --tol ({tol:g}) --criterion cumulative|step
         --max-sweeps --init prior|warm|extrapolate --warm-steps --init-steps --convergence sample|batch
         --max-batch --accel none|taa --accel-memory --accel-reg
  fastest on long stochastic chains: --accel taa --init extrapolate (DDPM-1000: about half the sweeps of plain
  Picard and a third of its NFE; see the docs' sampling page, docs/sampling.md)
sample k depends only on (--seed, k): the same whatever --batch-size."""


EPILOG_STUDY = """studies:
  dino    the CDL paper's 2-D benchmark: objectives x samplers (DDPM-1000, DDIM-50, Heun-18, parallel DDPM plain
          and with TAA + the extrapolated start), MMD over seeds, Picard iterations, NFE, distance to the
          sequential twin, wall time, held-out likelihood; sample grid, MMD per Picard iteration and loss figures
  gmm1d   CDL Fig. 1: denoiser-error maps of the two-mode 1-D mixture with sequential and parallel trajectories
  variance  STF Figs. 2-3: DSM and STF target variance against the noise level (dino, gmm1d, digits)
  gap     SA Fig. 4: the estimation gap of DSM and SA-2/3/4 models along their own trajectories (dino)
  digits  DSM, EDM, EDM + STF, CDL and SA-2 on the 8x8 digits with a U-Net: classifier Frechet distance against
          real-vs-real floors, KID, class coverage, bits/dim, sample grids (tiny U-Net; quick: 800 steps)
  guidance  class-conditional digits (DSM; also edm, stf, sa2): the share of samples read as the asked-for class
          at classifier-free guidance W = 0, 1, 3, per class; a figure of samples by class and weight
  flow    flow matching on the dino: DSM beside fm, fm-ot (OT-CFM), fm-stf (stable velocity) and fm-sa2: MMD with
          DDPM-1000, at 5..100 network calls (flow-Euler/Heun; DSM: DDIM, DPM-Solver++ 2M), parallel
          flow-Euler-100, MMD during training, path straightness, target variance V_FM(t) vs V_stable(t; n)
  autoguide  autoguidance on the dino (Karras et al. 2024): DSM guided by its own checkpoint at a fifth of the
          steps and by a half-width run trained a fifth as long, (1 + W) D - W D_guide; MMD with DDPM-1000 and
          Heun-18 at W = 0, 0.5, 1, 2 and of each guide alone; a figure of MMD against W (quick: 3,000 steps)
  phema   post-hoc EMA (EDM2) on the dino and the digits: one DSM run each tracks two power-function EMA
          profiles; EMAs of 8 lengths rebuilt from their snapshots and scored (MMD, classifier FD) beside the fixed
          EMA and the raw weights, and the reconstruction of a third, directly tracked profile checked
re-running with the same --out skips every finished training run and sampling result."""


EPILOG_EXPORT = """formats:
  diffusers    a DDPMPipeline folder (model_index.json, unet/, scheduler/): the run's EMA UNet2DModel and a
               DDPMScheduler with its schedule and prediction type (an fm run: a FlowMatchEulerDiscreteScheduler
               with its shift); for runs whose network is a diffusers model (--arch diffusers, or a fine-tune of
               an imported diffusers folder)
  safetensors  model.safetensors (the denoiser's EMA state dict) and run.json (config, shape, step), for any run;
               'difflab sample', 'train --init' and Run.load read the folder back
examples:
  difflab export runs/ft --format diffusers --out exported/   # then DDPMPipeline.from_pretrained("exported/")"""


def _emit(obj: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {v:.6g}" if isinstance(v, float) else f"{k}: {v}")


# --------------------------------------------------------------------------------------------- train


def cmd_train(a: argparse.Namespace) -> dict | None:
    from difflab.config import RunConfig
    from difflab.options import flag_overrides
    from difflab.paths import check_writable

    given = flag_overrides(a, RunConfig)  # the config flags given, as section.key=value (--log none: [])
    check_writable(a.out, "--out", folder=True)  # before anything is loaded (train() checks again, for the library)
    return _resume(a, given) if a.resume else _train_new(a, [*(a.set or []), *given])


def _plan_report(plan, **extra) -> dict:
    """What --dry-run prints: the plan's resolved config and memory estimate."""
    return {"valid": True, **extra, "parameters": plan.memory["parameters"],
            "memory_estimate_bytes": plan.memory["total"], "config": plan.cfg.to_dict()}


def _train_new(a: argparse.Namespace, overrides: list[str]) -> dict | None:
    from difflab.config import load_config, to_toml
    from difflab.training import distributed, train
    from difflab.training.plan import prepare_training

    cfg = load_config(a.config, overrides)  # a fine-tune (--init) inherits its parent's data, model, schedule
    if a.print_config or a.dry_run:  # the config a run would save (as TOML that --config reads back), checked
        from difflab.training.trainer import check_run_dir

        if a.dry_run:
            check_run_dir(Path(a.out), resume=False, overwrite=a.overwrite)
        plan = prepare_training(cfg, memory=a.dry_run)
        return print(to_toml(plan.cfg), end="") if a.print_config else _plan_report(plan)
    result = train(cfg, a.out, overwrite=a.overwrite, until=a.until, progress=not a.quiet)
    return result.to_dict() if distributed.is_main() else None


def _resume(a: argparse.Namespace, given: list[str]) -> dict | None:
    from difflab.config import RunConfig, to_toml
    from difflab.options import options
    from difflab.training import distributed, train
    from difflab.training.trainer import AlreadyTrained

    runtime = [o for o in options(RunConfig) if o.spec.runtime]
    extra = [o for o in [*(a.set or []), *given] if not o.startswith(tuple(f"{r.key}=" for r in runtime))]
    require(a.config is None and not extra, "--resume continues a run with its saved config: only --until and the "
                                            f"runtime settings ({', '.join(r.flag for r in runtime)}) may be given "
                                            "with it")
    if a.dry_run or a.print_config:  # the saved config and its checkpoint, checked as a resume would read them
        from difflab.training.checkpoint import load_checkpoint
        from difflab.training.plan import prepare_training

        require(Path(a.out).is_dir(), f"nothing to resume in {a.out}: no such run folder")
        saved = load_checkpoint(Path(a.out))[1]
        cfg = RunConfig.from_dict(saved["config"])
        if a.print_config:
            return print(to_toml(cfg), end="")
        return _plan_report(prepare_training(cfg, resumed=True), resume_from_step=saved["step"])
    log = next((json.loads(o.split("=", 1)[1]) for o in given if o.startswith("train.log=")), None)
    try:
        result = train(None, a.out, resume=True, until=a.until, steps=a.steps, progress=not a.quiet,
                       threads=a.threads, device=a.device, log=log)
    except AlreadyTrained as e:  # a finished run: said in one line, nothing touched, not a failure
        print(f"note: {e}", file=sys.stderr)
        return {"run_dir": str(a.out), "step": e.step, "steps": e.steps, "trained_steps": 0}
    return result.to_dict() if distributed.is_main() else None


# --------------------------------------------------------------------------------------------- sample


# flag dest: (the samplers' keyword, type, what it sets); the defaults are read from the samplers' signatures
SAMPLER_FLAGS = {
    "steps": ("steps", int, "sampling steps"),
    "variance": ("variance", str, "beta | beta_tilde: the DDPM step variance"),
    "spacing": ("spacing", str, "uniform | quadratic, or diffusers' leading | trailing | linspace: the timesteps "
                                "taken from the run's DDPM grid"),
    "clip": ("clip", float, "clip x0_hat to [-clip, clip]"),
    "eta": ("eta", float, "DDIM's noise: 0 deterministic, 1 = DDPM with the beta_tilde variance"),
    "sigma_min": ("sigma_min", float, "the lowest noise level of EDM's grid"),
    "sigma_max": ("sigma_max", float, "the highest noise level of EDM's grid"),
    "rho": ("rho", float, "the exponent of EDM's grid"),
    "churn": ("S_churn", float, "EDM's stochastic churn S_churn"),
    "s_tmin": ("S_tmin", float, "EDM's S_tmin: churn above this noise level"),
    "s_tmax": ("S_tmax", float, "EDM's S_tmax: churn below this noise level"),
    "s_noise": ("S_noise", float, "EDM's S_noise: the churn noise's scale"),
    "shift": ("shift", float, "SD3's timestep shift (diffusers' shift; a run's default is its schedule.shift)"),
}
NONE_READS = {"steps": "T"}  # what a sampler's None default means, where not "off"


def sampler_defaults(kwarg: str) -> str:
    """The samplers that take ``kwarg`` with their defaults, read from their signatures: 'heun, euler: 18; ...'."""
    import inspect

    from difflab.samplers import SEQUENTIAL

    groups: dict[str, list[str]] = {}
    for name, fn in SEQUENTIAL.items():
        param = inspect.signature(fn).parameters.get(kwarg)
        if param is not None:
            groups.setdefault(_default_text(kwarg, param.default), []).append(name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in groups.items())


def _default_text(kwarg: str, d) -> str:
    return NONE_READS.get(kwarg, "off") if d is None else f"{d:g}" if isinstance(d, float) else str(d)





def picard_options(a: argparse.Namespace):
    """The Picard flags given, checked, for a parallel sampler (picard-ddpm, ...); None for a sequential one, which
    refuses them."""
    from difflab.samplers import PicardOptions

    given = {k: getattr(a, k) for k in PicardOptions.names() if getattr(a, k) is not None}
    if not (a.sampler or "").startswith("picard-"):
        require(not given, f"--{next(iter(given), '').replace('_', '-')} applies to the parallel samplers only "
                           "(picard-<sampler>, e.g. picard-ddpm)")
        return None
    return PicardOptions.from_dict(given)


GRID_N = 64  # the samples a --grid draws (and --n's default when only a grid is asked for)


def cmd_sample(a: argparse.Namespace) -> dict | None:
    from difflab.runs import Run, split_step
    from difflab.training import distributed

    require(a.n is None or a.n >= 1, f"--n must be >= 1, got {a.n}")
    require(a.batch_size >= 1, f"--batch-size must be >= 1, got {a.batch_size}")
    guidance = 0.0 if a.guidance is None else a.guidance
    require(guidance >= 0, f"--guidance must be >= 0 (0: no guidance), got {a.guidance}")
    require(a.guide_with is None or a.guidance is not None, "--guide-with needs --guidance W, the autoguidance "
                                                            "weight: (1 + W) D(x) - W D_guide(x)")
    require(a.guide_with is None or a.null_class is None, "--null-class is classifier-free guidance's unconditional "
                                                          "label; with --guide-with the guide gets the same --class")
    run_path, at = split_step(a.run)  # a folder (a run, an imported model), RUN@STEP or a weights file: the
    # samples go beside it
    out = Path(a.out) if a.out else run_path.with_name(f"{run_path.stem}-samples.npz") if run_path.is_file() \
        else run_path / ("samples.npz" if at is None else f"samples-step{at}.npz")
    require(out.suffix == ".npz", f"--out must end in .npz, got {out}")
    require(a.grid is None or Path(a.grid).suffix.lower() == ".png", f"--grid must end in .png, got {a.grid}")
    from difflab.paths import check_writable

    check_writable(out, "--out")  # before the model is loaded and sampled from
    if a.grid:
        check_writable(a.grid, "--grid")
    from difflab.models import arch_for
    from difflab.threads import set_threads

    require(a.threads is None or a.threads >= 0, f"--threads must be >= 0, got {a.threads}")
    parallel = picard_options(a)  # (checked before the model is loaded)
    device = distributed.resolve_device(a.device)
    run = Run.load(a.run, ema=not a.no_ema, device=device)
    guide = run.guide_run(a.guide_with) if a.guide_with else None  # (its EMA weights, on the same device)
    set_threads(a.threads, arch_for(run.config, run.shape))  # a fixed count by network (difflab.threads)
    require(a.grid is None or len(run.shape) == 3,
            f"--grid draws images; this run's examples have shape {run.shape} (use difflab eval --plot)")
    options = {SAMPLER_FLAGS[k][0]: v for k, v in vars(a).items() if k in SAMPLER_FLAGS and v is not None}
    images = len(run.shape) == 3
    a.sampler = a.sampler or run.default_sampler  # (DDIM-50 for images: minutes, not an hour, on a CPU)
    if guide is not None:  # refused before any sampling: a guide that cannot guide this model with this sampler
        run.autoguided(guide, guidance, a.sampler)
    a.n = a.n or (GRID_N if a.grid and not a.out else 2000)
    rank, world = distributed.init_from_env(device)  # under torchrun the processes share the work (Run.sample):
    # over NCCL when the network is on a GPU, so the parallel sampler's gathers stay there
    if images and not a.quiet and rank == 0:  # the cost, before it is spent (once, not per process)
        nfe = float(run.chain(a.sampler.removeprefix("picard-"), **options).nfe.sum())
        print(f"note: {a.n:,} samples x {nfe:,.0f} network calls ({a.sampler}"
              f"{', + as many guide calls' if guide else ', x2 rows for guidance' if guidance else ''}) on {device}; "
              "--n, --sampler and --steps set the cost", file=sys.stderr)
    samples, stats = run.sample(a.n, a.seed, a.sampler, parallel=parallel, batch_size=a.batch_size, out=out,
                                dtype=a.state_dtype, progress=not a.quiet, class_labels=a.class_label,
                                guidance=guidance, null_class=a.null_class, guide_with=guide, **options)
    if rank != 0:
        return None
    result = run.record(stats, a.seed, out, world)
    if a.grid:
        from difflab.plots import save_image_grid

        result["grid"] = str(save_image_grid(samples[:GRID_N], a.grid))
    return result


# --------------------------------------------------------------------------------------------- export


def cmd_export(a: argparse.Namespace) -> dict:
    from difflab.exports import FORMATS, export_run
    from difflab.paths import check_writable
    from difflab.runs import Run

    require(a.format in FORMATS, f"unknown --format {a.format!r}: use {' or '.join(FORMATS)}")
    check_writable(a.out, "--out", folder=True)
    run = Run.load(a.run, ema=True)
    out = export_run(run, a.out, a.format, overwrite=a.overwrite)
    return {"run": str(a.run), "format": a.format, "out": str(out), "checkpoint_step": run.step}


# --------------------------------------------------------------------------------------------- eval


def cmd_eval(a: argparse.Namespace) -> dict:
    from difflab.data import get_dataset
    from difflab.data.files import load_array
    from difflab.metrics import mmd

    require(a.metric == "mmd", f"unknown metric {a.metric!r}: use 'mmd'")
    require(a.bandwidth > 0, f"--bandwidth must be > 0, got {a.bandwidth}")
    if a.plot:
        from difflab.paths import check_writable

        check_writable(a.plot, "--plot")
    samples = load_array(a.samples, key="samples")  # an .npz must hold 'samples' (as difflab sample writes)
    ds = get_dataset(a.data)
    require(tuple(samples.shape[1:]) == tuple(ds.shape),
            f"samples have shape {tuple(samples.shape[1:])} per example but {a.data} has {tuple(ds.shape)}")
    ref = ds.eval_data(a.n_ref, a.ref_seed)
    result = {"mmd": mmd(samples, ref, a.bandwidth), "bandwidth": a.bandwidth, "n_samples": len(samples),
              "n_ref": len(ref), "data": a.data}
    if a.plot:
        from difflab.plots import scatter_vs_data

        scatter_vs_data(samples, ref, a.plot, title=f"{Path(a.samples).name}: MMD {result['mmd']:.2e}")
        result["plot"] = a.plot
    return result


# --------------------------------------------------------------------------------------------- study


def cmd_study(a: argparse.Namespace) -> dict:
    from difflab.studies import StudyOptions, run_study

    def names(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    from difflab.paths import check_writable

    check_writable(a.out, "--out", folder=True)

    opts = StudyOptions(out=Path(a.out), quick=a.quick, seeds=a.seeds, budget_steps=a.budget_steps,
                        budget_seconds=a.budget_seconds, picard_window=a.picard_window, progress=not a.quiet,
                        threads=a.threads, device=a.device)
    if a.objectives:
        opts.objectives = names(a.objectives)
    if a.samplers:
        opts.samplers = names(a.samplers)
    report = run_study(a.name, opts)
    return {"study": a.name, "report": str(report), "results": str(Path(report).with_name("results.json"))}


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``difflab`` parser: one sub-parser per command, each built by its ``add_*_parser``."""
    p = argparse.ArgumentParser(prog="difflab", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    from difflab.cli_compare import add_parser as add_compare_parser
    from difflab.cli_fid import add_parser as add_fid_parser
    from difflab.cli_info import add_parser as add_info_parser
    from difflab.cli_phema import add_parser as add_phema_parser

    for add in (add_train_parser, add_sample_parser, add_export_parser, add_eval_parser, add_study_parser,
                add_compare_parser, add_fid_parser, add_info_parser, add_phema_parser):
        add(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"  # (the commands, without their aliases' noise)
    return p


def add_train_parser(sub) -> None:
    from difflab.config import RunConfig
    from difflab.options import add_flags

    t = sub.add_parser("train", help="train a denoiser; writes a run folder", epilog=train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="TOML config file (defaults apply where it is silent)")
    add_flags(t, RunConfig)  # one flag per config option that declares one (difflab.config)
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override any config key")
    t.add_argument("--out", required=True, help="run folder (config, log, checkpoints)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    t.add_argument("--until", type=int, help="stop at this step with a checkpoint (resume later)")
    t.add_argument("--dry-run", action="store_true", help="validate the config and the data, then stop")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults filled in for the data and network) as TOML, which "
                        "--config reads back, then stop; with --resume: the run's saved config")
    command_ends(t, cmd_train, "a JSON summary", quiet="no progress bar")


def add_sample_parser(sub) -> None:
    from difflab.samplers import SEQUENTIAL, PicardOptions

    s = sub.add_parser("sample", help="draw samples from a trained run",
                       epilog=samplers_epilog() + "\n" + EPILOG_SAMPLE.format(tol=PicardOptions().tol),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run", help="run folder (its newest checkpoint), a checkpoint folder, an exported folder, a "
                               "diffusers pipeline or UNet2DModel folder, or a state-dict file with run.json beside it")
    s.add_argument("--sampler",
                   help=f"{' | '.join(SEQUENTIAL)}, or picard-<one of them> (parallel)   [ddpm; images: ddim; an "
                        "fm model: flow-euler]")
    s.add_argument("--steps", type=int, help=f"sampling steps   [{sampler_defaults('steps')}]")
    s.add_argument("--n", type=int, help=f"number of samples   [2000; {GRID_N} when --grid is given without --out]")
    s.add_argument("--seed", type=int, default=0, help="sample k uses a stream seeded by (seed, k)   [0]")
    s.add_argument("--batch-size", type=int, default=4096, help="samples evaluated together   [4096]")
    s.add_argument("--out", help="output .npz (key 'samples')   [RUN/samples.npz; beside a weights file: "
                                 "NAME-samples.npz]")
    s.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    s.add_argument("--threads", type=int, help="torch CPU threads   [0: by the network, as difflab train]")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N: where the network and the "
                                                    "sampler's arithmetic run (the noise is drawn on the CPU)   "
                                                    "[auto]")
    s.add_argument("--state-dtype", default="auto", choices=("auto", "float32", "float64"),
                   help="the sampler state's dtype   [auto: float64 on the CPU, float32 on a GPU]")
    s.add_argument("--grid", help=f"image runs: also write the first {GRID_N} samples as a PNG grid")
    s.add_argument("--class", dest="class_label", metavar="K|all|random",
                   help="class-conditional models: every sample of class K, sample k of class k mod K (all), or "
                        "each sample's class drawn from (--seed, k)")
    s.add_argument("--guidance", type=float, metavar="W",
                   help="guidance weight: classifier-free (with --class) (1 + W) D(x, class) - W D(x, unconditional), "
                        "diffusers' guidance_scale is 1 + W; autoguidance (with --guide-with) (1 + W) D(x) - W "
                        "D_guide(x), EDM2's guidance is 1 + W   [0: none]")
    s.add_argument("--guide-with", metavar="RUN",
                   help="autoguidance: guide with this worse model of the same data, weighted by --guidance: a run "
                        "folder, RUN@STEP (a checkpoint the run kept, e.g. runs/dsm@1200) or an imported model (its "
                        "EMA weights); it gets the same --class labels")
    s.add_argument("--null-class", type=int, metavar="N",
                   help="--guidance with an imported diffusers model: the class index it was trained to read as "
                        "'no class'   [difflab's U-Net: the zero label]")
    for dest, (kwarg, kind, what) in SAMPLER_FLAGS.items():
        if dest != "steps":
            s.add_argument(f"--{dest.replace('_', '-')}", type=kind, help=f"{what}   [{sampler_defaults(kwarg)}]")
    add_picard_flags(s)
    command_ends(s, cmd_sample, "the stats", quiet="no progress bar")


def add_picard_flags(s: argparse.ArgumentParser) -> None:
    """The parallel samplers' flags, their defaults read from PicardOptions."""
    from difflab.samplers import PicardOptions

    po = PicardOptions()  # the defaults, from their one home
    s.add_argument("--window", type=int, help="picard: steps evaluated per sweep (0: the whole chain)   [0]")
    s.add_argument("--tol", type=float, help=f"picard: tolerance relative to the step noise std   [{po.tol:g}]")
    s.add_argument("--criterion", help="picard: what --tol bounds: cumulative (the change since the last sweep) | "
                                       f"step (the one-step residual; needs a far smaller tol)   [{po.criterion}]")
    s.add_argument("--max-sweeps", type=int, help="picard: stop after this many sweeps   [steps]")
    s.add_argument("--init", help="picard: prior | warm (a coarse deterministic pass) | extrapolate (--init-steps "
                                  "true steps, then the clean estimate frozen along the noise)   [prior; "
                                  "extrapolate with --accel taa]")
    s.add_argument("--warm-steps", type=int, help=f"picard: denoiser calls of the warm start   [{po.warm_steps}]")
    s.add_argument("--init-steps", type=int, help="picard: true steps before the extrapolation   "
                                                  f"[{po.init_steps}]")
    s.add_argument("--accel", help="picard: none | taa (triangular Anderson acceleration)   "
                                   f"[{po.accel}]")
    s.add_argument("--accel-memory", type=int, help=f"picard: iterates TAA keeps, 1..8   [{po.accel_memory}]")
    s.add_argument("--accel-reg", type=float, help=f"picard: TAA regularisation (relative)   [{po.accel_reg:g}]")
    s.add_argument("--convergence", help="picard: sample (batch-invariant) | batch (ParaDiGMS rule)   "
                                                       f"[{po.convergence}]")
    s.add_argument("--max-batch", type=int, help="picard: evaluate a sweep's rows in chunks of this size   [all]")


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a run for other tools: a diffusers pipeline, or weights + config",
                       epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("run", help="run folder, checkpoint folder, or an imported model (a diffusers folder)")
    x.add_argument("--format", default="diffusers", help="diffusers | safetensors   [diffusers]")
    x.add_argument("--out", required=True, help="the folder to write (new or empty)")
    x.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    command_ends(x, cmd_export, "the result")


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="score samples against a data set")
    e.add_argument("samples", help=".npz (key 'samples'), .npy or .csv of samples")
    e.add_argument("--data", default="dino", help="reference data set or file   [dino]")
    e.add_argument("--metric", default="mmd", help="mmd   [mmd]")
    e.add_argument("--bandwidth", type=float, default=0.03, help="MMD kernel variance b   [0.03]")
    e.add_argument("--n-ref", type=int, default=None, help="reference points   [8000 fresh points of a toy set]")
    e.add_argument("--ref-seed", type=int, default=1, help="seed of the reference draw   [1]")
    e.add_argument("--plot", help="also write a scatter plot of samples beside the data (PNG)")
    command_ends(e, cmd_eval, "the result")


def add_study_parser(sub) -> None:
    st = sub.add_parser("study", help="reproduce an experiment: trains, samples, scores, writes a report",
                        epilog=EPILOG_STUDY, formatter_class=argparse.RawDescriptionHelpFormatter)
    from difflab.studies import STUDIES

    st.add_argument("name", help=" | ".join(STUDIES))
    st.add_argument("--out", required=True, help="output folder (report.md, results.json, figures, runs)")
    st.add_argument("--quick", action="store_true", help="short budgets for a first look (minutes)")
    st.add_argument("--seeds", type=int, default=1, help="training seeds per objective   [1]")
    st.add_argument("--objectives", help="comma-separated: dsm,itd,cdl,cdl-ft,edm,stf,sa2,sa3,sa4 (cdl-ft: CDL "
                                         "fine-tune of the DSM run; stf: EDM + STF, n 4096; saK: SA-K), and the "
                                         "flow-matching fm,fm-ot,fm-stf,fm-sa2 (dino, digits: on request)   "
                                         "[dino: dsm,itd,cdl,cdl-ft (quick: dsm,itd,cdl); gmm1d: dsm,itd,cdl,cdl-ft; "
                                         "gap: dsm,sa2,sa3,sa4; digits: dsm,edm,stf,cdl,sa2; guidance: dsm (also "
                                         "edm, stf, sa2); flow: dsm,fm,fm-ot,fm-stf,fm-sa2]")
    st.add_argument("--samplers", help="comma-separated: ddpm,ddim,heun,picard-ddpm, picard-ddpm-clip (x0_hat "
                                       "clipped to 3), picard-ddpm-taa, picard-ddpm-x0 (extrapolated start), "
                                       "picard-ddpm-taa-x0   [dino: the first four and picard-ddpm-taa-x0; "
                                       "gmm1d, gap: the first four; digits: ddim,heun]")
    g = st.add_mutually_exclusive_group()
    g.add_argument("--budget-steps", type=int, help="training steps per run, equal for every objective")
    g.add_argument("--budget-seconds", type=float, help="equal wall-clock budget per run (steps from a timing run)")
    st.add_argument("--picard-window", type=int,
                    help="dino: the parallel sampler's window, 0 for the whole chain (the paper)   [250; quick 100]")
    st.add_argument("--threads", type=int, help="torch CPU threads for every run of the study   [0: by the "
                                                "network, as difflab train]")
    st.add_argument("--device", help="auto | cpu | cuda | cuda:N: where the networks train   [auto]")
    command_ends(st, cmd_study, "where the report is", quiet="no progress output")


class Terminated(BaseException):
    """A SIGTERM outside training (which checkpoints on it instead): ends the command like Ctrl-C, in one line (a
    BaseException, as KeyboardInterrupt, so that no ``except Exception`` swallows it)."""


def _terminate(signum, frame):
    raise Terminated()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (e.g. an unsafe Picard combination) as one ``warning: ...`` line, without the source line."""
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading
    import warnings

    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return _run(args)
    finally:
        warnings.showwarning = shown
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # leave a torchrun group cleanly
            dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    try:
        result = args.fn(args)
    except DifflabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT)", file=sys.stderr)
        return 130
    except Terminated:
        print("error: interrupted (SIGTERM)", file=sys.stderr)
        return 143
    except Exception as e:  # a SIGTERM/SIGINT that stopped training at a checkpoint
        from difflab.training import TrainingInterrupted

        if not isinstance(e, TrainingInterrupted):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 128 + e.signum
    if result is not None:  # (under torchrun only the first process reports)
        _emit(result, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
