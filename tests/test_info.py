"""``difflab info RUN``: a run's facts (kind, step, config, shape, parameters, data, threads, samplers) from a
run folder, a checkpoint, an export or a state dict, without training or sampling; bad paths in one line."""

import json
import shutil

import pytest

from difflab.cli import main
from difflab.config import RunConfig, load_config
from difflab.exports import export_safetensors
from difflab.models import build_denoiser
from difflab.runs import Run
from difflab.training import train
from difflab.training.checkpoint import list_checkpoints

TINY = ["data.n_train=300", "model.width=16", "model.depth=1", "schedule.T=200", "train.batch_size=32",
        "train.steps=6", "train.ckpt_every=3", "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished 6-step Dino run and one stopped at step 3 of 6."""
    root = tmp_path_factory.mktemp("info")
    train(load_config(overrides=TINY), root / "done", progress=False)
    train(load_config(overrides=TINY), root / "half", until=3, progress=False)
    return root


def info(argv, capsys):
    code = main(["info", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def info_json(path, capsys) -> dict:
    code, out, _ = info([str(path), "--json"], capsys)
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def test_json_reports_the_runs_facts(runs, capsys):
    got = info_json(runs / "done", capsys)
    run = Run.load(runs / "done")
    assert got["kind"] == "training run" and got["run"] == str(runs / "done")
    assert (got["step"], got["steps"], got["finished"], got["status"]) == (6, 6, True, "finished")
    assert got["checkpoint"] == str(list_checkpoints(runs / "done")[-1])
    assert got["parameters"] == sum(p.numel() for p in run.denoiser.parameters())
    assert got["data"] == "dino" and got["shape"] == [2] and got["config"] == run.config.to_dict()
    assert (got["arch"], got["precond"], got["objective"], got["conditional"]) == ("mlp", "eps", "dsm", False)
    assert got["samplers"] == {"ddpm": 200, "ddim": 50, "heun": 18, "euler": 18, "dpmpp-2m": 20, "dpmpp-2m-edm": 20}
    assert "picard-ddpm" in got["parallel"] and "picard-heun" in got["parallel"] and got["class_options"] == []
    assert got["sample_command"] == f"difflab sample {runs / 'done'} --sampler ddim --steps 50 --n 2000"
    assert got["threads"] == 1  # the MLP's default, recorded in the checkpoint


def test_human_output_has_the_key_lines(runs, capsys):
    code, out, err = info([str(runs / "done")], capsys)
    lines = out.splitlines()
    assert code == 0 and err == ""
    for expected in (f"run: {runs / 'done'} (training run)", "step: 6 (train.steps 6)", "status: finished",
                     "data: dino", "shape: (2,)", "conditional: no", "  train.steps = 6", '  data.name = "dino"'):
        assert expected in lines, expected
    params = sum(p.numel() for p in Run.load(runs / "done").denoiser.parameters())
    assert f"parameters: {params:,}" in lines
    assert any(line.startswith("samplers (default steps): ddpm (200), ddim (50)") for line in lines)
    assert any(line.startswith("threads: ") for line in lines)
    assert any(line.startswith("sample: difflab sample ") for line in lines)


def test_a_partly_trained_run_says_how_to_resume(runs, capsys):
    got = info_json(runs / "half", capsys)
    resume = f"difflab train --out {runs / 'half'} --resume continues"
    assert (got["step"], got["steps"], got["finished"]) == (3, 6, False)
    assert got["status"] == f"at step 3 of 6: {resume}"
    code, out, _ = info([str(runs / "half")], capsys)
    assert code == 0 and f"status: at step 3 of 6: {resume}" in out.splitlines()


def test_a_checkpoint_folder_an_export_and_a_state_dict(runs, capsys, tmp_path):
    first = list_checkpoints(runs / "done")[0]
    got = info_json(first, capsys)
    assert (got["kind"], got["step"], got["finished"], got["checkpoint"]) == ("checkpoint", 3, False, None)
    assert f"difflab info {runs / 'done'}" in got["status"]  # a newer checkpoint exists: not a resume hint
    export_safetensors(Run.load(runs / "done"), tmp_path / "ex")
    got = info_json(tmp_path / "ex", capsys)
    assert (got["kind"], got["step"], got["finished"], got["data"]) == ("exported", 6, None, "dino")
    assert f"difflab train --init {tmp_path / 'ex'}" in got["status"]
    assert info_json(tmp_path / "ex" / "model.safetensors", capsys)["kind"] == "state dict"


def test_threads_recorded_in_the_state_are_shown(runs, capsys, tmp_path):
    run = shutil.copytree(runs / "done", tmp_path / "r")
    state_file = list_checkpoints(run)[-1] / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "threads": 2}))
    assert info_json(run, capsys)["threads"] == 2
    code, out, _ = info([str(run)], capsys)
    assert "threads: 2" in out.splitlines()


def test_a_class_conditional_edm_model_lists_its_class_options(capsys, tmp_path):
    cfg = RunConfig.from_dict({"data": {"name": "digits"}, "objective": {"name": "edm"},
                               "model": {"arch": "unet", "preset": "tiny", "conditional": True,
                                         "unet": {"model_channels": 16, "num_classes": 10}}})
    export_safetensors(Run.of(build_denoiser(cfg, (1, 8, 8)), cfg, (1, 8, 8)), tmp_path / "c")
    got = info_json(tmp_path / "c", capsys)
    assert (got["conditional"], got["num_classes"], got["precond"], got["shape"]) == (True, 10, "edm", [1, 8, 8])
    assert got["class_options"] == ["--class K|all|random", "--guidance W"]
    assert got["sample_command"].endswith("--sampler heun --steps 18 --n 2000 --class all")
    code, out, _ = info([str(tmp_path / "c")], capsys)
    assert "conditional: yes, 10 classes" in out.splitlines()


def test_a_class_conditional_diffusers_import(capsys, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3)
    sched = diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "p")
    got = info_json(tmp_path / "p", capsys)
    assert (got["kind"], got["data"], got["finished"], got["num_classes"]) == ("diffusers import", None, None, 3)
    assert got["parameters"] == sum(p.numel() for p in unet.parameters()) and got["samplers"]["ddpm"] == 100
    assert got["class_options"][-1] == "--null-class N" and "--data DATA fine-tunes it" in got["status"]


@pytest.mark.parametrize("make", ["missing", "empty folder", "text file"])
def test_a_path_that_is_not_a_run_is_one_line_and_exit_2(make, tmp_path, capsys):
    path = tmp_path / "x"
    if make == "empty folder":
        path.mkdir()
    elif make == "text file":
        path.write_text("not a model")
    code, out, err = info([str(path), "--json"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
