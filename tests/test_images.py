"""Images end to end at 8x8: every objective trains a tiny U-Net on the digits, every sampler draws from it."""

import pytest
import torch

from difflab.cli import main
from difflab.config import load_config
from difflab.runs import Run
from difflab.training import Trainer, train

TINY = ['data.name="digits"', 'model.arch="unet"', 'model.preset="tiny"', "train.batch_size=8", "train.steps=3",
        "train.log_every=1", "train.ckpt_every=100", "train.warmup_steps=1", "train.lr=1e-3"]
OBJECTIVES = {"dsm": [], "edm": [], "vp": [], "ve": [], "itd": [], "cdl": ["objective.options.n_cdl=2",
              "objective.options.n_alpha=4"], "stf": ["objective.options.reference_size=64"],
              "sa": ["objective.options.K=2"], "sa-edm": ['objective.name="sa"', 'objective.options.grid="edm"']}
SAMPLERS = {"ddpm": {"steps": 10}, "ddim": {"steps": 5}, "heun": {"steps": 4}, "euler": {"steps": 4}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-runs")
    out = {}
    for name, extra in OBJECTIVES.items():
        obj = [] if name == "sa-edm" else [f'objective.name="{name}"']
        cfg = load_config(overrides=[*TINY, *obj, *extra])
        res = train(cfg, root / name, progress=False)
        assert res.step == 3 and torch.isfinite(torch.tensor(res.loss)), name
        out[name] = root / name
    return out


@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("sampler", [*SAMPLERS, "picard-ddim"])
def test_every_objective_and_sampler_at_8x8(runs, objective, sampler):
    run = Run.load(runs[objective])
    assert run.shape == (1, 8, 8)
    name = sampler.removeprefix("picard-")
    parallel = {"window": 3, "tol": 0.0} if sampler.startswith("picard") else None
    x, stats = run.sample(3, seed=0, sampler=sampler, parallel=parallel, **SAMPLERS[name])
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    if parallel:  # tol 0: the parallel sampler reproduces the sequential chain (up to float32 batch round-off)
        seq, _ = run.sample(3, seed=0, sampler=name, **SAMPLERS[name])
        assert float((x - seq).abs().max()) <= 1e-5 * float(seq.abs().max())


def test_image_networks_use_the_sigma_data_of_images(runs):
    run = Run.load(runs["edm"])
    assert run.precond == "edm" and run.denoiser.sigma_data == 0.5


def test_flips_are_drawn_per_row_and_step(tmp_path):
    cfg = load_config(overrides=[*TINY, 'data.name="digits?flip=1"', "train.batch_size=64"])
    trainer = Trainer(cfg, tmp_path / "r")
    assert trainer.flip and not trainer.dataset.flip  # the stored set stays unflipped
    seen = []
    trainer.objective.draw = lambda x0, gen, real=trainer.objective.draw: seen.append(x0.clone()) or real(x0, gen)
    trainer.train_step()
    trainer.train_step()
    x_train = trainer.x_train
    mirrored = 0
    for x0 in seen:
        for row in x0:
            plain = (x_train == row).flatten(1).all(1).any()
            flipped = (x_train == row.flip(-1)).flatten(1).all(1).any()
            assert plain or flipped
            mirrored += int(flipped and not plain)
    assert 20 < mirrored < 108  # about half of the 128 rows (symmetric digits count as plain)


def test_image_training_writes_sample_grids_from_the_cli(tmp_path):
    out = tmp_path / "r"
    code = main(["train", "--data", "digits", "--arch", "unet", "--preset", "tiny", "--objective", "edm",
                 "--steps", "4", "--batch-size", "8", "--sample-every", "2", "--set", "train.sample_n=9",
                 "--out", str(out), "--quiet"])
    assert code == 0
    from PIL import Image

    grids = sorted((out / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step-00000002.png", "step-00000004.png"]
    w, h = Image.open(grids[-1]).size
    assert w == h and w >= 3 * 32  # 3 x 3 tiles of at least 32 px
    assert main(["sample", str(out), "--sampler", "heun", "--n", "16", "--grid", str(tmp_path / "g.png"),
                 "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    assert Image.open(tmp_path / "g.png").size == (4 * 32 + 3, 4 * 32 + 3)  # 4 x 4 tiles, 1-px gaps


def test_unet_on_flat_data_and_mlp_on_images_are_refused(tmp_path, capsys):
    assert main(["train", "--data", "dino", "--arch", "unet", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "square images (C, H, W)" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--arch", "mlp", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "use model.arch = 'unet'" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--arch", "unet", "--preset", "huge", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 2
    assert "tiny" in capsys.readouterr().err
