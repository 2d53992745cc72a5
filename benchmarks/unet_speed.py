"""U-Net training speed: steps/s of forward + backward + Adam step on synthetic images.

Each step draws EDM's log-normal sigma (ln sigma ~ N(-1.2, 1.2^2)), feeds c_in (x + sigma n) with
c_in = 1 / sqrt(sigma^2 + 0.5^2) and c_noise = ln(sigma) / 4, and regresses the noise n with an MSE. Cases: 8x8
digits-like images (1 channel, batch 64) with the tiny and small presets, and 32x32 (3 channels) with a reduced-width
DDPM++ model; ``--full`` adds the cifar10 preset (55.7M parameters) at batch 8, slow on a CPU.

    python benchmarks/unet_speed.py [--steps 20] [--repeats 3] [--threads N] [--full] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from difflab.nets.unet import count_parameters, unet_from_preset

# name -> (preset, channels, resolution, batch, overrides)
CASES = {
    "8x8 tiny": ("tiny", 1, 8, 64, {}),
    "8x8 small": ("small", 1, 8, 64, {}),
    "32x32 reduced": ("cifar10", 3, 32, 16, {"model_channels": 32, "num_blocks": 1}),
}
FULL_CASES = {"32x32 cifar10": ("cifar10", 3, 32, 8, {})}


def make_step(net: torch.nn.Module, channels: int, resolution: int, batch: int, gen: torch.Generator):
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.rand(batch, channels, resolution, resolution, generator=gen) * 2 - 1  # fixed images in [-1, 1]

    def step() -> None:
        sigma = (torch.randn(batch, generator=gen) * 1.2 - 1.2).exp()
        n = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None, None]
        x_in = (x0 + s * n) / (s**2 + 0.25).sqrt()
        loss = (net(x_in, sigma.log() / 4) - n).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(case: tuple, steps: int, repeats: int) -> dict:
    preset, channels, resolution, batch, overrides = case
    torch.manual_seed(0)
    net = unet_from_preset(preset, channels, resolution, **overrides).train()
    step = make_step(net, channels, resolution, batch, torch.Generator().manual_seed(0))
    for _ in range(2):  # warm-up: allocator, Adam state
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps / (time.perf_counter() - t0))
    rate = statistics.median(rates)
    return {"preset": preset, "overrides": overrides, "shape": [batch, channels, resolution, resolution],
            "params": count_parameters(net), "steps_per_s": rate, "ms_per_step": 1e3 / rate,
            "images_per_s": rate * batch, "steps_per_s_all": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median rate is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--full", action="store_true", help="also the cifar10 preset at 32x32, batch 8 (slow on CPU)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cases = {**CASES, **(FULL_CASES if a.full else {})}
    results = {name: bench(case, a.steps, a.repeats) for name, case in cases.items()}
    if a.json:
        print(json.dumps({"threads": torch.get_num_threads(), "steps": a.steps, "repeats": a.repeats,
                          "results": results}))
        return
    print(f"torch threads: {torch.get_num_threads()}   steps x repeats: {a.steps} x {a.repeats}   (median)")
    print(f"{'case':16s} {'batch shape':>16s} {'params':>11s} {'steps/s':>9s} {'ms/step':>9s} {'images/s':>9s}")
    for name, r in results.items():
        shape = "x".join(map(str, r["shape"]))
        print(f"{name:16s} {shape:>16s} {r['params']:>11,d} {r['steps_per_s']:9.2f} {r['ms_per_step']:9.1f} "
              f"{r['images_per_s']:9.1f}")


if __name__ == "__main__":
    main()
