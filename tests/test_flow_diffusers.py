"""diffusers flow-matching models in and out: a UNet2DModel saved with a FlowMatchEulerDiscreteScheduler or
FlowMatchHeunDiscreteScheduler is a velocity network (precond flow) whose flow-euler / flow-heun samples equal
diffusers' own scheduler loops (at the scheduler's shift, the run's default); it fine-tunes (fm, cdl) and exports
back to a folder that diffusers and difflab both load; scheduler classes and FlowMatch options difflab does not
reproduce are refused in one line."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.cli import main  # noqa: E402
from difflab.config import load_config  # noqa: E402
from difflab.errors import DifflabError  # noqa: E402
from difflab.exports import scheduler_class  # noqa: E402
from difflab.imports.diffusers_folder import DDPM_SCHEDULERS, FLOW_REFUSED  # noqa: E402
from difflab.runs import Run, load_samples  # noqa: E402
from difflab.samplers import draw_noise, run_chain  # noqa: E402
from difflab.samplers.base import Noise  # noqa: E402

UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)
EULER, HEUN = "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"
CASES = [(EULER, 1.0), (EULER, 3.0), (HEUN, 1.0), (HEUN, 3.0)]


def tiny_unet(seed: int = 0):
    """A random-initialised 8x8 UNet2DModel, its weights jittered so that wrong wiring shows."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(class, shift): folder}: Euler ones as pipeline folders (model_index.json, unet/, scheduler/), Heun ones as a
    UNet2DModel folder with its scheduler_config.json beside the weights; and the UNet itself."""
    root, unet, out = tmp_path_factory.mktemp("flow"), tiny_unet(), {}
    for cls, shift in CASES:
        path = root / f"{cls}-{shift}"
        sched = getattr(diffusers, cls)(shift=shift)
        if cls == EULER:
            diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
        else:
            unet.save_pretrained(path)
            sched.save_config(path)
        out[cls, shift] = path
    return out, unet


def config_of(sched) -> dict:
    """A scheduler's config as its scheduler_config.json holds it (with _class_name)."""
    return {"_class_name": type(sched).__name__, **dict(sched.config)}


def scheduler_of(path, cls):
    folder = path / "scheduler" if (path / "scheduler").is_dir() else path
    return getattr(diffusers, cls).from_pretrained(folder)


@pytest.mark.parametrize(("cls", "shift"), CASES)
def test_a_flowmatch_folder_is_a_velocity_network(folders, cls, shift):
    paths, unet = folders
    run = Run.load(paths[cls, shift])
    assert run.precond == "flow" and run.config.model.arch == "diffusers" and run.shape == (1, 8, 8)
    assert run.config.schedule.shift == shift and run.default_sampler == "flow-euler"
    assert run.state["scheduler"] == cls and run.step == 0
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    with torch.no_grad():
        want = x_t - t.reshape(-1, 1, 1, 1) * unet(x_t, 1000 * t).sample  # x0_hat = x_t - t v(x_t, 1000 t)
        wrong = x_t - t.reshape(-1, 1, 1, 1) * unet(x_t, 1000 * t - 1).sample  # one timestep off
        got = run.denoiser.flow_x0(x_t, t)
        s = t[:3] / (1 - t[:3])  # the sigma-space denoiser at x = x_t / (1 - t), sigma = t / (1 - t)
        by_sigma = run.denoiser(x_t[:3] / (1 - t[:3]).reshape(-1, 1, 1, 1), s)
    scale = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(by_sigma, want[:3], rtol=0, atol=2e-5 * scale)
    assert float((wrong - want).abs().max()) > 1e-4 * scale


@pytest.mark.parametrize(("cls", "shift"), CASES)
def test_flow_samplers_equal_diffusers_flowmatch_loops(folders, cls, shift):
    """flow-euler is FlowMatchEulerDiscreteScheduler's loop and flow-heun FlowMatchHeunDiscreteScheduler's (2n - 1
    network calls) from the same noise, at the scheduler's shift, which the run samples with unless told."""
    paths, unet = folders
    run, n, steps = Run.load(paths[cls, shift]), 3, 8
    sampler = "flow-euler" if cls == EULER else "flow-heun"
    ours, stats = run.sample(n, seed=0, sampler=sampler, steps=steps, dtype=torch.float32)
    sched = scheduler_of(paths[cls, shift], cls)
    assert sched.config.shift == shift
    sched.set_timesteps(steps)
    assert len(sched.timesteps) == (steps if cls == EULER else 2 * steps - 1) == stats.nfe_per_sample
    if cls == EULER:  # the same grid of times (diffusers' sigmas, float32)
        chain = run.chain(sampler, steps=steps)
        torch.testing.assert_close(chain.state_coef[:, 1].float(), sched.sigmas, rtol=0, atol=1e-6)
    x = draw_noise(0, range(n), run.shape, steps, False, torch.float32).x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    scale = float(x.abs().max())
    assert float((ours - x).abs().max()) < 1e-5 * scale
    same, _ = run.sample(n, seed=0, sampler=sampler, steps=steps, dtype=torch.float32, shift=shift)
    assert torch.equal(same, ours)  # the default shift is the scheduler's
    if shift != 1.0:
        other, _ = run.sample(n, seed=0, sampler=sampler, steps=steps, dtype=torch.float32, shift=1.0)
        assert float((other - ours).abs().max()) > 1e-3 * scale


def test_difflab_sample_uses_the_schedulers_shift(folders, tmp_path, capsys):
    path = folders[0][EULER, 3.0]
    out = tmp_path / "s.npz"
    assert main(["sample", str(path), "--steps", "4", "--n", "2", "--out", str(out), "--json", "--quiet"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["sampler"] == "flow-euler" and stats["nfe_per_sample"] == 4
    x, _ = load_samples(out)
    want, _ = Run.load(path).sample(2, seed=0, sampler="flow-euler", steps=4, shift=3.0)
    assert torch.equal(x, want)


def test_fine_tune_with_fm_and_cdl_export_and_load_back(folders, tmp_path, capsys):
    """fm and cdl fine-tune the imported velocity network (it stays one, with the scheduler's shift); the fm run
    exports as a pipeline folder with a FlowMatchEulerDiscreteScheduler that diffusers loads and runs as
    difflab's flow-euler, and that difflab loads back as the same model (bit-equal samples)."""
    paths, unet = folders
    path = paths[EULER, 3.0]
    small = {"fm": ["--steps", "2"], "cdl": ["--steps", "1", "--set", "objective.options.n_cdl=2",
                                             "--set", "objective.options.n_alpha=2"]}
    before = Run.load(path).denoiser.state_dict()
    runs = {}
    for objective, args in small.items():
        r = tmp_path / objective
        assert main(["train", "--init", str(path), "--data", "digits", "--objective", objective, *args,
                     "--batch-size", "8", "--out", str(r), "--quiet"]) == 0, objective
        run = runs[objective] = Run.load(r)
        assert run.precond == "flow" and run.config.model.arch == "diffusers" and run.config.schedule.shift == 3.0
        after = run.denoiser.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), objective  # it trained
    run, e = runs["fm"], tmp_path / "E"
    assert main(["export", str(tmp_path / "fm"), "--format", "diffusers", "--out", str(e)]) == 0
    index = json.loads((e / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", EULER]
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(e / "scheduler")
    assert sched.config.shift == 3.0 and sched.config.num_train_timesteps == 1000
    exported = diffusers.UNet2DModel.from_pretrained(e / "unet")
    theirs, ours = exported.state_dict(), run.denoiser.net.unet.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    back = Run.load(e)
    assert back.precond == "flow" and back.config.schedule.shift == 3.0
    a, _ = run.sample(3, seed=1, sampler="flow-euler", steps=6, dtype=torch.float64)
    b, _ = back.sample(3, seed=1, sampler="flow-euler", steps=6, dtype=torch.float64)
    assert float((a - b).abs().max()) <= 1e-12
    pipe = diffusers.DiffusionPipeline.from_pretrained(e)  # diffusers' generic loop with the flow scheduler
    assert isinstance(pipe, diffusers.DDPMPipeline) and type(pipe.scheduler).__name__ == EULER
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=6,
                  output_type="pt").images
    x_T = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    mine = run_chain(back.chain("flow-euler", steps=6), Noise(x_T, None))
    torch.testing.assert_close(images, (mine / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
    capsys.readouterr()


def test_a_precond_no_diffusers_scheduler_expresses_is_refused():
    for precond in ("ve", "vp", "edm"):
        with pytest.raises(DifflabError, match=f"cannot express the '{precond}' preconditioning") as e:
            scheduler_class(SimpleNamespace(precond=precond))
        assert "\n" not in str(e.value) and "--format safetensors" in str(e.value)
    assert scheduler_class(SimpleNamespace(precond="flow")) == EULER
    assert scheduler_class(SimpleNamespace(precond="v")) == "DDPMScheduler"


@pytest.fixture(scope="module")
def unet_dir(folders):
    return folders[0][HEUN, 1.0]  # a UNet2DModel folder: its scheduler_config.json is replaced per test


def with_scheduler(unet_dir, tmp_path, config: dict, name="m"):
    """A copy of the UNet folder whose scheduler_config.json is ``config``."""
    path = tmp_path / name
    shutil.copytree(unet_dir, path)
    (path / "scheduler_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config", [{"_class_name": "LCMScheduler"}, {"_class_name": "FooScheduler"},
                                    {"num_train_timesteps": 1000}])
def test_unknown_or_missing_scheduler_classes_are_refused_in_one_line(unet_dir, tmp_path, capsys, config):
    path = with_scheduler(unet_dir, tmp_path, config)
    with pytest.raises(DifflabError) as e:
        Run.load(path)
    msg = str(e.value)
    assert "\n" not in msg and "DDPMScheduler" in msg and EULER in msg and HEUN in msg
    assert (config["_class_name"] in msg) if "_class_name" in config else "names no scheduler class" in msg
    assert main(["sample", str(path), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DDPMScheduler" in err


@pytest.mark.parametrize(("key", "value"), [*((k, 0.5 if k == "shift_terminal" else True) for k in FLOW_REFUSED),
                                            ("num_train_timesteps", 500)])
def test_flowmatch_options_difflab_does_not_reproduce_are_refused_in_one_line(unet_dir, tmp_path, key, value):
    config = {**config_of(diffusers.FlowMatchEulerDiscreteScheduler()), key: value}
    with pytest.raises(DifflabError, match=key) as e:
        Run.load(with_scheduler(unet_dir, tmp_path, config))
    assert "\n" not in str(e.value) and EULER in str(e.value) and "not supported" in str(e.value)


def test_heun_and_shift_refusals(unet_dir, tmp_path):
    heun = config_of(diffusers.FlowMatchHeunDiscreteScheduler())
    with pytest.raises(DifflabError, match="num_train_timesteps 500 is not supported"):
        Run.load(with_scheduler(unet_dir, tmp_path, {**heun, "num_train_timesteps": 500}, "a"))
    for bad in (0, -1.0, "3", True):
        with pytest.raises(DifflabError, match="must be a number > 0"):
            Run.load(with_scheduler(unet_dir, tmp_path, {**heun, "shift": bad}, f"b{bad}"))
    with pytest.raises(DifflabError, match=r"schedule\.shift must be > 0"):
        load_config(overrides=["schedule.shift=0"])
    assert load_config(overrides=["schedule.shift=3"]).schedule.shift == 3.0


def test_a_pipeline_whose_index_and_scheduler_config_disagree_is_refused(folders, tmp_path):
    path = tmp_path / "P"
    shutil.copytree(folders[0][EULER, 1.0], path)
    index = json.loads((path / "model_index.json").read_text())
    (path / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "DDPMScheduler"]}))
    with pytest.raises(DifflabError, match="model_index.json names the scheduler 'DDPMScheduler'"):
        Run.load(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (numpy 2's, inside some of diffusers' schedulers)
@pytest.mark.parametrize("cls", DDPM_SCHEDULERS)
def test_every_ddpm_family_class_loads_as_its_beta_schedule(unet_dir, tmp_path, cls):
    """A DDPM-family scheduler other than DDPMScheduler still loads as before: its beta schedule and prediction
    type (here T = 100, cosine, v_prediction), the schedule diffusers computes from it."""
    sched = getattr(diffusers, cls)(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                    prediction_type="v_prediction")
    run = Run.load(with_scheduler(unet_dir, tmp_path, config_of(sched)))
    assert run.precond == "v" and run.config.schedule.T == 100 and run.config.schedule.kind == "cosine"
    assert run.state["scheduler"] == cls and run.default_sampler == "ddim"
    torch.testing.assert_close(run.schedule.abar[1:], sched.alphas_cumprod.double(), rtol=2e-6, atol=1e-9)


def test_keys_a_ddpm_family_config_lacks_take_its_class_defaults(unet_dir, tmp_path):
    """KDPM2 and Heun default to beta 0.00085 .. 0.012 (DDPM: 1e-4 .. 0.02), as diffusers would read them."""
    run = Run.load(with_scheduler(unet_dir, tmp_path, {"_class_name": "KDPM2DiscreteScheduler"}, "k"))
    assert (run.config.schedule.beta_start, run.config.schedule.beta_end, run.config.schedule.T) == \
        (0.00085, 0.012, 1000)
    run = Run.load(with_scheduler(unet_dir, tmp_path, {"_class_name": "DDIMScheduler"}, "d"))
    assert (run.config.schedule.beta_start, run.config.schedule.beta_end, run.precond) == (1e-4, 0.02, "eps")
    for config, match in [({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                            "timestep_type": "continuous"}, "timestep_type 'continuous'"),
                          ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True,
                            "prediction_type": "flow_prediction"}, "use_flow_sigmas = true")]:
        with pytest.raises(DifflabError, match=match):
            Run.load(with_scheduler(unet_dir, tmp_path, config, config["_class_name"]))
