import json

import numpy as np
import pytest

import difflab.studies.cache as cache
from conftest import seed_classifiers
from difflab.cli import main
from difflab.errors import DifflabError
from difflab.studies import StudyOptions, run_study
from difflab.studies import dino as dino_study
from difflab.studies.report import pm

TRAIN = ["model.width=16", "model.depth=1", "train.batch_size=32", "data.n_train=1000", "train.log_every=20"]
TINY_DINO = {"steps": 60, "ft_steps": 20, "snapshots": 3, "step_counts": [5, 10], "n_samples": 60, "n_ref": 200,
             "n_nll": 40, "n_alpha": 4,
             "floor_draws": 2, "window": None, "train_overrides": TRAIN,
             "chain": {"ddpm": {"steps": 40}, "picard-ddpm": {"steps": 40}, "picard-ddpm-clip": {"steps": 40},
                       "picard-ddpm-taa-x0": {"steps": 40}, "ddim": {"steps": 10}, "heun": {"steps": 5}}}
TINY_GMM = {"steps": 60, "ft_steps": 20, "n_picard": 40, "n_error_paths": 4, "error_sweeps": 2, "T_steps": 1000,
            "n_paths": 3, "n_classify": 50, "n_alpha": 8, "train_overrides": TRAIN}


@pytest.fixture(scope="module")
def dino_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    report = run_study("dino", StudyOptions(out=out, seeds=2, overrides=TINY_DINO, progress=False))
    return out, report


@pytest.mark.slow
def test_dino_study_writes_report_json_and_figures(dino_out):
    out, report = dino_out
    r = json.loads((out / "results.json").read_text())
    assert report == out / "report.md"
    few = r["few_steps"]  # every objective at 5, 10, 20 network calls: Heun spends 2N - 1 of them
    assert set(few) == {"dsm", "itd", "cdl", "cdl-ft"} and set(few["dsm"]) == {"ddim", "heun", "dpmpp-2m"}
    assert few["dsm"]["heun"]["nfe"] == [5, 9, 19] and few["dsm"]["dpmpp-2m"]["nfe"] == [5, 10, 20]
    assert all(v > 0 for per in few.values() for u in per.values() for v in u["value"])
    assert "DPM-Solver++ 2M | " in report.read_text() and "20 calls" in report.read_text()
    assert {(row["objective"], row["sampler"]) for row in r["rows"]} == {
        (o, s) for o in ("dsm", "itd", "cdl", "cdl-ft")
        for s in ("ddpm", "ddim", "heun", "picard-ddpm", "picard-ddpm-taa-x0")}
    for row in r["rows"]:
        assert row["mmd"]["n"] == 2 and all(isinstance(v, float) for v in row["mmd"]["values"])
        assert row["nfe_per_sample"] > 0 and row["wall_time_s"] > 0
        parallel = row["sampler"].startswith("picard-")
        assert (row["iterations"] is not None) == parallel == (row["distance_mean"] is not None)
        if parallel:  # tol 0.1: near the twin, not equal to it (the barely trained model's samples are far out)
            assert 0 < row["distance_mean"] <= row["distance_max"] < float("inf")
    fast = [row for row in r["rows"] if row["sampler"] == "picard-ddpm-taa-x0"]
    assert fast[0]["label"] == "parallel DDPM-40, TAA + extrapolated start"
    assert set(r["nll"]) == {"dsm", "itd", "cdl", "cdl-ft"} and r["versions"]["torch"]
    ft = json.loads((out / "runs" / "cdl-ft-s0" / "config.json").read_text())
    assert ft["objective"]["name"] == "cdl" and ft["train"]["init"].endswith("dsm-s0")
    for fig in r["figures"].values():
        assert (out / fig).stat().st_size > 5000
    assert len(r["picard_mmd_curves"]["DSM (DDPM eps)"]) >= 1
    assert r["mmd_vs_step"]["dsm"]["step"] == [20, 40, 60] and len(r["mmd_vs_step"]["cdl-ft"]["mmd"]) >= 3
    ff = r["far_field"]
    assert set(ff) == {"exact", "dsm", "itd", "cdl", "cdl-ft"} and ff["exact"]["t"] == [700, 400, 200, 50]
    assert max(ff["exact"]["gain"][-1]) < 0.01  # the exact denoiser pulls far states back to the data
    assert all(len(v["max_per_seed"]) == 2 and min(v["max_per_seed"]) > 0.01 for k, v in ff.items() if k != "exact")


@pytest.mark.slow
def test_report_numbers_are_the_json_numbers(dino_out):
    out, _ = dino_out
    r = json.loads((out / "results.json").read_text())
    text = (out / "report.md").read_text()
    assert text == dino_study.render(r)  # the report is a pure function of results.json
    for row in r["rows"]:
        assert pm(row["mmd"]) in text and " +- " in pm(row["mmd"])
    assert "-" not in [c.strip() for line in text.splitlines() if line.startswith("| DSM")
                       for c in line.split("|")[3:4]]  # every MMD cell filled


@pytest.mark.slow
def test_a_rerun_skips_finished_work_and_redoes_only_what_is_missing(dino_out, monkeypatch):
    out, _ = dino_out
    before = (out / "results.json").read_text()
    calls = {"train": 0, "sample": 0}

    def no_train(*a, **k):
        calls["train"] += 1
        raise AssertionError("retrained a finished run")

    real_sample = cache.Run.sample

    def counting_sample(*a, **k):
        calls["sample"] += 1
        return real_sample(*a, **k)

    monkeypatch.setattr(cache, "train", no_train)
    monkeypatch.setattr(cache.Run, "sample", counting_sample)  # every sampling of a run, the curves' too
    (out / "samples" / "itd-s1-ddim.npz").unlink()
    (out / "cache" / "mmd-itd-s1-ddim.json").unlink()
    run_study("dino", StudyOptions(out=out, seeds=2, overrides=TINY_DINO, progress=False))
    assert calls == {"train": 0, "sample": 1}
    after = json.loads((out / "results.json").read_text())
    old = json.loads(before)
    assert [r["mmd"] for r in after["rows"]] == [r["mmd"] for r in old["rows"]]  # same seeds, same numbers


@pytest.mark.slow
def test_an_interrupted_training_run_resumes(tmp_path, monkeypatch):
    opts = StudyOptions(out=tmp_path, seeds=1, objectives=["dsm"], samplers=["ddim"], overrides=TINY_DINO,
                        progress=False)
    from difflab.training import train

    train_partial = cache.load_config(overrides=['data.name="dino"', 'objective.name="dsm"', "train.seed=0",
                                                  "train.steps=60", *TRAIN])
    train(train_partial, tmp_path / "runs" / "dsm-s0", until=20, progress=False)
    seen = []
    real = cache.train
    monkeypatch.setattr(cache, "train", lambda *a, **k: seen.append(k.get("resume", False)) or real(*a, **k))
    run_study("dino", opts)
    assert seen == [True]


@pytest.mark.slow
def test_gmm1d_study(tmp_path):
    report = run_study("gmm1d", StudyOptions(out=tmp_path, seeds=1, overrides=TINY_GMM, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["objective"] for row in r["rows"]] == ["dsm", "itd", "cdl", "cdl-ft"]
    for row in r["rows"]:
        assert 1 <= row["iterations"]["mean"] <= 1000 and 0 <= row["ks"]["mean"] <= 1
        assert row["off_path_error"]["mean"] > 0 and row["on_path_error"]["mean"] > 0
        assert row["parallel_path_error"]["mean"] > 0 and row["sequential_path_error"]["mean"] > 0
    assert (tmp_path / r["figures"]["error_map"]).stat().st_size > 10000
    assert "Picard iterations" in report.read_text()


@pytest.mark.slow
def test_the_clipped_parallel_sampler_adds_its_rows_to_a_finished_study(dino_out):
    """Opt-in sampler: a rerun with it adds its rows (and reuses the trained runs)."""
    out, _ = dino_out
    samplers = ["ddpm", "ddim", "heun", "picard-ddpm", "picard-ddpm-clip"]
    run_study("dino", StudyOptions(out=out, seeds=2, overrides=TINY_DINO, samplers=samplers, progress=False))
    r = json.loads((out / "results.json").read_text())
    clip = [row for row in r["rows"] if row["sampler"] == "picard-ddpm-clip"]
    assert len(clip) == 4 and all(row["iterations"] >= 1 for row in clip)
    assert clip[0]["label"] == "parallel DDPM-40, x0 clipped to 3"
    assert "x0 clipped to 3" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_folder_keeps_its_settings(dino_out):
    out, _ = dino_out
    with pytest.raises(DifflabError, match="holds a dino study with other settings \\(steps\\)"):
        run_study("dino", StudyOptions(out=out, seeds=2, overrides={**TINY_DINO, "steps": 61}, progress=False))


def test_bad_study_input(tmp_path, capsys):
    with pytest.raises(DifflabError, match="unknown study 'dinoo'"):
        run_study("dinoo", StudyOptions(out=tmp_path))
    with pytest.raises(DifflabError, match="unknown objective 'xyz'"):
        run_study("dino", StudyOptions(out=tmp_path, objectives=["xyz"]))
    assert main(["study", "dino", "--out", str(tmp_path), "--samplers", "ddpm,fast", "--quiet"]) == 2
    assert "unknown study sampler 'fast'" in capsys.readouterr().err
    assert main(["study", "dino", "--out", str(tmp_path), "--seeds", "0", "--quiet"]) == 2


@pytest.mark.slow
def test_dino_study_with_stf_rows(tmp_path):
    over = {**TINY_DINO, "objective_config": {"stf": ['objective.name="stf"', "objective.options.reference_size=128"]}}
    over.pop("snapshots")
    run_study("dino", StudyOptions(out=tmp_path, seeds=1, objectives=["edm", "stf"], samplers=["ddim"],
                                   overrides=over, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["objective"] for row in r["rows"]] == ["edm", "stf"]
    cfg = json.loads((tmp_path / "runs" / "stf-s0" / "config.json").read_text())
    assert cfg["objective"] == {"name": "stf", "options": {"reference_size": 128}}


def test_variance_study(tmp_path):
    over = {"datasets": ["gmm1d", "digits"], "n_points": 400, "sigmas": [0.01, 0.3, 3.0, 30.0],
            "ref_sizes": [4, 32], "n_x": 16, "n_draws": 4}
    report = run_study("variance", StudyOptions(out=tmp_path, overrides=over, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["curves"]) == {"gmm1d", "digits"} and len(r["peak"]) == 4
    assert all(row["ratio"] > 1 for row in r["peak"])  # STF's targets vary less than DSM's at the peak
    assert (tmp_path / r["figures"]["variance"]).stat().st_size > 10000 and "V_DSM" in report.read_text()


def test_gap_study(tmp_path):
    over = {"steps": 40, "t0": 30, "n_points": 50, "train_overrides": TRAIN}
    report = run_study("gap", StudyOptions(out=tmp_path, objectives=["dsm", "sa2"], overrides=over, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [x["objective"] for x in r["rows"]] == ["dsm", "sa2"]
    assert r["curves"]["dsm"]["step"][0] == 30 and r["curves"]["dsm"]["step"][-1] == 1
    assert r["rows"][0]["dsm_over_this"] == 1.0 and "SA-2" in report.read_text()


@pytest.mark.slow
def test_digits_study(tmp_path, monkeypatch, digits_classifier):
    # the study keeps its classifier in its folder: there it finds the session's (what it would train) and uses it
    seeded = seed_classifiers(digits_classifier, tmp_path / "cache" / "classifiers")
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "unused"))
    over = {"steps": 30, "batch_size": 32, "n_samples": 100, "n_nll": 16, "n_alpha": 4, "floor_draws": 2,
            "grid": 16, "kid_subsets": 5, "stf_reference": 64}
    report = run_study("digits", StudyOptions(out=tmp_path, objectives=["dsm", "stf"], samplers=["ddim"],
                                              overrides=over, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [(x["objective"], x["sampler"]) for x in r["rows"]] == [("dsm", "ddim"), ("stf", "ddim")]
    assert r["classifier"]["heldout_accuracy"] > 0.9 and r["classifier"]["feature_dim"] == 64
    floor = r["floor"]["half_vs_half"]["mean"]
    for x in r["rows"]:  # 30 training steps: far from the digits, and the metrics say so
        assert x["fd"]["mean"] > 10 * floor and 0 <= x["confident"]["mean"] <= 1 and 0 <= x["coverage"]["mean"] <= 1
        assert x["nfe_per_sample"] == 50
    assert set(r["nll"]) == {"dsm", "stf"} and all(v["bits_per_dim"]["mean"] > 0 for v in r["nll"].values())
    assert r["few_steps"]["stf"]["ddim"]["nfe"] == [5, 10, 20] and "Few steps" in report.read_text()
    assert all(v > floor for u in r["few_steps"]["dsm"].values() for v in u["value"])
    assert all(v["discrete_bound"]["mean"] > 3 for v in r["nll"].values())  # dequantised bits/dim + 3
    assert r["real"]["confident"] > 0.8 and r["real"]["coverage"] > 0.95 and r["real"]["fd"] < 10 * floor
    cfg = json.loads((tmp_path / "runs" / "stf-s0" / "config.json").read_text())
    assert cfg["model"]["arch"] == "unet" and cfg["objective"]["options"]["reference_size"] == 64
    assert (tmp_path / r["figures"]["samples"]).stat().st_size > 5000 and "Classifier Frechet" in report.read_text()
    assert sorted((tmp_path / "cache" / "classifiers").rglob("model.safetensors")) == seeded  # (none trained)
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_picard_figure_legend_quotes_the_papers_numbers(dino_out, monkeypatch):
    """The MMD-per-Picard-iteration figure's dashed lines sit at the paper's plateaus and their legend quotes the
    paper's final MMD (DDPM loss 3.11e-3, CDL 1.23e-3), all taken from the study's paper constants."""
    assert [p["mmd"] for p in dino_study.PAPER] == [3.11e-3, 1.23e-3]
    lines = dino_study.picard_reference_lines(2e-4)
    ddpm = next(label for label in lines if "DDPM loss" in label)
    cdl = next(label for label in lines if "CDL" in label)
    assert "3.11e-3" in ddpm and "1.23e-3" in cdl
    assert lines[ddpm] == dino_study.PAPER_PLATEAU["DDPM loss (paper)"] == 3.4e-3
    assert lines[cdl] == dino_study.PAPER_PLATEAU["CDL (paper)"]
    assert lines["real-vs-real floor spread"] == 2e-4
    # the figure is drawn with exactly these lines (a rerun of the finished study: everything comes from its cache)
    out, _ = dino_out
    drawn = {}
    real_line_plot = dino_study.line_plot

    def recording_line_plot(series, path, *args, hlines=None, **kw):
        drawn[path.name] = hlines
        return real_line_plot(series, path, *args, hlines=hlines, **kw)

    monkeypatch.setattr(dino_study, "line_plot", recording_line_plot)
    run_study("dino", StudyOptions(out=out, seeds=2, overrides=TINY_DINO, progress=False))
    floor = json.loads((out / "results.json").read_text())["floor"]
    assert drawn["fig_picard_mmd.png"] == dino_study.picard_reference_lines(floor["std"])


@pytest.mark.slow
def test_guidance_study(tmp_path, monkeypatch, digits_classifier):
    seeded = seed_classifiers(digits_classifier, tmp_path / "cache" / "classifiers")  # (as in test_digits_study)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "unused"))
    over = {"steps": 20, "batch_size": 32, "per_class": 3, "weights": [0.0, 2.0], "grid_per_class": 2}
    report = run_study("guidance", StudyOptions(out=tmp_path, objectives=["dsm"], samplers=["ddim"], overrides=over,
                                                progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [(x["objective"], x["guidance"]) for x in r["rows"]] == [("dsm", 0.0), ("dsm", 2.0)]
    for x in r["rows"]:  # 20 steps: the accuracy is a share of 30 samples, the per-class ones of 3
        assert len(x["per_class"]) == 10 and 0 <= x["confidence"]["mean"] <= 1
        assert abs(sum(x["per_class"]) / 10 - x["accuracy"]["mean"]) < 1e-12
    cfg = json.loads((tmp_path / "runs" / "dsm-s0" / "config.json").read_text())
    assert cfg["model"]["unet"]["num_classes"] == 10 and cfg["train"]["label_dropout"] == 0.1
    with np.load(tmp_path / "samples" / "dsm-s0-ddim-w2.npz") as f:
        stats = json.loads(str(f["stats"]))
    assert stats["guidance"] == 2.0 and stats["class_labels"] == "all"
    assert (tmp_path / r["figures"]["samples"]).stat().st_size > 3000 and "Guidance study" in report.read_text()
    assert sorted((tmp_path / "cache" / "classifiers").rglob("model.safetensors")) == seeded
    assert not (tmp_path / "unused").exists()


TINY_AUTOGUIDE = {"steps": 30, "n_samples": 60, "n_ref": 200, "floor_draws": 2, "weights": [0.5, 2.0],
                  "train_overrides": TRAIN, "chain": {"ddpm": {"steps": 40}, "heun": {"steps": 5}}}


@pytest.mark.slow
def test_autoguide_study(tmp_path):
    from difflab.studies import autoguide

    report = run_study("autoguide", StudyOptions(out=tmp_path, overrides=TINY_AUTOGUIDE, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    per_sampler = [(None, 0.0), ("early", 0.5), ("early", 2.0), ("early", None), ("small", 0.5), ("small", 2.0),
                   ("small", None)]  # (None: the guide alone)
    assert [(x["sampler"], x["guide"], x["guidance"]) for x in r["rows"]] == [
        (sm, g, w) for sm in ("ddpm", "heun") for g, w in per_sampler]
    assert all(x["mmd"]["n"] == 1 and x["over_unguided"] > 0 for x in r["rows"])
    assert r["guides"]["early"]["step"] == 6 and r["guides"]["small"]["width"] == 8  # a fifth; half of width 16
    with np.load(tmp_path / "samples" / "dsm-s0-heun-early-w2.npz") as f:
        stats = json.loads(str(f["stats"]))
    assert stats["guide"].endswith("dsm-s0/checkpoints/step-00000006") and stats["guide_step"] == 6
    assert stats["guidance"] == 2.0 and stats["steps"] == 5
    small = json.loads((tmp_path / "runs" / "small-s0" / "config.json").read_text())
    assert small["model"]["width"] == 8 and small["train"]["steps"] == 6
    assert json.loads((tmp_path / "runs" / "dsm-s0" / "config.json").read_text())["train"]["ckpt_every"] == 6
    assert (tmp_path / r["figures"]["mmd_vs_w"]).stat().st_size > 5000
    assert report.read_text() == autoguide.render(r) and "early checkpoint (step 6 of 30)" in report.read_text()


def test_autoguide_study_refuses_an_unknown_guide(tmp_path):
    with pytest.raises(DifflabError, match="unknown guide 'huge'"):
        run_study("autoguide", StudyOptions(out=tmp_path, overrides={"guides": ["huge"]}, progress=False))
    with pytest.raises(DifflabError, match="unknown objective 'cdl'"):
        run_study("autoguide", StudyOptions(out=tmp_path, objectives=["cdl"], progress=False))
