"""Seed derivation: derive_seed against numpy's SeedSequence computed another way, the torch generator built on it,
and the two users (the trainer's data / objective streams, the samplers' per-sample noise)."""

import numpy as np
import pytest
import torch

from difflab.seeds import derive_seed, generator

PAIRS = [(0, 0), (0, 1), (1, 0), (7, 3), (12345, 999), ((1 << 63) - 1, 2**31), (2**40 + 17, 0)]


def _reference(seed: int, key: int) -> int:
    """The same 63 bits read as one little-endian uint64 word of the SeedSequence state."""
    word = np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1, np.uint64)[0]
    return int(word) % (1 << 63)


@pytest.mark.parametrize(("seed", "key"), PAIRS)
def test_derive_seed_is_the_seed_sequence_state(seed, key):
    s = derive_seed(seed, key)
    assert s == _reference(seed, key) and isinstance(s, int) and 0 <= s < 1 << 63
    assert derive_seed(np.int64(seed), np.uint32(key)) == s  # numpy ints alike


def test_keys_give_different_streams():
    seeds = {derive_seed(s, k) for s in range(4) for k in range(50)}
    assert len(seeds) == 200


@pytest.mark.parametrize(("seed", "key"), PAIRS)
def test_generator_draws_as_manual_seed(seed, key):
    g = generator(seed, key)
    assert isinstance(g, torch.Generator) and g.device.type == "cpu"
    ref = torch.Generator().manual_seed(derive_seed(seed, key))
    assert torch.equal(g.get_state(), ref.get_state())
    assert torch.equal(torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=ref,
                                                                                      dtype=torch.float64))


def test_trainer_streams_are_generators_of_keys_0_and_1(tmp_path):
    from difflab.config import load_config
    from difflab.training import Trainer

    cfg = load_config(overrides=["train.steps=1", "train.batch_size=8", "model.width=8", "model.depth=1",
                                 "data.n_train=50", "train.seed=123"])
    trainer = Trainer(cfg, tmp_path / "r")
    assert torch.equal(trainer.data_gen.get_state(), generator(123, 0).get_state())
    assert torch.equal(trainer.obj_gen.get_state(), generator(123, 1).get_state())


def test_sample_noise_is_drawn_from_derive_seed():
    from difflab.samplers import draw_noise

    noise = draw_noise(5, [0, 3, 17], (2,), n_steps=4, stochastic=True)
    for row, k in enumerate([0, 3, 17]):
        g = torch.Generator().manual_seed(derive_seed(5, k))
        assert torch.equal(noise.x_T[row], torch.randn((2,), generator=g, dtype=torch.float64))
        assert torch.equal(noise.z[row], torch.randn((4, 2), generator=g, dtype=torch.float64))
