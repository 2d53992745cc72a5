"""diffusers models in and out: a pipeline or UNet2DModel folder is a Run (sampled by every sampler, fine-tuned,
exported back), and difflab's DDPM/DDIM on it equal diffusers' own scheduler loops with the same noise."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.cli import main  # noqa: E402
from difflab.errors import DifflabError  # noqa: E402
from difflab.runs import Run  # noqa: E402
from difflab.samplers import draw_noise, run_chain  # noqa: E402

T = 100
UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


def tiny_pipeline(path, prediction_type="epsilon", beta_schedule="linear", seed=0):
    """A random-initialised 8x8 UNet2DModel with a T = 100 DDPMScheduler, saved as a pipeline folder."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET)
    with torch.no_grad():  # larger outputs than the near-zero init, so that wrong wiring shows
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type,
                                    beta_schedule=beta_schedule, clip_sample=False)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path)
    return unet.eval(), sched


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "P"
    unet, sched = tiny_pipeline(path)
    return path, unet, sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2", "scaled_linear"])
def test_an_imported_unet_is_the_denoiser_its_scheduler_implies(tmp_path, prediction_type, beta_schedule):
    unet, sched = tiny_pipeline(tmp_path / "P", prediction_type, beta_schedule)
    run = Run.load(tmp_path / "P")
    assert run.shape == (1, 8, 8) and run.step == 0 and run.config.model.arch == "diffusers"
    assert run.precond == {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}[prediction_type]
    abar = sched.alphas_cumprod.double()  # diffusers computes its betas in float32
    torch.testing.assert_close(run.schedule.abar[1:], abar, rtol=2e-6, atol=1e-9)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 8, 8, generator=g)
    eps = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 17, 60, 99])  # diffusers' 0-based timesteps
    a = abar[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        out = unet(x_t, t).sample
    want = {"epsilon": (x_t - (1 - a).sqrt() * out) / a.sqrt(), "sample": out,
            "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * out}[prediction_type]  # x0 from the prediction
    sigma = run.schedule.sigma[t + 1].float()  # difflab's step t + 1 is diffusers' t
    got = run.denoiser(x_t / a.sqrt(), sigma)
    # float32 round-off, amplified by 1 / sqrt(abar) at the noisiest step (~2000 for the cosine schedule)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    wrong = run.denoiser(x_t / a.sqrt(), run.schedule.sigma[t].float())  # one step off: visibly another denoiser
    assert float((wrong - want).abs().max()) > 1e-3 * float(want.abs().max())


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_equals_diffusers_ddim_scheduler(pipe, spacing):
    """diffusers' DDIM always steps by the stride T // n (to t - T // n, whatever the listed timesteps), so it is
    the chain through its listed timesteps for leading spacing and for trailing when n divides T; difflab's DDIM
    goes to the next listed timestep (so its 'linspace' is not diffusers' DDIM with linspace)."""
    path, unet, _ = pipe
    run = Run.load(path)
    n, k = 10, 3
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True,
                                    timestep_spacing=spacing)
    sched.set_timesteps(n)
    chain = run.chain("ddim", steps=n, spacing=spacing)
    assert torch.equal(chain_timesteps(chain, run), sched.timesteps + 1)
    noise = draw_noise(0, range(k), run.shape, n, False, torch.float32)
    ours = run_chain(chain, noise)
    x = noise.x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert float((ours - x).abs().max()) < 1e-4 * float(x.abs().max())
    assert float((ours - noise.x_T).abs().max()) > 0.1  # (it did sample something)


@pytest.mark.parametrize(("steps", "spacing"), [(T, "linspace"), (20, "leading"), (20, "trailing")])
def test_ddpm_equals_diffusers_ddpm_scheduler_with_the_same_noise(pipe, monkeypatch, steps, spacing):
    """beta_tilde variance (diffusers' fixed_small); the step noise z_j is handed to diffusers' step."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    path, unet, _ = pipe
    run = Run.load(path)
    k = 3
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, variance_type="fixed_small",
                                    timestep_spacing=spacing)
    sched.set_timesteps(steps)
    chain = run.chain("ddpm", steps=steps, variance="beta_tilde", spacing=spacing)
    assert torch.equal(chain_timesteps(chain, run), sched.timesteps + 1)
    noise = draw_noise(0, range(k), run.shape, steps, True, torch.float32)
    ours = run_chain(chain, noise)
    j = {"i": 0}

    def our_noise(shape, generator=None, device=None, dtype=None):  # diffusers' draw for step i: our z_i
        return noise.z[:, j["i"]].to(dtype)

    monkeypatch.setattr(ddpm_module, "randn_tensor", our_noise)
    x = noise.x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            j["i"] = i
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert float((ours - x).abs().max()) < 1e-4 * float(x.abs().max())


def chain_timesteps(chain, run) -> torch.Tensor:
    """The DDPM steps a chain visits, read back from its states' noise levels."""
    abar = chain.state_coef[:-1, 0] ** 2
    return torch.tensor([int(torch.argmin((run.schedule.abar - a).abs())) for a in abar])


@pytest.mark.slow
def test_every_sampler_samples_an_imported_pipeline_from_the_cli(pipe, tmp_path, capsys):
    path, _, _ = pipe
    for sampler, steps in [("ddpm", 100), ("ddim", 20), ("heun", 5), ("euler", 5), ("picard-ddpm", 100),
                           ("picard-ddim", 20)]:
        out = tmp_path / f"{sampler}.npz"
        assert main(["sample", str(path), "--sampler", sampler, "--steps", str(steps), "--n", "4", "--out", str(out),
                     "--json", "--quiet"]) == 0, sampler
        stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        with np.load(out) as f:
            assert f["samples"].shape == (4, 1, 8, 8) and np.isfinite(f["samples"]).all()
        assert stats["checkpoint_step"] == 0 and stats["run"] == str(path)
    # the parallel sampler at tol 0 is the sequential chain
    seq, _ = Run.load(path).sample(3, seed=1, sampler="ddim", steps=20)
    par, _ = Run.load(path).sample(3, seed=1, sampler="picard-ddim", steps=20, parallel={"tol": 0.0})
    assert float((par - seq).abs().max()) < 1e-5 * float(seq.abs().max())


def test_a_unet_folder_with_its_scheduler_beside_it_and_bad_folders(pipe, tmp_path):
    path, unet, _ = pipe
    assert Run.load(path / "unet").shape == (1, 8, 8)  # ../scheduler/scheduler_config.json
    lone = tmp_path / "lone"
    unet.save_pretrained(lone)
    with pytest.raises(DifflabError, match="no scheduler config"):
        Run.load(lone)
    pickled = tmp_path / "pickled"
    unet.save_pretrained(pickled, safe_serialization=False)
    (pickled / "scheduler_config.json").write_text((path / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(DifflabError, match="safetensors weights only"):
        Run.load(pickled)


def test_fine_tune_export_and_load_back_in_diffusers(pipe, tmp_path, capsys):
    """The issue's acceptance path: fine-tune the pipeline with STF on the digits, export it as a DDPMPipeline,
    and diffusers runs it; the weights moved; the safetensors export loads back as the same denoiser."""
    path, unet, _ = pipe
    r = tmp_path / "R"
    assert main(["train", "--init", str(path), "--data", "digits", "--objective", "stf", "--steps", "3",
                 "--batch-size", "8", "--set", "objective.options.reference_size=16", "--out", str(r),
                 "--quiet"]) == 0
    cfg = json.loads((r / "config.json").read_text())
    assert cfg["model"]["arch"] == "diffusers" and cfg["model"]["precond"] == "eps" and cfg["schedule"]["T"] == T
    assert main(["export", str(r), "--format", "diffusers", "--out", str(tmp_path / "E")]) == 0
    capsys.readouterr()
    exported = diffusers.DDPMPipeline.from_pretrained(tmp_path / "E")
    images = exported(num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1)
    a, b = exported.unet.state_dict(), unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert exported.scheduler.config.num_train_timesteps == T and exported.scheduler.config.prediction_type == \
        "epsilon"
    run, back = Run.load(r), Run.load(tmp_path / "E")  # the export is a diffusers folder again: the same network
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back.denoiser(x, 0.7), run.denoiser(x, 0.7), rtol=0, atol=1e-6)
    assert main(["export", str(r), "--format", "safetensors", "--out", str(tmp_path / "S")]) == 0
    flat = Run.load(tmp_path / "S")
    assert flat.step == 3 and torch.equal(flat.denoiser(x, 0.7), run.denoiser(x, 0.7))
    assert main(["export", str(r), "--out", str(tmp_path / "S")]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err


def test_train_a_diffusers_network_from_scratch(tmp_path, capsys):
    r = tmp_path / "scratch"
    small = ["--set", "model.diffusers.block_out_channels=[8,16]", "--set", "model.diffusers.norm_num_groups=4",
             "--set", 'model.diffusers.down_block_types=["DownBlock2D","DownBlock2D"]',
             "--set", 'model.diffusers.up_block_types=["UpBlock2D","UpBlock2D"]']
    assert main(["train", "--data", "digits", "--arch", "diffusers", *small, "--steps", "2", "--batch-size", "8",
                 "--out", str(r), "--quiet"]) == 0
    run = Run.load(r)
    assert run.config.model.diffusers["block_out_channels"] == [8, 16] and run.precond == "eps"
    assert main(["train", "--data", "digits", "--arch", "diffusers", "--objective", "edm", "--steps", "2",
                 "--out", str(tmp_path / "edm"), "--quiet"]) == 2
    assert "discrete-time VP network" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_calc_samples_an_imported_model_itself(pipe, tmp_path, capsys):
    path, _, _ = pipe
    ref = tmp_path / "ref.npz"
    assert main(["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--out", str(ref),
                 "--quiet"]) == 0
    args = ["fid", "calc", "--run", str(path), "--sampler", "ddim", "--steps", "10", "--n", "20", "--ref", str(ref),
            "--json", "--quiet"]
    capsys.readouterr()
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    x, _ = Run.load(path).sample(20, seed=0, sampler="ddim", steps=10)  # the same samples, scored by hand
    np.save(tmp_path / "x.npy", x.clamp(-1, 1).float().numpy())
    assert main(["fid", "calc", "--samples", str(tmp_path / "x.npy"), "--ref", str(ref), "--json", "--quiet"]) == 0
    by_hand = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["n"] == 20 and got["classifier_fd"] == pytest.approx(by_hand["classifier_fd"], rel=1e-5)
    assert main(["fid", "calc", "--samples", str(tmp_path / "x.npy"), "--n", "5", "--ref", str(ref)]) == 2
    assert "go with --run" in capsys.readouterr().err


class _Hostile:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_diffusers_folder_with_a_crafted_pickle_is_refused_unexecuted(pipe, tmp_path):
    """Weights are read from safetensors only: a hostile .bin beside (or instead of) them is never unpickled."""
    import pickle
    import shutil

    path, _, _ = pipe
    marker = tmp_path / "MARKER"
    both = tmp_path / "both"
    shutil.copytree(path, both)
    (both / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Hostile(marker)))
    assert Run.load(both).shape == (1, 8, 8)  # the safetensors weights; the .bin is never read
    only = tmp_path / "only"
    shutil.copytree(path, only)
    (only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (only / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Hostile(marker)))
    with pytest.raises(DifflabError, match="safetensors weights only"):
        Run.load(only)
    assert main(["sample", str(only), "--n", "2", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 2
    assert not marker.exists()


@pytest.mark.parametrize("objective", ["dsm", "edm", "vp", "ve", "itd", "cdl", "stf", "sa"])
def test_every_objective_fine_tunes_an_imported_pipeline(pipe, tmp_path, objective):
    """A diffusers network keeps what it predicts (eps here): every objective trains it through that denoiser."""
    path, _, _ = pipe
    small = {"cdl": ["--set", "objective.options.n_cdl=2", "--set", "objective.options.n_alpha=2"],
             "stf": ["--set", "objective.options.reference_size=16"]}.get(objective, [])
    assert main(["train", "--init", str(path), "--data", "digits", "--objective", objective, "--steps", "1",
                 "--batch-size", "8", *small, "--out", str(tmp_path / "r"), "--quiet"]) == 0
    run = Run.load(tmp_path / "r")
    assert run.precond == "eps" and run.config.model.arch == "diffusers" and run.step == 1
    before = Run.load(path).denoiser.state_dict()
    after = run.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


@pytest.mark.slow
def test_a_class_conditional_unet_samples_with_labels_as_diffusers_does(tmp_path, capsys):
    """num_class_embeds: labels reach the UNet through every sampler (Picard's rows carry their sample's label);
    'random' labels are drawn per sample, so batches do not matter; fine-tuning it on more classes than it has is
    refused in one line (test_conditioning fine-tunes one)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET, num_class_embeds=3).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False)
                           ).save_pretrained(tmp_path / "C")
    run = Run.load(tmp_path / "C")
    assert run.num_classes == 3
    with pytest.raises(DifflabError, match="class-conditional"):
        run.sample(2, sampler="ddim", steps=10)
    n = 10
    sched.set_timesteps(n)
    x, stats = run.sample(3, seed=0, sampler="ddim", steps=n, spacing="leading", class_labels=2, dtype=torch.float32)
    ref = draw_noise(0, range(3), run.shape, n, False, torch.float32).x_T
    with torch.no_grad():
        for t in sched.timesteps:
            ref = sched.step(unet(ref, t, class_labels=torch.full((3,), 2)).sample, t, ref).prev_sample
    assert float((x - ref).abs().max()) < 1e-4 * float(ref.abs().max()) and stats.extra["class_labels"] == 2
    other, _ = run.sample(3, seed=0, sampler="ddim", steps=n, spacing="leading", class_labels=0)
    assert float((other - x.double()).abs().max()) > 1e-3  # the label matters
    labels = run.labels("random", 8, seed=5)
    assert torch.equal(run.labels("random", 4, seed=5, start=4), labels[4:]) and len(set(labels.tolist())) > 1
    whole, _ = run.sample(8, seed=5, sampler="ddpm", steps=20, class_labels="random")
    parts, _ = run.sample(8, seed=5, sampler="ddpm", steps=20, class_labels="random", batch_size=3)
    par, _ = run.sample(8, seed=5, sampler="picard-ddpm", steps=20, class_labels="random",
                        parallel={"tol": 0.0, "window": 7, "max_batch": 5})
    scale = float(whole.abs().max())
    assert float((parts - whole).abs().max()) < 1e-5 * scale and float((par - whole).abs().max()) < 1e-5 * scale
    with pytest.raises(DifflabError, match=r"class index in 0\.\.2 \(this model has 3 classes\)"):
        run.sample(2, sampler="ddim", steps=5, class_labels=3)
    with pytest.raises(DifflabError, match="2 values .one per sample. in 0..2"):
        run.sample(2, sampler="ddim", steps=5, class_labels=[0, 3])
    assert main(["sample", str(tmp_path / "C"), "--sampler", "heun", "--steps", "3", "--n", "2", "--class", "1",
                 "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    assert main(["sample", str(tmp_path / "C"), "--n", "2", "--class", "one", "--out", str(tmp_path / "t.npz")]) == 2
    assert main(["train", "--init", str(tmp_path / "C"), "--data", "digits", "--steps", "1", "--out",
                 str(tmp_path / "ft"), "--quiet"]) == 2
    assert "has labels up to 9, but the network has 3 classes" in capsys.readouterr().err


def test_an_unconditional_model_refuses_labels(pipe):
    with pytest.raises(DifflabError, match="not class-conditional"):
        Run.load(pipe[0]).sample(2, sampler="ddim", steps=5, class_labels=1)
