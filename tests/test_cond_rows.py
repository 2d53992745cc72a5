"""A row-aligned condition rides with its rows through every sampler, with no sampler knowing its keys.

The toy condition ``shift_rows`` (B, 2) is added to a mixture's clean estimate. Bound by hand (a closure over the
whole batch's shifts), it is an unconditional denoiser, which the sequential samplers run as they always did; carried
as ``noise.cond`` it must give the same samples, and Picard (windows, max_batch chunks, warm and extrapolated starts,
TAA, torchrun's row split) must equal that sequential twin at tol 0, with each sample keeping its own shift whatever
batch it is drawn in.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROUND_OFF
from difflab.conditioning import cond_rows
from difflab.samplers import SEQUENTIAL, Noise, draw_noise, make_chain, picard, run_chain, sample_chain

F64 = torch.float64
M = 6
STEPS = {"ddpm": 8, "ddim": 8, "heun": 5, "euler": 6, "dpmpp-2m": 8, "dpmpp-2m-edm": 6, "flow-euler": 6,
         "flow-heun": 5}
OPTIONS = {"ddim": {"eta": 1.0}, "heun": {"S_churn": 5.0}}  # (a stochastic DDIM and Heun: noise rides too)
PICARD = [
    {"window": 3},
    {"window": 3, "max_batch": 5},
    {"window": 4, "init": "warm", "warm_steps": 2},
    {"window": 4, "accel": "taa"},  # (from the extrapolated start: P true steps, then the frozen estimate)
]


class Shifted:
    """A conditional toy denoiser: the base's clean estimate plus each row's ``shift_rows`` (B, 2)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x, sigma, shift_rows):
        return self.base(x, sigma) + shift_rows.to(x.dtype)

    def flow_x0(self, x_t, t, shift_rows):
        return self.base.flow_x0(x_t, t) + shift_rows.to(x_t.dtype)


class ByHand:
    """The same denoiser with the whole batch's shifts bound by hand: unconditional to the samplers."""

    def __init__(self, toy: Shifted, shift: torch.Tensor):
        self.toy, self.shift = toy, shift

    def __call__(self, x, sigma):
        return self.toy(x, sigma, shift_rows=self.shift)

    def flow_x0(self, x_t, t):
        return self.toy.flow_x0(x_t, t, shift_rows=self.shift)


def _shifts(n: int) -> torch.Tensor:
    return 0.5 * torch.randn(n, 2, generator=torch.Generator().manual_seed(3), dtype=F64)


def _setup(name, gmm2d):
    toy, shift = Shifted(gmm2d), _shifts(M)
    chain = make_chain(name, toy, steps=STEPS[name], **OPTIONS.get(name, {}))
    noise = draw_noise(0, range(M), (2,), chain.n_steps, chain.stochastic, cond={"shift_rows": shift})
    hand = make_chain(name, ByHand(toy, shift), steps=STEPS[name], **OPTIONS.get(name, {}))
    return chain, noise, run_chain(hand, Noise(noise.x_T, noise.z))


@pytest.mark.parametrize("name", list(SEQUENTIAL))
def test_every_sampler_passes_the_condition_with_its_rows(name, gmm2d):
    chain, noise, by_hand = _setup(name, gmm2d)
    assert torch.equal(run_chain(chain, noise), by_hand)
    plain = run_chain(make_chain(name, gmm2d, steps=STEPS[name], **OPTIONS.get(name, {})), Noise(noise.x_T, noise.z))
    assert float((plain - by_hand).abs().min()) > 1e-3  # (the condition does move every sample)
    for options in PICARD:
        res = picard(chain, noise, tol=0.0, **options)
        torch.testing.assert_close(res.x, by_hand, rtol=0, atol=ROUND_OFF, msg=f"{name} {options}")


@pytest.mark.parametrize("name", ["ddpm", "heun", "dpmpp-2m", "flow-heun"])
def test_each_sample_keeps_its_condition_whatever_the_batch(name, gmm2d):
    """Sample k with shift k, in one batch of 7, batches of 3, or from sample 4 on; sequential and parallel."""
    chain = make_chain(name, Shifted(gmm2d), steps=STEPS[name], **OPTIONS.get(name, {}))
    shift = _shifts(7)
    whole, _ = sample_chain(chain, 7, 5, (2,), batch_size=7, cond={"shift_rows": shift})
    parts, _ = sample_chain(chain, 7, 5, (2,), batch_size=3, cond={"shift_rows": shift})
    tail, _ = sample_chain(chain, 3, 5, (2,), batch_size=2, start=4, cond=cond_rows({"shift_rows": shift}, slice(4, 7)))
    assert torch.equal(whole, parts) and torch.equal(whole[4:], tail)
    for parallel in ({"tol": 0.0, "window": 3, "max_batch": 4}, {"tol": 0.05, "window": 3}):
        a, _ = sample_chain(chain, 7, 5, (2,), batch_size=7, cond={"shift_rows": shift}, parallel=parallel)
        b, _ = sample_chain(chain, 7, 5, (2,), batch_size=3, cond={"shift_rows": shift}, parallel=parallel)
        torch.testing.assert_close(a, b, rtol=0, atol=ROUND_OFF)
    torch.testing.assert_close(a, whole, rtol=0, atol=0.3)  # (tol 0.05: near the sequential samples)


def test_a_condition_with_the_wrong_rows_is_refused(gmm2d):
    chain = make_chain("ddim", Shifted(gmm2d), steps=3)
    with pytest.raises(Exception, match="one row per sample"):
        sample_chain(chain, 4, 0, (2,), cond={"shift_rows": _shifts(3)})


@pytest.mark.dist
@pytest.mark.slow
def test_two_processes_split_the_rows_with_their_condition(tmp_path, gmm2d):
    """torchrun, 2 gloo processes: each evaluates half of every sweep's rows, with those rows' shifts, and the
    gathered samples equal the hand-bound sequential chain (tests/dist_picard.py with its shifted model)."""
    script = Path(__file__).with_name("dist_picard.py")
    env = {k: v for k, v in os.environ.items() if k != "DIFFLAB_STATE_DTYPE"}  # (float64 state, the CPU's)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "two.pt"), '{"tol": 0, "window": 50, "max_batch": 300, "shift": true}', "heun"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    sys.path.insert(0, str(script.parent))
    from dist_picard import model, shifts

    chain = make_chain("heun", ByHand(Shifted(model()), shifts()), steps=200)
    seq = run_chain(chain, draw_noise(4, range(16), (2,), chain.n_steps, chain.stochastic, F64))
    assert two["world"] == 2 and float((two["x"] - seq).abs().max()) <= 1e-12


def test_a_run_samples_with_a_new_condition_that_rides_with_its_rows():
    """Run.sample(cond=...) hands a condition no part of difflab knows to the network: sample k keeps row k's
    whatever the batch, sequential or parallel, and the shift it asks for moves that sample alone."""
    from torch import nn

    from difflab.config import RunConfig
    from difflab.denoisers import EDMPrecond
    from difflab.runs import Run

    class ShiftNet(nn.Module):  # F(x, c_noise) = shift_rows: D = c_skip x + c_out shift_rows
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise, shift_rows):
            return shift_rows.to(x.dtype) + self.w

    run = Run.of(EDMPrecond(ShiftNet()).eval(), RunConfig(), (2,))
    shift = torch.linspace(-1, 1, 10, dtype=F64).repeat(2, 1).T.contiguous()  # (10, 2)
    x, _ = run.sample(10, seed=3, sampler="heun", steps=4, cond={"shift_rows": shift})
    x3, _ = run.sample(10, seed=3, sampler="heun", steps=4, cond={"shift_rows": shift}, batch_size=3)
    torch.testing.assert_close(x3, x, rtol=0, atol=ROUND_OFF)
    tail, _ = run.sample(4, seed=3, sampler="heun", steps=4, start=6, cond={"shift_rows": shift[6:]})
    torch.testing.assert_close(tail, x[6:], rtol=0, atol=ROUND_OFF)
    xp, _ = run.sample(10, seed=3, sampler="picard-heun", steps=4, parallel={"tol": 0.0, "window": 2},
                       cond={"shift_rows": shift})
    torch.testing.assert_close(xp, x, rtol=0, atol=ROUND_OFF)
    moved = shift.clone()
    moved[4] += 5.0
    y, _ = run.sample(10, seed=3, sampler="heun", steps=4, cond={"shift_rows": moved})
    assert (y[4] - x[4]).abs().min() > 1 and torch.equal(torch.cat([y[:4], y[5:]]), torch.cat([x[:4], x[5:]]))
    with pytest.raises(Exception, match="one row per sample"):
        run.sample(10, seed=3, sampler="heun", steps=4, cond={"shift_rows": shift[:9]})
