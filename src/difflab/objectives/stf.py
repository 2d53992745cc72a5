"""STF: the stable target field (Xu, Tong and Jaakkola 2023).

Each step draws a reference batch R = {y_1..y_n} whose first B elements are the minibatch, so every perturbed
sample's own clean point is a reference. With one sigma per sample, x_i = y_i + sigma_i n_i, the regression target
of the base objective is replaced by the self-normalised importance-weighted average

    T_i = sum_j w_ij y_j,   w_ij = softmax_j( -|x_i - y_j|^2 / (2 sigma_i^2) )      (no gradient)

which is the exact posterior mean of the reference set: as n grows the target tends to E[x0 | x] (unbiased in the
limit) and its covariance shrinks by about 1 / (n - 1) where several data points share posterior mass.

Memory is O(B n), not O(B n d): the logits come from one matrix product of centred points (the |x|^2 term is
constant per row and dropped). Its rounding error is ~eps |x| |y| / sigma^2, harmless wherever several references
share the weight; at small sigma a row whose own point holds all the weight to machine precision takes T_i = y_i
exactly. ``precision="auto"`` uses float64 for low-dimensional data (d <= 256, cheap) and float32 above it.
"""

from __future__ import annotations

import torch

from difflab.conditioning import LABELS, NULL, bound_cond
from difflab.denoisers import per_sample
from difflab.errors import require
from difflab.objectives.base import Objective
from difflab.objectives.weighting import WEIGHTING_OPTIONS


@torch.no_grad()
def stf_target(x: torch.Tensor, sigma: torch.Tensor, reference: torch.Tensor, own: bool = True,
               chunk_elems: int = 1 << 24, precision: str = "auto", own_index: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None) -> torch.Tensor:
    """The stable target T (B, *shape) of noisy points x (B, *shape) at sigma (B,) given references (n, *shape).

    ``own``: row i's own clean point is reference ``own_index[i]`` (default i: the STF batch layout); rows whose
    own weight is 1 to machine precision then return it exactly. ``precision``: ``float64``, ``float32`` or
    ``auto`` (float64 up to d = 256). Rows go in chunks of at most ``chunk_elems`` logits.
    ``labels`` (B,) and ``reference_labels`` (n,): class-conditional targets, each row weighing only the references
    of its class (a row labelled -1, unconditional, weighs all of them).
    """
    B, n = x.shape[0], reference.shape[0]
    own_index = torch.arange(B, device=x.device) if own_index is None else own_index
    # (the indices' values are checked on the CPU only: reading them from a device would wait for it)
    require(not own or (len(own_index) == B and n >= B and (B == 0 or own_index.device.type != "cpu"
                                                            or n > int(own_index.max()))),
            f"the reference batch ({n}) must contain the minibatch ({B})")
    require(precision in ("auto", "float32", "float64"),
            f"precision must be auto, float32 or float64, got {precision!r}")
    d = x[0].numel()
    dtype = torch.float64 if precision == "float64" or (precision == "auto" and d <= 256) else torch.float32
    Y = reference.reshape(n, -1).to(dtype)
    centre = Y.mean(0)
    Y = Y - centre  # smaller magnitudes, smaller rounding in the expansion
    xf = x.reshape(B, -1).to(dtype) - centre
    half_y2 = 0.5 * (Y**2).sum(1)
    s2 = per_sample(sigma, x).reshape(-1).to(dtype) ** 2
    rows = max(1, chunk_elems // max(1, n))
    out, exact = [], []
    for i in range(0, B, rows):
        logits = (xf[i:i + rows] @ Y.T - half_y2[None]) / s2[i:i + rows, None]  # -|x - y|^2 / 2s^2 + const(row)
        if labels is not None:  # another class's references weigh nothing
            y = labels[i:i + rows, None]
            logits = logits.masked_fill((y != NULL) & (reference_labels[None] != y), float("-inf"))
        w = torch.softmax(logits, dim=1)
        out.append(w @ Y)
        if own:  # rows whose own point holds all the weight
            idx = own_index[i:i + rows]
            exact.append(w[torch.arange(len(idx), device=w.device), idx] >= 1.0)
    T = (torch.cat(out) + centre).to(x.dtype)
    if own:  # exactly the own point, free of rounding (a select, not a masked copy: no wait for the device)
        mine = reference.reshape(n, -1)[own_index].to(x.dtype)
        T = torch.where(torch.cat(exact)[:, None], mine, T)
    return T.reshape(x.shape)


STF_BASES = ("dsm", "edm", "vp", "ve", "fm")


class STFLoss(Objective):
    """The base objective (dsm, edm, vp, ve or fm) with stable targets from a reference batch of ``reference_size``.

    With ``base = "fm"`` it is the stable velocity target (StableVM, Yang et al. 2026): the velocity regresses on
    u_stable = (x_t - T) / t, T the self-normalised posterior mean over the references, w_j proportional to
    N(x_t; (1 - t) y_j, t^2 I) = N(x_t / (1 - t); y_j, sigma^2 I): the same weights in sigma-space. StableVM's own
    code keeps per-class memory banks of past batches as references; here they are the current reference batch
    (the minibatch and fresh draws, per class for a conditional model).

    Called as ``objective(D, x0, generator, reference=R)`` with R (n, *shape) whose first B rows are x0 (the
    trainer draws it); without ``reference`` the minibatch itself is the reference set.

    Args:
        base: the base objective's name (its noise levels and weighting are kept).
        reference_size: n, the references per step (the reference code: 4096; its CIFAR-10 models: 1024).
        **options: the base objective's options, the loss weighting's (weighting, snr_gamma, learned_weighting:
            :mod:`difflab.objectives.weighting`) included; the base owns a learned weighting's head.
    """

    precond = "edm"  # that of the default base; see precond_for
    uses_schedule = True
    uses_sigma_data = True
    reference_size = 1024  # the default; each instance has its own
    help = ("stable targets from a reference batch: base (edm | vp | ve | dsm | fm: stable velocity), reference_size "
            "(1024 per process), and the base objective's options (its loss weighting included)")
    weighting_options = WEIGHTING_OPTIONS  # (passed to the base, which takes them)

    def __init__(self, base: str = "edm", reference_size: int = 1024, schedule=None, sigma_data=None, **options):
        from difflab.objectives import build_objective

        require(base in STF_BASES, f"STF base must be one of {', '.join(STF_BASES)}, got {base!r}")
        require(isinstance(reference_size, int) and reference_size >= 1,
                f"reference_size must be a positive integer, got {reference_size!r}")
        self.base_name = base
        self.base = build_objective(base, options, schedule=schedule, sigma_data=sigma_data)
        self.reference_size = reference_size

    def trainable(self):
        """The base's trainable module (a learned weighting's head), or None."""
        return self.base.trainable()

    @property
    def weighting(self) -> str:
        """The base's loss weighting (its ``weighting`` option)."""
        return self.base.weighting

    @property
    def learned_weighting(self) -> bool:
        return self.base.learned_weighting

    @classmethod
    def option_names(cls, options: dict | None = None) -> list[str]:
        """base, reference_size and the base objective's options."""
        from difflab.objectives import OBJECTIVES

        base = (options or {}).get("base", "edm")
        return ["base", "reference_size", *(OBJECTIVES[base].option_names() if base in STF_BASES else [])]

    @classmethod
    def precond_for(cls, options: dict | None = None) -> str:
        """The base objective's: STF keeps its network form."""
        from difflab.objectives import OBJECTIVES

        base = (options or {}).get("base", "edm")
        return OBJECTIVES[base].precond_for(options) if base in STF_BASES else cls.precond

    def draw(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """The base's draws, and each row's index in the batch (= its own point's index in the references)."""
        return {**self.base.draw(x0, generator), "row": torch.arange(x0.shape[0])}

    def loss(self, D, x0: torch.Tensor, draws: dict, reference: torch.Tensor | None = None,
             reference_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The base's regression towards the stable targets; for a D bound to class labels
        (:class:`~difflab.conditioning.Bound`, ``class_labels`` (B,)) the targets weigh the references of each row's
        class (``reference_labels`` (n,): theirs; default the rows'). Other bound conditions go to D only."""
        ref = x0 if reference is None else reference
        x = self.base.noised(x0, draws)
        labels = bound_cond(D).get(LABELS)
        if labels is not None:
            reference_labels = labels if reference_labels is None else reference_labels
            require(len(reference_labels) == len(ref), f"{len(reference_labels)} reference labels for {len(ref)} "
                                                       "references")
        target = stf_target(x, draws["sigma"], ref, own_index=draws["row"], labels=labels,
                            reference_labels=reference_labels)
        if self.base_name == "fm":  # the velocity target formed from the row's own noise: exact where T = x0
            return self.base.regress(D, x, draws["sigma"], target, x0, draws["noise"])
        return self.base.regress(D, x, draws["sigma"], target)
