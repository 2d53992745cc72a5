"""difflab's overhead against a minimal plain-PyTorch loop of the same model, measured side by side.

Times (1) a DSM training step (difflab's Trainer.train_step vs a hand-written step: same MLP, batch, Adam,
clipping and EMA) and (2) a 1000-step DDPM sampling run (difflab's chain vs a hand-written loop), alternating
the two in each repeat and reporting the median ratio, so machine noise hits both sides alike.

    python benchmarks/overhead.py [--repeats 5] [--train-steps 200] [--samples 2000] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from difflab.config import load_config
from difflab.samplers import make_chain, sample_chain
from difflab.schedules import DDPMSchedule
from difflab.training import Trainer


def plain_train_step_fn(net, x_train, batch, ema_net, sched, gen):
    """A minimal DSM-eps step written directly in PyTorch."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    abar = sched.abar.float()

    def step():
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        x0 = x_train[idx]
        t = torch.randint(1, sched.T + 1, (batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t][:, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = ((net(x_t, t.float()) - eps) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema_net.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 0.001)

    return step


@torch.inference_mode()
def plain_ddpm(net, sched, n, gen):
    """A minimal 1000-step DDPM ancestral loop (beta variance), float32."""
    x = torch.randn(n, 2, generator=gen)
    for t in range(sched.T, 0, -1):
        ab, a, b = sched.abar[t].item(), sched.alpha[t].item(), sched.beta[t].item()
        ab_prev = sched.abar[t - 1].item()
        eps = net(x, torch.full((n,), float(t)))
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        mean = (ab_prev**0.5 * b / (1 - ab)) * x0 + (a**0.5 * (1 - ab_prev) / (1 - ab)) * x
        x = mean + (b**0.5 * torch.randn(x.shape, generator=gen) if t > 1 else 0)
    return x


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    cfg = load_config(overrides=["train.steps=1000000", "train.log_every=1000000"])
    trainer = Trainer(cfg, "/tmp/difflab-bench-unused")
    net = trainer.model.net
    plain_net, plain_ema = copy.deepcopy(net), copy.deepcopy(net)  # the same network (and input features)
    sched = DDPMSchedule()
    gen = torch.Generator().manual_seed(0)
    plain_step = plain_train_step_fn(plain_net, trainer.x_train, cfg.train.batch_size, plain_ema, sched, gen)

    def ours_train():
        for _ in range(a.train_steps):
            trainer.train_step()

    def plain_train():
        for _ in range(a.train_steps):
            plain_step()

    model = trainer.ema.eval()
    chain = make_chain("ddpm", model, steps=1000)
    rows = {"train_step": [], "sample_ddpm1000_f64": [], "sample_ddpm1000_f32": []}
    times = {k: [] for k in rows}
    for _ in range(a.repeats):
        o, q = timed(ours_train), timed(plain_train)
        rows["train_step"].append(o / q)
        times["train_step"].append((o / a.train_steps, q / a.train_steps))
        q = timed(plain_ddpm, plain_net, sched, a.samples, gen)
        for key, dtype in (("sample_ddpm1000_f64", torch.float64), ("sample_ddpm1000_f32", torch.float32)):
            o = timed(sample_chain, chain, a.samples, 0, (2,), 4096, 0, dtype)
            rows[key].append(o / q)
            times[key].append((o, q))
    result = {k: {"ratio_median": statistics.median(v), "ratios": v,
                  "ours_s_median": statistics.median(t[0] for t in times[k]),
                  "plain_s_median": statistics.median(t[1] for t in times[k])} for k, v in rows.items()}
    result["threads"] = torch.get_num_threads()
    if a.json:
        print(json.dumps(result))
        return
    print(f"torch threads: {result['threads']}   (ratio = difflab time / plain PyTorch time; 1.10 = 10% overhead)")
    for k in rows:
        r = result[k]
        print(f"{k:24s} ratio {r['ratio_median']:.3f}   ours {r['ours_s_median'] * 1e3:9.2f} ms   "
              f"plain {r['plain_s_median'] * 1e3:9.2f} ms")


if __name__ == "__main__":
    main()
