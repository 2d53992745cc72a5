"""The randomness of a batch is drawn once, so any split of the batch (across processes, in chunks) computes the
same per-example losses as the whole batch: the property distributed training relies on."""

import pytest
import torch

from difflab.denoisers import GMMDenoiser
from difflab.objectives import build_objective
from difflab.objectives.draws import slice_draws

F64 = torch.float64


@pytest.mark.parametrize(("name", "options"), [
    ("dsm", {}), ("dsm", {"antithetic": True}), ("edm", {}), ("vp", {}), ("ve", {}), ("itd", {}),
    ("cdl", {"n_cdl": 9, "n_alpha": 4}), ("cdl", {"n_cdl": 5, "n_alpha": 3, "common_noise": False}),
    ("stf", {"base": "edm", "reference_size": 48}), ("stf", {"base": "dsm", "reference_size": 48}),
])
def test_split_batches_see_the_same_randomness(name, options):
    g = torch.Generator().manual_seed(0)
    den = GMMDenoiser(torch.tensor([0.4, 0.6], dtype=F64), torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=F64),
                      torch.tensor([0.2, 0.3], dtype=F64))
    x0 = den.sample(32, g)
    reference = torch.cat([x0, den.sample(16, g)])
    obj = build_objective(name, options, data=x0)
    draws = obj.draw(x0, torch.Generator().manual_seed(1))
    refs = {"reference": reference} if obj.uses_reference else {}  # (STF's) reference batch
    full = obj.loss(den, x0, draws, **refs)
    parts = torch.cat([obj.loss(den, x0[lo:hi], slice_draws(draws, lo, hi), **refs)
                       for lo, hi in ((0, 13), (13, 16), (16, 32))])
    torch.testing.assert_close(parts, full, rtol=1e-12, atol=1e-12)
    again = obj(den, x0, torch.Generator().manual_seed(1), **refs)
    torch.testing.assert_close(again, full, rtol=0, atol=0)  # __call__ is loss(draw(...))


def test_slice_draws_reindexes_sub_batches():
    d = {"a": torch.arange(6), "cdl_rows": torch.tensor([5, 1, 3]), "cdl_z": torch.tensor([50, 10, 30])}
    s = slice_draws(d, 2, 6)
    assert s["a"].tolist() == [2, 3, 4, 5]
    assert s["cdl_rows"].tolist() == [3, 1] and s["cdl_z"].tolist() == [50, 30]
