"""How reports print numbers: a mean +- std record over seeds, scientific and general number formats, markdown
tables."""

from __future__ import annotations

import numpy as np


def mean_std(values) -> dict:
    """{"mean", "std" (ddof 1; 0.0 for one value), "n", "values"} of numbers, as floats."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "values": v}


def sci(x, digits: int = 2) -> str:
    """Scientific notation, as the report prints MMD values."""
    return "-" if x is None else f"{x:.{digits}e}"


def pm(stat: dict, f=None) -> str:
    """'mean +- std' of a :func:`mean_std` record (just the mean for a single value)."""
    f = f or sci
    return f"{f(stat['mean'])} +- {f(stat['std'])}" if stat["n"] > 1 else f(stat["mean"])


def fmt(x, digits: int = 3) -> str:
    """Numbers as the report prints them (scientific for small magnitudes)."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if x == 0 or 1e-2 <= abs(x) < 1e5:
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.{digits - 1}e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table: a header row, then one row per list of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
