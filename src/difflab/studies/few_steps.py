"""The few-step table the studies share: a metric of samples from DDIM, EDM Heun and DPM-Solver++ 2M (and
flow-Euler and flow-Heun for a flow-matching model) at small budgets of network calls per sample
(``settings["nfe_counts"]``, e.g. 5, 10, 20).

DDIM and DPM-Solver++ 2M take one call a step, so a budget of n calls is n steps; Heun takes 2N - 1 for N noise
levels, so it gets the largest N within the budget (5 -> 3 levels, 10 -> 5 = 9 calls, 20 -> 10 = 19 calls), and
flow-Heun likewise (2N - 1 calls for N times).
"""

from __future__ import annotations

from collections.abc import Callable

FEW_STEP_SAMPLERS = ("ddim", "heun", "dpmpp-2m")
FLOW_SAMPLERS = ("flow-euler", "flow-heun")  # added for a flow-matching model
LABELS = {"ddim": "DDIM", "heun": "Heun", "dpmpp-2m": "DPM-Solver++ 2M", "flow-euler": "flow-Euler",
          "flow-heun": "flow-Heun"}


def steps_for(sampler: str, nfe: int) -> int:
    """The steps (noise levels for Heun) that spend at most ``nfe`` network calls a sample."""
    if sampler == "flow-heun":
        return max(1, (nfe + 1) // 2)
    return max(2, (nfe + 1) // 2) if sampler == "heun" else nfe


def few_steps(run, metric: Callable, s: dict, study=None) -> dict:
    """{sampler: {"nfe": [...], "value": [...]}}: ``metric(samples)`` of ``s["n_samples"]`` samples (seed 0) of a
    :class:`~difflab.runs.Run` per budget of ``s["nfe_counts"]`` (a conditional run samples every class)."""
    labels = "all" if run.num_classes else None
    out = {}
    for sampler in (*FEW_STEP_SAMPLERS, *(FLOW_SAMPLERS if run.precond == "flow" else ())):
        nfe, values = [], []
        for n in s["nfe_counts"]:
            x, stats = run.sample(s["n_samples"], 0, sampler, steps=steps_for(sampler, n), local=True,
                                  class_labels=labels)
            nfe.append(stats.nfe_per_sample)
            values.append(float(metric(x)))
        out[sampler] = {"nfe": nfe, "value": values}
        if study is not None:
            study.log(f"  {LABELS[sampler]}: " + ", ".join(f"{v:.4g} at {k:g} calls" for k, v in zip(nfe, values,
                                                                                                    strict=True)))
    return out


def mean_few(units: list[dict]) -> dict:
    """The per-seed units of :func:`few_steps` averaged over seeds."""
    return {sm: {"nfe": units[0][sm]["nfe"],
                 "value": [sum(u[sm]["value"][i] for u in units) / len(units) for i in range(len(units[0][sm]["nfe"]))]}
            for sm in units[0]}


def few_steps_table(few: dict, fmt: Callable, labels: dict) -> str:
    """A markdown table: one row per (objective, sampler), one column per budget, each cell "value (NFE)"."""
    from difflab.studies.report import table

    first = next(iter(few.values()))
    budgets = [int(n) for n in first["ddim"]["nfe"]]
    rows = [[labels.get(obj, obj), LABELS[sm], *(f"{fmt(v)} ({n:g})" for v, n in zip(u["value"], u["nfe"],
                                                                                     strict=True))]
            for obj, per in few.items() for sm, u in per.items()]
    return table(["objective", "sampler", *(f"{n} calls" for n in budgets)], rows)


def budgets(r: dict) -> str:
    """The budgets of a study's results in words: '5, 10 and 20'."""
    n = [str(k) for k in r["settings"]["nfe_counts"]]
    return n[0] if len(n) == 1 else f"{', '.join(n[:-1])} and {n[-1]}"
