"""The flow-matching study: a tiny run writes a report whose numbers are its JSON's, and its two measures (path
straightness, target variance) against exact fields."""

import json

import pytest
import torch

from difflab.data import get_dataset
from difflab.denoisers import GaussianDenoiser
from difflab.studies import StudyOptions, run_study
from difflab.studies.common import FLOW_OBJECTIVES as FLOW
from difflab.studies.flow import straightness, target_variance

TINY = {"steps": 30, "ddpm_steps": 50, "n_samples": 60, "n_ref": 200, "snapshots": 2, "nfe_counts": [2, 5],
        "picard_steps": 8, "straight_steps": 10, "n_straight": 50, "variance_t": [0.3, 0.8], "variance_n": [8, 32],
        "variance_rows": 20, "train_overrides": ["train.batch_size=64", "objective.options.reference_size=128"]}


def test_straight_paths_score_zero_and_the_dino_field_does_not():
    """Paths to a single point are straight lines (S ~ 0); the Dino's independent-coupling field bends them."""
    s = {"straight_steps": 20, "n_straight": 200}
    point = straightness(GaussianDenoiser([0.5, -1.0], 1e-8), s)
    assert point["S"] < 1e-3 and len(point["per_t"]) == 20
    dino = straightness(get_dataset("dino").denoiser(), s)
    assert dino["S"] > 0.1


def test_target_variance_falls_with_the_references():
    s = {"variance_t": [0.5, 0.9], "variance_n": [8, 128], "variance_rows": 100}
    v = target_variance(get_dataset("dino").denoiser(), s)
    for i in range(2):
        assert v["stable"][128][i] < v["stable"][8][i] < v["fm"][i]


@pytest.mark.slow
def test_flow_study_writes_its_report(tmp_path):
    fm_only = {**TINY, "train_overrides": ["train.batch_size=64"]}
    report = run_study("flow", StudyOptions(out=tmp_path, objectives=["dsm", "fm", "fm-stf"], overrides=fm_only,
                                            progress=False))
    r = json.loads((tmp_path / "results.json").read_text())
    text = report.read_text()
    assert [row["objective"] for row in r["rows"]] == ["dsm", "fm", "fm", "fm-stf", "fm-stf"]
    assert set(r["few_steps"]["dsm"]) == {"ddim", "dpmpp-2m"} and set(r["few_steps"]["fm"]) == {"flow-euler",
                                                                                                 "flow-heun"}
    assert r["few_steps"]["fm"]["flow-heun"]["nfe"] == [1, 5]  # (Heun: 2N - 1 calls within the budget)
    for row in r["rows"]:
        assert f"{row['mmd']['mean']:.2e}" in text
    assert set(r["straightness"]) == {"exact", "fm", "fm-stf"}
    for name in r["figures"].values():
        assert (tmp_path / name).stat().st_size > 1000
    assert torch.isfinite(torch.tensor(r["variance"]["fm"])).all()


@pytest.mark.slow
def test_fm_rows_in_the_dino_and_digits_studies(tmp_path):
    """On request, the flow objectives are rows of the dino and digits studies: the standard samplers reach them
    through their denoiser, and their few-step tables add flow-Euler and flow-Heun."""
    train = ["model.width=16", "model.depth=1", "train.batch_size=32", "data.n_train=1000", "train.log_every=20"]
    dino = {"steps": 30, "snapshots": 2, "step_counts": [5], "n_samples": 60, "n_ref": 200, "n_nll": 20,
            "n_alpha": 4, "floor_draws": 2, "window": None, "train_overrides": train, "nfe_counts": [3],
            "chain": {"ddim": {"steps": 10}}}
    run_study("dino", StudyOptions(out=tmp_path / "dino", objectives=["fm", "fm-ot"], samplers=["ddim"],
                                   overrides=dino, progress=False))
    r = json.loads((tmp_path / "dino" / "results.json").read_text())
    assert [(x["objective"], x["sampler"]) for x in r["rows"]] == [("fm", "ddim"), ("fm-ot", "ddim")]
    assert set(r["few_steps"]["fm"]) == {"ddim", "heun", "dpmpp-2m", "flow-euler", "flow-heun"}
    assert r["few_steps"]["fm"]["flow-heun"]["nfe"] == [3]
    cfg = json.loads((tmp_path / "dino" / "runs" / "fm-ot-s0" / "config.json").read_text())
    assert cfg["objective"] == {"name": "fm", "options": {"ot": True, "ot_block": 256}}
    from difflab.studies import digits as digits_study  # (its run is the dino's machinery with a U-Net and the
    # classifier; a full digits run with fm rows: docs/results.md)
    assert set(FLOW) <= set(digits_study.OBJECTIVES) and all(o in digits_study.LABELS for o in FLOW)
    StudyOptions(out=tmp_path, objectives=list(FLOW)).validate(digits_study.OBJECTIVES)
