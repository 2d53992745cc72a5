"""Plain state dicts as runs (difflab.imports.state_dict): round trips of the MLP and the U-Net through
.safetensors and torch.save files, wrapper entries and name prefixes, architecture mismatches, and hostile or
broken files, which are refused in one line without running anything."""

import builtins
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.imports.state_dict import find, load_state_dict_model, read_state_dict
from difflab.models import build_denoiser
from difflab.runs import Run
from difflab.training.checkpoint import prefixed


def load_state_dict_run(path, cfg, shape) -> Run:
    """The run Run.load makes of a state-dict file with this config and shape (any suffix)."""
    return Run.of_parts(path, *load_state_dict_model(path, cfg, shape))


MLP = (["model.width=8", "model.depth=1", "schedule.T=50"], (2,))
UNET = (['model.preset="tiny"', "model.unet={model_channels=8}", "schedule.T=50"], (1, 8, 8))
ARCHS = {"mlp": MLP, "unet": UNET}


def network(arch: str, seed: int = 0, extra=()):
    """(config, shape, denoiser) with random weights of O(1), so loading the wrong ones cannot go unnoticed."""
    overrides, shape = ARCHS[arch]
    cfg = load_config(overrides=[*overrides, *extra])
    torch.manual_seed(seed)
    den = build_denoiser(cfg, shape)
    with torch.no_grad():
        for p in den.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return cfg, shape, den.eval()


def save(tensors: dict, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    else:
        torch.save(tensors, path)
    return path


def assert_same_network(run: Run, den, shape):
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.1, 1.0, 5.0, 40.0])
    with torch.no_grad():
        assert torch.equal(run.denoiser(x, sigma), den(x, sigma))
    assert not run.denoiser.training
    assert all(torch.equal(a, b) for a, b in zip(run.denoiser.state_dict().values(), den.state_dict().values(),
                                                 strict=True))


@pytest.mark.parametrize("arch", ["mlp", "unet"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
@pytest.mark.parametrize("naming", ["precond", "backbone", "trainer"])
def test_round_trip_is_bit_for_bit_and_samples(tmp_path, arch, suffix, naming):
    cfg, shape, den = network(arch)
    tensors = {"precond": den.state_dict(), "backbone": den.net.state_dict(),
               "trainer": prefixed("ema.", den.state_dict())}[naming]
    path = save(tensors, tmp_path / f"w{suffix}")
    run = load_state_dict_run(path, cfg, shape)
    assert_same_network(run, den, shape)
    assert run.path == path and run.shape == shape and run.step == 0 and run.config.model == cfg.model
    imported = run.state["imported"]
    assert imported["prefix"] == ("ema." if naming == "trainer" else "")
    assert imported["added_net"] == (naming == "backbone") and imported["entry"] == []
    x, stats = run.sample(3, seed=0, sampler="ddim", steps=4)
    y, _ = Run.of(den, cfg, shape).sample(3, seed=0, sampler="ddim", steps=4)
    assert x.shape == (3, *shape) and torch.isfinite(x).all() and torch.equal(x, y) and stats.steps == 4


def test_a_difflab_checkpoint_weights_file_gives_its_ema(tmp_path):
    cfg, shape, ema = network("mlp", seed=0)
    _, _, raw = network("mlp", seed=1)
    tensors = {**prefixed("model.", raw.state_dict()), **prefixed("ema.", ema.state_dict()),
               "optim.0.exp_avg": torch.zeros(3), "rng.torch": torch.get_rng_state()}
    run = load_state_dict_run(save(tensors, tmp_path / "weights.safetensors"), cfg, shape)
    assert_same_network(run, ema, shape)
    only_raw = save(prefixed("model.", raw.net.state_dict()), tmp_path / "raw.pt")
    assert_same_network(load_state_dict_run(only_raw, cfg, shape), raw, shape)


@pytest.mark.parametrize(("wrap", "entry"), [
    (lambda sd, other: {"state_dict": sd, "epoch": 3}, ["state_dict"]),
    (lambda sd, other: {"ema": sd, "model": other, "step": 7, "note": "hi"}, ["ema"]),
    (lambda sd, other: {"model": {"state_dict": sd}}, ["model", "state_dict"]),
    (lambda sd, other: {"module": sd}, ["module"]),
])
def test_common_wrappers_are_unwrapped_and_named(tmp_path, wrap, entry):
    cfg, shape, den = network("mlp")
    _, _, other = network("mlp", seed=5)
    path = save(wrap(den.net.state_dict(), other.net.state_dict()), tmp_path / "w.pt")
    found = find(path)
    assert list(found.entry) == entry and found.where == "the file's " + "".join(f"[{k!r}]" for k in entry) + " entry"
    assert set(read_state_dict(path)) == set(den.net.state_dict())
    run = load_state_dict_run(path, cfg, shape)
    assert_same_network(run, den, shape)
    assert run.state["imported"]["entry"] == entry
    assert find(save(den.state_dict(), tmp_path / "bare.pt")).where == "the whole file"


@pytest.mark.parametrize(("content", "msg"), [
    ({"w": torch.ones(2), "step": 5}, r"entry 'step' is an int, not a dense tensor \(1 of its 2 entries are tensors"),
    ({"params": {"w": torch.ones(2)}}, r"entry 'params' is a dict.*keys \['params'\].*wrap it under one of ema"),
    ({}, "the whole file holds no tensors"),
    ({"state_dict": {}}, r"the file's \['state_dict'\] entry holds no tensors"),
    ([torch.ones(2)], "the whole file is a list, not a dict of tensors"),
    (torch.ones(2), "the whole file is a Tensor, not a dict of tensors"),
    ({"ema": {"w": torch.ones(2), "n": "x"}},
     r"the file's \['ema'\] entry is not a state dict: its entry 'n' is a str"),
    ({0: torch.ones(2)}, "its key 0 is an int, not a name"),
    ({"w": torch.ones(3).to_sparse()}, "its entry 'w' is a sparse tensor, not a dense tensor"),
])
def test_anything_but_a_dict_of_tensors_is_refused_in_one_line(tmp_path, content, msg):
    path = tmp_path / "w.pt"
    torch.save(content, path)
    with pytest.raises(DifflabError, match=msg) as err:
        read_state_dict(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize(("model_extra", "file_arch", "file_extra", "msg"), [
    ([], "mlp", ["model.width=16"], r"\(shape mismatch at net\.[\w.]+: file \(16, ?\d*\), model \(8, ?\d*\); "),
    ([], "mlp", ["model.depth=2"], r"\(unexpected \['net\.blocks\.1\.emb\.bias', 'net\.blocks\.1\.emb\.weight', "
                                   r"'net\.blocks\.1\.fc1\.bias'\] \(\+3 more\)\)"),
    (["model.depth=2"], "mlp", [], r"\(missing \['net\.blocks\.1\.emb\.bias', .*\] \(\+3 more\)\)"),
    ([], "unet", [], r"\(missing \['net\.blocks\.0.*\] \(\+11 more\); unexpected \['conv_in\.bias', .*more\)\)"),
])
def test_another_architecture_is_refused_in_one_line(tmp_path, model_extra, file_arch, file_extra, msg):
    cfg, shape, _ = network("mlp", extra=model_extra)
    _, _, other = network(file_arch, extra=file_extra)
    path = save(other.net.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(DifflabError, match=msg) as err:
        load_state_dict_run(path, cfg, shape)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"state dict {path} (the whole file) does not match")
    assert "use the config it was trained with" in text


def test_stray_keys_beside_trainer_weights_are_unexpected(tmp_path):
    cfg, shape, den = network("mlp")
    path = save({**prefixed("ema.", den.state_dict()), "stray": torch.ones(1)}, tmp_path / "w.safetensors")
    with pytest.raises(DifflabError, match=r"unexpected \['stray'\]"):
        load_state_dict_run(path, cfg, shape)


class _System:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    """Unpickling this executes Python source."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def hostile(kind: str, marker, path):
    if kind == "torch.save":
        torch.save({"net.inp.weight": torch.ones(2), "x": _System(marker)}, path)
    elif kind == "pickle-2":
        with open(path, "wb") as f:
            pickle.dump({"w": _Exec(marker)}, f, protocol=2)
    else:
        with open(path, "wb") as f:
            pickle.dump(_System(marker), f)
    return path


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
@pytest.mark.parametrize("kind", ["torch.save", "pickle-2", "pickle"])
def test_a_file_that_runs_code_when_unpickled_is_refused_and_not_run(tmp_path, suffix, kind):
    marker = tmp_path / "MARKER"
    path = hostile(kind, marker, tmp_path / f"evil{suffix}")
    cfg, shape, _ = network("mlp")
    for read in (read_state_dict, lambda p: load_state_dict_run(p, cfg, shape)):
        with pytest.raises(DifflabError, match="nothing in it was run") as err:
            read(path)
        text = str(err.value)
        assert "\n" not in text and text.startswith(f"refused {path}: it needs Python objects beyond tensors")
        assert not marker.exists()
    if kind != "pickle":  # the default protocol's framing is refused before any global is reached
        named = r"\(GLOBAL (posix|os|nt)\.system\)" if kind == "torch.save" else r"\(GLOBAL (builtins\.)?exec\)"
        assert re.search(named, text)


@pytest.mark.parametrize("suffix", [".safetensors", ".pkl", ".ckpt"])
def test_hostile_bytes_under_another_name_are_not_unpickled(tmp_path, suffix):
    marker = tmp_path / "MARKER"
    path = hostile("torch.save", marker, tmp_path / f"evil{suffix}")
    msg = "not a readable safetensors file" if suffix == ".safetensors" else "unknown weights format"
    with pytest.raises(DifflabError, match=msg):
        read_state_dict(path)
    assert not marker.exists()


def test_broken_files_are_refused_in_one_line_with_the_fix(tmp_path):
    _, _, den = network("mlp")
    good_st = save(den.state_dict(), tmp_path / "good.safetensors")
    good_pt = save(den.state_dict(), tmp_path / "good.pt")
    (tmp_path / "text.safetensors").write_text("this is not a safetensors file\n")
    (tmp_path / "cut.safetensors").write_bytes(good_st.read_bytes()[: good_st.stat().st_size // 2])
    (tmp_path / "cut.pt").write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    (tmp_path / "text.bin").write_text("hello, not a torch file")
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "weights").write_bytes(good_pt.read_bytes())
    cases = {
        "text.safetensors": "is not a readable safetensors file .*: it is truncated, corrupt or another format",
        "cut.safetensors": "is not a readable safetensors file",
        "cut.pt": r"is not a readable PyTorch file \(\w+\): it is truncated, corrupt or not written by torch.save",
        "text.bin": "is not a readable PyTorch file",
        "folder.pt": "is a folder, not a weights file: give the .safetensors",
        "missing.safetensors": r"no such file: .*missing.safetensors \(give a .safetensors, .pt, .pth or .bin",
        "weights": r"unknown weights format '\(no suffix\)': difflab reads state dicts from .safetensors, .pt",
    }
    for suffix in (".safetensors", ".pt", ".pth", ".bin"):
        (tmp_path / f"empty{suffix}").touch()
        cases[f"empty{suffix}"] = r"is empty \(0 bytes\): the download or copy did not finish"
    for name, msg in cases.items():
        with pytest.raises(DifflabError, match=msg) as err:
            read_state_dict(tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value), name


def test_a_bad_shape_is_refused_before_reading(tmp_path):
    cfg, _, den = network("mlp")
    path = save(den.state_dict(), tmp_path / "w.pt")
    with pytest.raises(DifflabError, match="shape must be the positive sizes"):
        load_state_dict_run(path, cfg, (0,))
