"""The objective registry: one class subclassing Objective and one registry line make a trainable, documented
objective; the class attributes, not class identity, tell the rest of difflab what it needs."""

import pytest
import torch

from difflab.cli import main
from difflab.config import load_config
from difflab.errors import DifflabError
from difflab.models import precond_name
from difflab.objectives import OBJECTIVES, CDLLoss, Objective, build_objective
from difflab.training.checkpoint import list_checkpoints


class Toy(Objective):
    """|| D(x0 + sigma n, sigma) - x0 ||^2 with log sigma ~ U(log lo, log hi)."""

    help = "a toy regression: lo (0.1), hi (10.0)"

    def __init__(self, lo: float = 0.1, hi: float = 10.0):
        self.lo, self.hi = lo, hi

    def draw(self, x0, generator=None):
        u = torch.rand(x0.shape[0], generator=generator, dtype=x0.dtype)
        sigma = self.lo * (self.hi / self.lo) ** u
        return {"sigma": sigma, "noise": torch.randn(x0.shape, generator=generator, dtype=x0.dtype)}

    def loss(self, D, x0, draws):
        sigma = draws["sigma"].reshape(-1, *[1] * (x0.ndim - 1))
        return ((D(x0 + sigma * draws["noise"], draws["sigma"]) - x0) ** 2).reshape(len(x0), -1).sum(1)


def test_a_registered_toy_objective_trains_from_the_cli_and_shows_in_the_help(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(OBJECTIVES, "toy", Toy)
    out = tmp_path / "r"
    assert main(["train", "--objective", "toy", "--steps", "5", "--batch-size", "64", "--width", "16", "--depth", "1",
                 "--set", "objective.options.hi=5.0", "--quiet", "--out", str(out)]) == 0
    assert list_checkpoints(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "  toy   a toy regression: lo (0.1), hi (10.0)" in text
    assert " | toy" in text.replace("\n", " ")  # the --objective choices
    with pytest.raises(DifflabError, match="did you mean 'lo'"):
        build_objective("toy", {"low": 1.0})


def test_objectives_that_take_no_reference_refuse_one(gauss2d):
    x0 = gauss2d.sample(16, torch.Generator().manual_seed(0))
    obj = build_objective("cdl", {"n_cdl": 2, "n_alpha": 2}, data=x0)
    assert obj.fitted
    with pytest.raises(DifflabError, match="objective CDLLoss takes no reference batch"):
        obj(gauss2d, x0, torch.Generator().manual_seed(1), reference=x0)
    for name in OBJECTIVES:
        obj = build_objective(name, data=x0)
        assert obj.uses_reference == (name == "stf") == (obj.reference_size > 0), name
        if not obj.uses_reference:
            with pytest.raises(DifflabError, match="takes no reference batch"):
                obj(gauss2d, x0, reference=x0)
    stf = build_objective("stf", {"reference_size": 32})
    assert stf.reference_size == 32 and stf(gauss2d, x0, reference=x0).shape == (16,)


def test_class_attributes_replace_the_special_cases():
    assert [n for n, c in OBJECTIVES.items() if c.uses_schedule] == ["dsm", "stf", "sa"]
    assert [n for n, c in OBJECTIVES.items() if c.uses_sigma_data] == ["edm", "stf"]
    assert [n for n, c in OBJECTIVES.items() if c.needs_data] == ["itd", "cdl"]
    assert all(c.help for c in OBJECTIVES.values())
    assert not CDLLoss().fitted and build_objective("dsm").fitted
    assert OBJECTIVES["stf"].option_names({"base": "ve"}) == ["base", "reference_size", "sigma_min", "sigma_max"]
    assert OBJECTIVES["dsm"].option_names() == ["antithetic"] and OBJECTIVES["vp"].option_names() == []
    expected = {("dsm", None): "eps", ("edm", None): "edm", ("vp", None): "vp", ("ve", None): "ve",
                ("itd", None): "eps-continuous", ("cdl", None): "eps-continuous", ("sa", None): "eps",
                ("sa", '"edm"'): "edm", ("stf", None): "edm"}
    for (name, grid), precond in expected.items():
        cfg = load_config(overrides=[f'objective.name="{name}"', *([f"objective.options.grid={grid}"] if grid else [])])
        assert precond_name(cfg) == precond, name
    cfg = load_config(overrides=['objective.name="stf"', 'objective.options.base="dsm"'])
    assert precond_name(cfg) == "eps"
    cfg.model.precond = "ve"
    assert precond_name(cfg) == "ve"
