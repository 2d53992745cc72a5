"""The protocol every study shares: the study samplers (:data:`SAMPLERS`, a name -> a chain, its options and the
parallel sampler's), how a study objective is trained (:data:`OBJECTIVE_CONFIG`, :data:`FINE_TUNES`) and the
options of ``difflab study`` (:class:`StudyOptions`).

The rest of what studies share: :mod:`~difflab.studies.cache` (the output folder of cached units, results.json),
:mod:`~difflab.studies.measures` (samples with a per-sweep curve, likelihood, loss curves),
:mod:`~difflab.studies.labels` (names in reports) and :mod:`~difflab.studies.report` (number formats, tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from difflab.errors import require

# name -> (sequential chain, its options, Picard options or None); the studies' sampler protocol
SAMPLERS = {
    "ddpm": ("ddpm", {"steps": 1000, "variance": "beta"}, None),
    "ddim": ("ddim", {"steps": 50, "eta": 0.0}, None),
    "heun": ("heun", {"steps": 18}, None),
    "picard-ddpm": ("ddpm", {"steps": 1000, "variance": "beta_tilde"}, {"tol": 0.1}),
    # the same with x0_hat clipped to [-3, 3] (the standardised 2-D sets lie within |x| < 2.7): far-field control
    "picard-ddpm-clip": ("ddpm", {"steps": 1000, "variance": "beta_tilde", "clip": 3.0}, {"tol": 0.1}),
    # beyond ParaDiGMS: triangular Anderson acceleration, the extrapolated start
    "picard-ddpm-taa": ("ddpm", {"steps": 1000, "variance": "beta_tilde"},
                        {"tol": 0.1, "accel": "taa", "init": "prior"}),  # TAA alone
    "picard-ddpm-x0": ("ddpm", {"steps": 1000, "variance": "beta_tilde"}, {"tol": 0.1, "init": "extrapolate"}),
    "picard-ddpm-taa-x0": ("ddpm", {"steps": 1000, "variance": "beta_tilde"},
                           {"tol": 0.1, "accel": "taa", "init": "extrapolate"}),
}
STANDARD_SAMPLERS = ("ddpm", "ddim", "heun", "picard-ddpm")  # the studies' default set
FINE_TUNES = {"cdl-ft": ("cdl", "dsm")}  # study objective -> (objective, the run it fine-tunes)
# study objective -> its config overrides (default: objective.name = the study objective)
OBJECTIVE_CONFIG = {"stf": ['objective.name="stf"', 'objective.options.base="edm"',
                            "objective.options.reference_size=4096"],
                    # SA-K with the spec's recommended lambdas
                    "sa2": ['objective.name="sa"', "objective.options.K=2", "objective.options.lam=1.0"],
                    "sa3": ['objective.name="sa"', "objective.options.K=3", "objective.options.lam=0.3"],
                    "sa4": ['objective.name="sa"', "objective.options.K=4", "objective.options.lam=0.2"],
                    # flow matching and the papers' ideas on it
                    "fm": ['objective.name="fm"'],
                    "fm-ot": ['objective.name="fm"', "objective.options.ot=true", "objective.options.ot_block=256"],
                    "fm-stf": ['objective.name="stf"', 'objective.options.base="fm"',
                               "objective.options.reference_size=4096"],
                    "fm-sa2": ['objective.name="sa"', 'objective.options.grid="flow"', "objective.options.K=2",
                               "objective.options.lam=1.0"]}
FLOW_OBJECTIVES = ("fm", "fm-ot", "fm-stf", "fm-sa2")


@dataclass
class StudyOptions:
    """Options common to every study (the ``difflab study`` flags)."""

    out: Path
    quick: bool = False
    seeds: int = 1
    objectives: list[str] | None = None  # None: the study's default set
    samplers: list[str] | None = None  # None: the study's default set
    budget_steps: int | None = None  # training steps per run (equal for every objective)
    budget_seconds: float | None = None  # or an equal wall-clock budget, converted to steps by a timing run
    picard_window: int | None = None  # the parallel sampler's window (0: the whole chain); None: the study's
    progress: bool = True
    threads: int | None = None  # torch CPU threads of every run (None: by the network: 1 for the MLP, the usable
    # cores for a U-Net; difflab.threads); runtime, like device
    device: str | None = None  # where the networks train (None: auto)
    overrides: dict = field(default_factory=dict)  # study-specific settings (tests use tiny ones)

    def validate(self, known_objectives, default=None, default_samplers=None) -> None:
        """Check the options; an unset objective list becomes ``default`` (all known objectives if None), an unset
        sampler list ``default_samplers`` (the four standard samplers if None)."""
        if self.objectives is None:
            self.objectives = list(default or known_objectives)
        if self.samplers is None:
            self.samplers = list(default_samplers or STANDARD_SAMPLERS)
        require(self.seeds >= 1, f"--seeds must be >= 1, got {self.seeds}")
        for o in self.objectives:
            require(o in known_objectives, f"unknown objective {o!r} for this study: use {', '.join(known_objectives)}")
        for s in self.samplers:
            require(s in SAMPLERS, f"unknown study sampler {s!r}: use {', '.join(SAMPLERS)}")
        require(self.budget_steps is None or self.budget_steps >= 1, "--budget-steps must be >= 1")
        require(self.picard_window is None or self.picard_window >= 0, "--picard-window must be >= 0 (0: no window)")
        require(self.budget_seconds is None or self.budget_seconds > 0, "--budget-seconds must be > 0")
        require(self.threads is None or self.threads >= 0, f"--threads must be >= 0, got {self.threads}")
        require(self.budget_steps is None or self.budget_seconds is None,
                "give one of --budget-steps and --budget-seconds")
