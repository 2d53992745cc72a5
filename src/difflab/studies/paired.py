"""Is a difference between two objectives more than seed noise? A paired t-test over seeds.

Seed k of every objective shares the initial weights' seed, the data order and the sampling noise, so the per-seed
differences d_k = b_k - a_k are what varies; the test asks whether their mean is zero (t = mean(d) / (std(d) / sqrt
n), n - 1 degrees of freedom, two-sided). With 2 seeds it has one degree of freedom: only a difference of a
consistent size across seeds reaches p < 0.05. No correction for the several comparisons of a ranking is applied.
"""

from __future__ import annotations

import math

ALPHA = 0.05  # below this p-value a difference is called real


def paired_test(a: list[float], b: list[float]) -> dict:
    """{"diff": mean(b - a), "p": two-sided p-value or None (one seed), "n"} of per-seed values a, b (same seeds,
    same order). Identical differences on every seed give p = 0 (p = 1 when they are all zero)."""
    from scipy import stats

    assert len(a) == len(b), (len(a), len(b))
    d = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return {"diff": mean, "p": None, "n": n}
    if all(x == d[0] for x in d):  # no spread: the t statistic is infinite (or 0 / 0 when there is no difference)
        return {"diff": mean, "p": 1.0 if mean == 0 else 0.0, "n": n}
    p = float(stats.ttest_rel(b, a).pvalue)
    return {"diff": mean, "p": p if math.isfinite(p) else 1.0, "n": n}


def verdict(test: dict) -> str:
    """'worse (p 0.012)', 'better (p 0.03)', 'within noise (p 0.43)' or 'one seed: no test' for b against a."""
    if test["p"] is None:
        return "one seed: no test"
    if test["p"] >= ALPHA:
        return f"within noise (p {test['p']:.2g})"
    return f"{'worse' if test['diff'] > 0 else 'better'} (p {test['p']:.2g})"
