"""The post-hoc EMA study: one tiny run per data set, every EMA length rebuilt and scored, the reconstruction of a
directly tracked profile checked."""

import json

import pytest

from difflab.studies import StudyOptions, run_study
from difflab.studies.phema import CHECK, STDS


@pytest.mark.slow
def test_phema_study_scores_every_ema_length_after_one_run(tmp_path):
    over = {"steps": 24, "n": 64, "sampler": "ddim", "sampler_steps": 5, "batch_size": 32}
    report = run_study("phema", StudyOptions(out=tmp_path, quick=True, overrides=over, progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    assert [x["data"] for x in r["rows"]] == ["dino", "digits"]
    for row in r["rows"]:
        assert list(row["by_std"]) == [f"{x:g}" for x in STDS] and row["best_std"][0] in STDS
        assert row["best"]["mean"] == min(v["mean"] for v in row["by_std"].values())
        assert all(v["mean"] > 0 for v in (row["fixed"], row["raw"], *row["by_std"].values()))
        c = row["check"]  # the rebuilt profile is the tracked one, to well within the gap between tracked profiles
        assert c["weight_error"]["mean"] < 0.05 and c["profile_error"]["mean"] < 0.01
        assert c["score_rebuilt"]["mean"] == pytest.approx(c["score_tracked"]["mean"], rel=0.05)
        assert (tmp_path / r["figures"][row["data"]]).stat().st_size > 5000
    cfg = json.loads((tmp_path / "runs" / "digits-dsm-s0" / "config.json").read_text())
    assert cfg["train"]["phema"] == [0.05, 0.10, CHECK] and cfg["model"]["arch"] == "unet"
    assert "best post-hoc" in report.read_text()
