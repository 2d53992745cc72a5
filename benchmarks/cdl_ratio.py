"""Accuracy of CDL's density-ratio estimate (its logit) at equal nodes, old rule against new, on exact mixtures.

For each test bed the points are CDL's: held-out clean points (label +1) and the same points noised to a zeta drawn
from CDL's zeta distribution (label -1), 2 x ``--points`` in all. The exact denoiser of each bed gives the
closed-form log p(x) - log p_zeta(x). The estimator integrates over the ITD's log-SNR range [lo, hi] only, so its
expectation (the *estimand*, from ``--ref-nodes`` ratio nodes x 8 repeats) can differ from the closed form; both
are reported. Each rule x node count is repeated ``--repeats`` times with fresh draws:

  rmse      root-mean-square error against the estimand, over points and repeats (what the nodes change)
  sd        the median over points of the repeats' standard deviation
  bias/se   the largest |mean error| over the points, in the repeats' standard errors (both rules are unbiased
            by construction, tests/test_ratio_nodes.py; here the estimand's own error and heavy tails add to it)
  closed    rmse against the closed form (adds the range's truncation, the same for every rule)
  dBCE      the CDL loss's Monte-Carlo excess, mean softplus(-y logit_hat) - softplus(-y logit_estimand)

Beds: ``gmm1d`` (the CDL paper's two-mode mixture), ``dino`` (the Datasaurus mixture of 142 Gaussians), ``digits``
(a Gaussian with the 8x8 digits' mean and covariance + 1e-3 I: image dimension, image zeta range, closed form).

    python benchmarks/cdl_ratio.py [--beds gmm1d,dino,digits] [--nodes 4,16,32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from difflab.data import get_dataset
from difflab.data.toy import GMM1D, Dino
from difflab.denoisers import GaussianDenoiser
from difflab.objectives.cdl import CDLLoss
from difflab.objectives.density_ratio import draw_ratio_noise, noise_to, ratio_from_draws
from difflab.objectives.ratio_nodes import NODE_RULES

F64 = torch.float64


def bed(name: str):
    """(exact denoiser, 4,000 clean draws) of a test bed."""
    if name == "gmm1d":
        den = GMM1D().denoiser()
    elif name == "dino":
        den = Dino().denoiser()
    elif name == "digits":
        x = get_dataset("digits").train_data().to(F64).reshape(1797, -1)
        den = GaussianDenoiser(x.mean(0), torch.cov(x.T) + 1e-3 * torch.eye(x.shape[1], dtype=F64))
    else:
        raise SystemExit(f"unknown bed {name!r}: gmm1d, dino or digits")
    return den, den.sample(4000, torch.Generator().manual_seed(0))


def closed_form(den, x: torch.Tensor, zeta: torch.Tensor) -> torch.Tensor:
    """log p(x) - log p_zeta(x): p_zeta(x) = p_s(x / sqrt(a)) / a^(d/2), a = sigmoid(zeta), s^2 = (1 - a) / a."""
    a = torch.sigmoid(zeta)
    return den.log_prob(x, 0.0) - (den.log_prob(x / a.sqrt()[:, None], ((1 - a) / a).sqrt())
                                   - 0.5 * x.shape[1] * a.log())


def estimate(den, obj: CDLLoss, x, zeta, n: int, rule: str, g) -> torch.Tensor:
    draws = draw_ratio_noise(x, zeta, n, obj.itd.alpha_dist, g, True, rule)
    return ratio_from_draws(den, x, zeta, *draws)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--beds", default="gmm1d,dino,digits")
    p.add_argument("--nodes", default="4,16,32", help="node counts per estimate (n_alpha)")
    p.add_argument("--points", type=int, default=64, help="clean points per bed (as many noised)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--ref-nodes", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args()
    t0 = time.perf_counter()
    out = {"benchmark": "cdl_ratio", "command": "python benchmarks/cdl_ratio.py", "settings": vars(a), "beds": {}}
    for name in a.beds.split(","):
        den, data = bed(name)
        obj = CDLLoss().fit(data)
        g = torch.Generator().manual_seed(a.seed)
        x = data[: a.points]
        zeta = obj.sample_zeta(a.points, g)
        noisy = noise_to(x, zeta, torch.randn(x.shape, generator=g, dtype=F64))
        X, Z = torch.cat([x, noisy]), torch.cat([zeta, zeta])
        y = torch.cat([torch.ones(a.points), -torch.ones(a.points)]).to(F64)
        truth = closed_form(den, X, Z)
        ref = torch.stack([estimate(den, obj, X, Z, a.ref_nodes, "ratio", g) for _ in range(8)]).mean(0)
        dist = obj.itd.alpha_dist
        res = {"alpha_range": [dist.lo, dist.hi], "zeta_range": [obj.zeta_min, obj.zeta_max],
               "mean_abs_logit": float(truth.abs().mean()),
               "truncation": {"mean_abs": float((ref - truth).abs().mean()),
                              "max_abs": float((ref - truth).abs().max())},
               "bce_estimand": float(F.softplus(-y * ref).mean()), "bce_closed": float(F.softplus(-y * truth).mean()),
               "sign_agreement": float(((ref > 0) == (truth > 0)).double().mean()), "rules": {}}
        print(f"{name}: alpha range [{dist.lo:.2f}, {dist.hi:.2f}], zeta range [{obj.zeta_min:.2f}, "
              f"{obj.zeta_max:.2f}]; mean |logit| {res['mean_abs_logit']:.3g}; the range's truncation "
              f"{res['truncation']['mean_abs']:.3g} on the mean (max {res['truncation']['max_abs']:.3g}; CDL loss "
              f"{res['bce_estimand']:.3f} at the estimand, {res['bce_closed']:.3f} at the closed form, signs agree on "
              f"{res['sign_agreement']:.1%})", flush=True)
        for n in (int(v) for v in a.nodes.split(",")):
            for rule in NODE_RULES:
                reps = torch.stack([estimate(den, obj, X, Z, n, rule, g) for _ in range(a.repeats)])
                err = reps - ref
                sd = err.std(0)
                row = {"rmse": float(err.pow(2).mean().sqrt()), "sd_median": float(sd.median()),
                       "max_bias_in_se": float((err.mean(0).abs() / (sd / math.sqrt(a.repeats) + 1e-300)).max()),
                       "rmse_closed": float((reps - truth).pow(2).mean().sqrt()),
                       "dbce": float(F.softplus(-y * reps).mean() - F.softplus(-y * ref).mean())}
                res["rules"][f"{rule}-{n}"] = row
                print(f"  {rule:5s} x {n:3d}: rmse {row['rmse']:9.4g}  sd {row['sd_median']:8.3g}  bias/se "
                      f"{row['max_bias_in_se']:5.2f}  closed {row['rmse_closed']:9.4g}  dBCE {row['dbce']:+.4f}",
                      flush=True)
        out["beds"][name] = res
    out["wall_time_s"] = time.perf_counter() - t0
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
