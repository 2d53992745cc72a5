import math

import pytest
import torch

from difflab.data import Dino
from difflab.denoisers import GaussianDenoiser
from difflab.diagnostics import far_field_gain
from difflab.errors import DifflabError


def test_exact_dino_denoiser_shrinks_far_states_towards_the_data():
    """The exact Dino denoiser pulls a far state back to the data: its gain falls with R towards the components'
    own shrinkage c^2 / (c^2 + sigma^2) (jitter std c < 0.01), far below 1."""
    den = Dino().denoiser()
    ff = far_field_gain(den, (2,), sigmas=[0.1, 1.0], radii=[10.0, 100.0, 1000.0], n_dirs=16)
    assert ff.gain.shape == (3, 2)
    assert bool((ff.gain[1:] < ff.gain[:-1]).all())
    c2 = den.covs[0].diagonal().max().item()
    assert float(ff.gain[-1, 0]) < 1.2 * c2 / (c2 + 0.01) and float(ff.gain[-1].max()) < 0.01


def test_gain_of_a_gaussian_denoiser_is_its_shrinkage_factor():
    """D(x) = c^2 / (c^2 + sigma^2) x for N(0, c^2 I): the gain is that factor at every radius."""
    c2 = 4.0
    den = GaussianDenoiser(torch.zeros(3), c2)
    ff = far_field_gain(den, (3,), sigmas=[0.5, 2.0], radii=[1.0, 1e4], n_dirs=8)
    want = [c2 / (c2 + 0.25), c2 / (c2 + 4.0)]
    for row in ff.gain:
        assert row == pytest.approx(want, rel=1e-9)


def test_linear_extrapolation_keeps_its_slope_and_images_work():
    def den(x, sigma):
        return 2.5 * x

    ff = far_field_gain(den, (1, 4, 4), sigmas=[1.0], radii=[3.0, 3e3], n_dirs=4)
    assert ff.gain[:, 0] == pytest.approx([2.5, 2.5], rel=1e-12)
    assert ff.to_dict()["radii"] == [3.0, 3e3] and math.isfinite(ff.gain.sum())


@pytest.mark.parametrize("kw", [{"sigmas": [0.0]}, {"sigmas": [1.0], "radii": [-1.0]},
                                {"sigmas": [1.0], "n_dirs": 0}])
def test_bad_options_are_refused(kw):
    with pytest.raises(DifflabError):
        far_field_gain(lambda x, s: x, (2,), **kw)
