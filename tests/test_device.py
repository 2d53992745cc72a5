"""Where the network runs: train.device / --device. The objectives' and samplers' arithmetic runs there too
(tests/test_device_resident.py proves it on the meta device); every random draw comes from a CPU generator, so a
GPU run sees the CPU run's numbers. The GPU cases run where a GPU is visible (skipped elsewhere; the prepared
benchmarks/gpu_check.sh runs them)."""

import pytest
import torch

from difflab.cli import main
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.runs import Run
from difflab.training import distributed, load_checkpoint, train

GPU = torch.cuda.is_available()
TINY = ["train.batch_size=32", "model.width=16", "model.depth=1", "data.n_train=500", "train.log_every=10",
        "train.ckpt_every=10", "train.warmup_steps=5"]


def test_device_names_are_checked_up_front(tmp_path, capsys):
    with pytest.raises(DifflabError, match="train.device = 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        load_config(overrides=['train.device="gpu"'])
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    assert distributed.resolve_device("auto").type == ("cuda" if GPU else "cpu")
    if not GPU:
        with pytest.raises(DifflabError, match="sees no GPU"):
            distributed.resolve_device("cuda:0")
        assert main(["train", "--data", "dino", "--steps", "2", "--device", "cuda", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
        assert "sees no GPU" in capsys.readouterr().err and not (tmp_path / "r" / "checkpoints").exists()
        assert main(["sample", str(tmp_path / "r"), "--device", "cuda:1"]) == 2


def test_explicit_cpu_equals_the_default_on_this_machine(tmp_path):
    if GPU:
        pytest.skip("auto picks the GPU here")
    for name, device in (("a", "auto"), ("b", "cpu")):
        train(load_config(overrides=[*TINY, "train.steps=12", f'train.device="{device}"']), tmp_path / name,
              progress=False)
    a, b = load_checkpoint(tmp_path / "a")[0], load_checkpoint(tmp_path / "b")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("objective", ["dsm", "cdl", "stf", "sa", "fm"])
def test_gpu_training_matches_the_cpu_and_resumes_exactly(tmp_path, objective):
    over = [*TINY, "train.steps=20", f'objective.name="{objective}"']
    train(load_config(overrides=[*over, 'train.device="cpu"']), tmp_path / "cpu", progress=False)
    train(load_config(overrides=[*over, 'train.device="cuda"']), tmp_path / "gpu", progress=False)
    train(load_config(overrides=[*over, 'train.device="cuda"']), tmp_path / "cut", until=7, progress=False)
    train(None, tmp_path / "cut", resume=True, progress=False)
    cpu, gpu, cut = (load_checkpoint(tmp_path / n)[0] for n in ("cpu", "gpu", "cut"))
    for k in cpu:
        if k.startswith("ema."):  # same draws on every device: only the network's float arithmetic differs
            assert torch.allclose(cpu[k], gpu[k], rtol=1e-3, atol=1e-4), k
    assert all(torch.equal(gpu[k], cut[k]) for k in gpu if not k.startswith("rng.")), "resume on the GPU is exact"
    model = Run.load(tmp_path / "gpu", device="cuda").denoiser
    x = torch.randn(8, 2, dtype=torch.float64)
    out = model(x, torch.full((8,), 0.5, dtype=torch.float64))
    assert out.device.type == "cpu" and out.dtype == torch.float64  # the caller's device and dtype come back


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddpm", "picard-ddpm", "picard-heun", "flow-heun", "picard-flow-heun"])
def test_gpu_sampling_matches_the_cpu(tmp_path, sampler):
    """The same per-sample noise on both devices: the samples agree to float tolerance, in either state dtype."""
    objective = ['objective.name="fm"'] if "flow" in sampler else []
    train(load_config(overrides=[*TINY, "train.steps=20", *objective]), tmp_path / "r", progress=False)
    steps = {"steps": 100} if "ddpm" in sampler else {"steps": 18}
    parallel = {"tol": 0.0} if sampler.startswith("picard") else None
    cpu, _ = Run.load(tmp_path / "r").sample(64, 3, sampler, parallel=parallel, **steps)
    for dtype in ("float64", "float32"):
        gpu, stats = Run.load(tmp_path / "r", device="cuda").sample(64, 3, sampler, parallel=parallel, dtype=dtype,
                                                                    **steps)
        assert stats.extra["device"].startswith("cuda") and stats.extra["state_dtype"] == dtype
        assert gpu.device.type == "cpu" and torch.allclose(gpu.double(), cpu, atol=2e-3, rtol=1e-3), dtype
