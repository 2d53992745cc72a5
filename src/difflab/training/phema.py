"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training Dynamics of Diffusion Models", CVPR
2024): track a few power-function EMA profiles while training, snapshot them now and then, and after training
rebuild the EMA of *any* length as a linear combination of the snapshots.

**Power-function EMA.** With exponent gamma > 0 the tracked copy is updated after step t (t = 1, 2, ...) as
``ema <- beta_t * ema + (1 - beta_t) * theta_t`` with ``beta_t = (1 - 1/t) ** (gamma + 1)``. The weight this
gives the network after step k (theta_k) at step T is the product of the later betas times (1 - beta_k):
``(k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / T ** (gamma + 1)``, which is exactly the integral over (k - 1, k]
of the density ``p_T(s) = (gamma + 1) s ** gamma / T ** (gamma + 1)`` on [0, T]. So with the training trajectory
read as piecewise constant (theta(s) = theta_k on (k - 1, k]) the tracked copy is exactly the integral of
``p_T(s) theta(s)``; no offset is needed (EDM2 does the same, its time being images seen, ``cur_nimg`` after the
step). Its relative standard deviation (width over age) is ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2
(gamma + 3)))``, and gamma is the largest real root of ``g**3 + 7 g**2 + (16 - 1/sigma_rel**2) g + (12 -
1/sigma_rel**2)`` (positive for 0 < sigma_rel < sqrt(1/12)).

**Reconstruction.** A snapshot i (profile gamma_i at step T_i) is the integral of ``p_i theta``; a target profile
p (any sigma_rel, at the step of a snapshot) is approximated by ``sum_i x_i p_i``, x the least-squares solution of
``A x = b``, ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p>`` (inner products of L2[0, inf), closed form below). The
reconstructed weights ``sum_i x_i snapshot_i`` then differ from the target EMA by
``integral (sum_i x_i p_i - p) theta``, at most ``||sum_i x_i p_i - p|| * ||theta||`` (Cauchy-Schwarz): the relative
profile error ``||sum x_i p_i - p|| / ||p||`` reported by :func:`plan_reconstruction` is that bound's factor.
The solve is in float64 on the correlation matrix ``D^-1/2 A D^-1/2`` (D = diag A: every profile at unit norm)
with ``numpy.linalg.lstsq`` cutting singular values below ``RCOND`` of the largest (many snapshots of close profiles
make A nearly singular, and large coefficients would amplify the snapshots' float32 round-off); x is then scaled
to sum to 1 (as EDM2 does), so that weights that never moved come back exactly as they were.

Snapshots are ``RUN/phema/step-XXXXXXXX-std-S.safetensors``, each the state dict of the denoiser's tracked copy
(float32) with its step, sigma_rel, gamma, buffer names, example shape and config in the safetensors metadata,
written atomically by the first process (every process tracks identical copies: difflab's data parallelism keeps
the weights identical everywhere).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from difflab.errors import DifflabError, require

SNAPSHOTS = "phema"  # the run folder's sub-folder of snapshots
FORMAT, VERSION = "difflab-phema", "1"  # safetensors metadata: what the file is
MAX_STD = math.sqrt(1 / 12)  # sigma_rel of gamma = 0 (a uniform average); gamma > 0 below it
RCOND = 1e-12  # singular values of the correlation matrix below this fraction of the largest are cut
PREFIX = "phema."  # checkpoint tensors: phema.<profile index>.<state dict name>
_NAME = re.compile(r"^step-(\d{8,})-std-([0-9.e+-]+)\.safetensors$")

# --------------------------------------------------------------------------------------------- profiles


def gamma_to_std(gamma: float) -> float:
    """The relative standard deviation of the power-function EMA profile with exponent ``gamma``."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def std_to_gamma(std: float) -> float:
    """The exponent gamma > 0 of the power-function EMA profile whose relative standard deviation is ``std``
    (0 < std < sqrt(1/12)): the largest real root of g^3 + 7 g^2 + (16 - 1/std^2) g + (12 - 1/std^2)."""
    std = check_std(std, "sigma_rel")
    k = 1.0 / std**2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    g = float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))))
    for _ in range(3):  # Newton steps on the cubic: the companion-matrix root to the last bit
        f, df = ((g + 7) * g + 16 - k) * g + 12 - k, (3 * g + 14) * g + 16 - k
        g -= f / df
    return g


def check_std(std: float, what: str = "--std") -> float:
    """``std`` as a float if it is a relative standard deviation a power-function profile has (0 < std <
    sqrt(1/12) = 0.2887), else a one-line :class:`DifflabError`."""
    try:
        value = float(std)
    except (TypeError, ValueError):
        raise DifflabError(f"{what} must be a number, got {std!r}") from None
    require(math.isfinite(value) and 0 < value < MAX_STD,
            f"{what} must be in (0, {MAX_STD:.4f}) (the relative standard deviation of a power-function EMA: "
            f"e.g. 0.05 short, 0.15 long), got {std!r}")
    return value


def power_beta(gamma: float, t: int) -> float:
    """The decay after step ``t`` (counted from 1) of the power-function EMA with exponent ``gamma``:
    (1 - 1/t) ** (gamma + 1); 0 at t = 1 (the copy becomes the network)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_weights(gamma: float, T: int) -> np.ndarray:
    """The weights (T,) of the networks after steps 1..T in the power-function EMA at step T (float64): the
    profile's density integrated over each step, (k^(g+1) - (k-1)^(g+1)) / T^(g+1)."""
    k = np.arange(T + 1, dtype=np.float64) / T
    c = k ** (gamma + 1.0)
    return np.diff(c)


def inner(T_a, gamma_a, T_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> (float64, broadcast) of the power-function densities p(s) = (g + 1) s^g / T^(g + 1) on [0, T]:
    with T_a <= T_b, (g_a + 1)(g_b + 1) / ((g_a + g_b + 1) T_b) * (T_a / T_b)^g_b."""
    T_a, gamma_a, T_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (T_a, gamma_a, T_b, gamma_b))
    lo, hi = np.minimum(T_a, T_b), np.maximum(T_a, T_b)
    g_hi = np.where(T_a <= T_b, gamma_b, gamma_a)  # the exponent of the profile that reaches further
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi) * (lo / hi) ** g_hi


def solve(steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float) -> tuple[np.ndarray, float]:
    """The coefficients x (float64, summing to 1) of the snapshots (``steps[i]``, ``gammas[i]``) whose combination
    is nearest, in L2, the profile ``gamma`` at ``step``, and the relative profile error ||sum x_i p_i - p|| / ||p||
    (of the coefficients as returned)."""
    T, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    A = inner(T[:, None], g[:, None], T[None, :], g[None, :])
    b = inner(T, g, float(step), float(gamma))
    pp = float(inner(step, gamma, step, gamma))
    d = np.sqrt(np.diag(A))
    y = np.linalg.lstsq(A / np.outer(d, d), b / d, rcond=RCOND)[0]
    x = y / d
    total = x.sum()
    require(abs(total) > 1e-6, "the post-hoc EMA snapshots cannot express that profile (their combination has "
                               "no weight): choose another --std or --step")
    x = x / total
    err2 = pp - 2 * float(x @ b) + float(x @ A @ x)
    return x, math.sqrt(max(err2, 0.0) / pp)


# --------------------------------------------------------------------------------------------- tracking


def snapshot_due(cfg, step: int) -> bool:
    """Whether the profiles are snapshotted after ``step``: every train.phema_every steps and at train.steps."""
    from difflab.models import phema_every_for

    return bool(cfg.train.phema) and (step % phema_every_for(cfg) == 0 or step == cfg.train.steps)


def std_name(std: float) -> str:
    return f"{std:g}"


class PowerEMA:
    """Float32 copies of a network's state dict, one per power-function profile (``stds``: the relative standard
    deviations): the parameters are averaged (:meth:`update` after every step), the buffers copied from the
    network whenever the copies are read (snapshots, checkpoints)."""

    def __init__(self, model: torch.nn.Module, stds: Sequence[float]):
        self.stds = [check_std(s, "train.phema") for s in stds]
        names = [std_name(s) for s in self.stds]
        require(len(set(names)) == len(names), f"train.phema lists the same profile twice ({self.stds}): give "
                                               "distinct relative standard deviations")
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.param_names = list(dict(model.named_parameters(remove_duplicate=False)))
        self.buffer_names = [k for k in model.state_dict() if k not in set(self.param_names)]
        self.copies = [self._tracked(model.state_dict()) for _ in self.stds]

    @staticmethod
    def _tracked(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).clone() for k, v in
                state.items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, t: int) -> None:
        """Average in the network after step ``t`` (counted from 1: the copies equal the network after step 1)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        live = [params[k].detach() for k in self.param_names]
        live = [p if p.dtype == torch.float32 else p.float() for p in live]
        for gamma, copy in zip(self.gammas, self.copies, strict=True):
            torch._foreach_lerp_([copy[k] for k in self.param_names], live, 1.0 - power_beta(gamma, t))

    @torch.no_grad()
    def _sync_buffers(self, model: torch.nn.Module) -> None:
        if not self.buffer_names:
            return
        state = model.state_dict()
        for copy in self.copies:
            for k in self.buffer_names:
                copy[k].copy_(state[k])

    def state_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The copies for a checkpoint: ``phema.<i>.<name>``."""
        self._sync_buffers(model)
        return {f"{PREFIX}{i}.{k}": v for i, copy in enumerate(self.copies) for k, v in copy.items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Restore the copies from a checkpoint's tensors (refused in one line when they are missing)."""
        for i, copy in enumerate(self.copies):
            missing = [f"{PREFIX}{i}.{k}" for k in copy if f"{PREFIX}{i}.{k}" not in tensors]
            if missing:
                raise DifflabError(f"checkpoint {where} cannot be resumed with train.phema = {self.stds}: it holds "
                                   f"no post-hoc EMA copy {missing[0]} (resume with the config it was trained with)")
            for k, v in copy.items():
                saved = tensors[f"{PREFIX}{i}.{k}"]
                if saved.shape != v.shape:
                    raise DifflabError(f"checkpoint {where}: post-hoc EMA copy {PREFIX}{i}.{k} has shape "
                                       f"{tuple(saved.shape)}, the network {tuple(v.shape)}")
                v.copy_(saved)

    def write_snapshots(self, run_dir: Path, step: int, model: torch.nn.Module, config: dict,
                        shape: Sequence[int]) -> list[Path]:
        """Write every profile's copy at ``step`` to RUN/phema/ (atomically; the caller is the first process)."""
        from safetensors.torch import save

        from difflab.atomic import atomic_file

        self._sync_buffers(model)
        folder = Path(run_dir) / SNAPSHOTS
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for std, gamma, copy in zip(self.stds, self.gammas, self.copies, strict=True):
            meta = {"format": FORMAT, "version": VERSION, "step": str(step), "sigma_rel": repr(std),
                    "gamma": repr(gamma), "buffers": json.dumps(self.buffer_names), "shape": json.dumps(list(shape)),
                    "config": json.dumps(config, sort_keys=True)}
            data = save({k: v.detach().cpu().contiguous() for k, v in copy.items()}, metadata=meta)
            path = snapshot_path(run_dir, step, std)
            try:
                with atomic_file(path) as f:
                    f.write(data)
            except OSError as e:
                raise DifflabError(f"could not write post-hoc EMA snapshot {path} ({e.strerror or e})") from None
            written.append(path)
        return written


def snapshot_path(run_dir: Path, step: int, std: float) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step-{step:08d}-std-{std_name(std)}.safetensors"


def prune_snapshots(run_dir: Path, step: int) -> None:
    """Remove the snapshots after ``step`` (written past the checkpoint a resume starts from; training writes them
    again) and the temporary files of a killed write."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if (m and int(m.group(1)) > step) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its path, step, profile (sigma_rel, gamma) and metadata."""

    path: Path
    step: int
    std: float
    gamma: float
    meta: dict = field(repr=False)


def read_snapshot_meta(path: Path) -> Snapshot:
    """The step and profile of a snapshot file, from its header only (one-line error for a damaged file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        require(meta.get("format") == FORMAT, "not a post-hoc EMA snapshot")
        return Snapshot(Path(path), int(meta["step"]), float(meta["sigma_rel"]), float(meta["gamma"]), meta)
    except Exception as e:  # safetensors' own errors for a malformed header, KeyError/ValueError for the metadata
        detail = e if isinstance(e, DifflabError) else type(e).__name__
        raise DifflabError(f"post-hoc EMA snapshot {path} cannot be read ({detail}): remove it, or restore it "
                           "from a backup") from None


def list_snapshots(run_dir: Path) -> list[Snapshot]:
    """The snapshots in RUN/phema/, by step then sigma_rel."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [read_snapshot_meta(p) for p in sorted(folder.iterdir()) if _NAME.match(p.name) and p.is_file()]
    return sorted(found, key=lambda s: (s.step, s.std))


def _steps_text(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 6 else \
        f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-2:]))}"


@dataclass
class Reconstruction:
    """What :func:`plan_reconstruction` found: the target (``std``, ``gamma``, ``step``), the ``snapshots`` it
    combines with their ``coefficients`` (summing to 1) and the relative profile ``error`` (see the module)."""

    run_dir: Path
    std: float
    gamma: float
    step: int
    snapshots: list[Snapshot]
    coefficients: np.ndarray
    error: float

    def record(self) -> dict:
        """A JSON-able summary (what an export's run.json keeps under "phema")."""
        return {"std": self.std, "gamma": self.gamma, "step": self.step, "source": str(self.run_dir),
                "profile_error": self.error, "snapshots": len(self.snapshots),
                "inputs": [{"step": s.step, "std": s.std, "coefficient": float(x)}
                           for s, x in zip(self.snapshots, self.coefficients, strict=True)]}


def plan_reconstruction(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                        from_stds: Sequence[float] | None = None) -> Reconstruction:
    """Check the request and solve for the coefficients, reading the snapshots' headers only: ``sigma_rel`` the
    target profile, ``step`` a snapshot step (None: the last), ``from_stds`` only the snapshots of these tracked
    profiles (None: all). Bad input fails in one line."""
    run_dir = Path(run_dir)
    std = check_std(sigma_rel)
    require(run_dir.is_dir(), f"no such run folder: {run_dir}")
    found = list_snapshots(run_dir)
    require(bool(found), f"{run_dir} holds no post-hoc EMA snapshots ({run_dir / SNAPSHOTS}/): train it with "
                         "train.phema set, e.g. --set 'train.phema=[0.05, 0.1]'")
    if from_stds is not None:
        wanted = [float(s) for s in from_stds]
        tracked = sorted({s.std for s in found})
        found = [s for s in found if any(math.isclose(s.std, w, rel_tol=1e-9) for w in wanted)]
        require(bool(found), f"{run_dir} has no snapshots of the profiles {wanted}: it tracked {tracked}")
    steps = sorted({s.step for s in found})
    if step is None:
        step = steps[-1]
    require(step in steps, f"{run_dir} has no post-hoc EMA snapshots at step {step}: its snapshot steps are "
                           f"{_steps_text(steps)}")
    used = [s for s in found if 0 < s.step <= step]
    require(bool(used), f"{run_dir} has no post-hoc EMA snapshots after step 0")
    gamma = std_to_gamma(std)
    x, error = solve([s.step for s in used], [s.gamma for s in used], step, gamma)
    return Reconstruction(run_dir, std, gamma, step, used, x, error)


def combine(plan: Reconstruction) -> dict[str, torch.Tensor]:
    """The reconstructed state dict: sum_i x_i snapshot_i, accumulated in float64 one snapshot at a time and
    returned in the snapshots' dtypes (float32); buffers (and integer tensors) from the target step's snapshot."""
    from safetensors.torch import load_file

    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    keep: dict[str, torch.Tensor] = {}
    for snap, x in zip(plan.snapshots, plan.coefficients, strict=True):
        try:
            tensors = load_file(str(snap.path))
        except Exception as e:  # safetensors raises its own error types for truncation
            raise DifflabError(f"post-hoc EMA snapshot {snap.path} cannot be read ({type(e).__name__}): remove it, "
                               "or restore it from a backup") from None
        buffers = set(json.loads(snap.meta.get("buffers", "[]")))
        require(not dtypes or set(tensors) == set(dtypes), f"post-hoc EMA snapshot {snap.path} holds other "
                                                           "tensors than the run's others (another network's?)")
        for k, v in tensors.items():
            if k in buffers or not v.is_floating_point():
                if snap.step == plan.step:
                    keep[k] = v
                dtypes[k] = v.dtype
                continue
            dtypes[k] = v.dtype
            term = v.to(torch.float64) * float(x)
            acc[k] = term if k not in acc else acc[k].add_(term)
    return {k: keep[k] if k in keep else acc[k].to(dtypes[k]) for k in dtypes}


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                from_stds: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The denoiser's state dict of the power-function EMA with relative standard deviation ``sigma_rel`` at
    snapshot ``step`` (None: the last), rebuilt from the run's snapshots (``from_stds``: of these profiles only);
    ``Run.load``'s network loads it. See :func:`plan_reconstruction` for the checks and the error."""
    return combine(plan_reconstruction(run_dir, sigma_rel, step, from_stds))


def export_phema(run_dir: str | Path, std: float, out: str | Path, step: int | None = None,
                 overwrite: bool = False) -> Reconstruction:
    """Write the reconstructed EMA of ``run_dir`` (``std`` at snapshot ``step``, None: the last) as an exported
    folder (``model.safetensors`` + ``run.json``, as ``difflab export --format safetensors`` writes) that
    ``Run.load``, ``difflab sample`` and ``difflab info`` read. Everything is checked before any tensor is read;
    returns the :class:`Reconstruction` (its ``error``: the relative profile error)."""
    from safetensors.torch import save_file

    from difflab.atomic import atomic_dir
    from difflab.config import RunConfig, validate
    from difflab.exports import RUN_FILE, WEIGHTS_FILE, _check_out
    from difflab.models import build_denoiser
    from difflab.paths import check_writable
    from difflab.training.checkpoint import load_weights

    out = Path(out)
    check_writable(out, "--out", folder=True)
    _check_out(out, overwrite)
    plan = plan_reconstruction(run_dir, std, step)
    last = next(s for s in plan.snapshots if s.step == plan.step)
    try:
        config, shape = json.loads(last.meta["config"]), tuple(json.loads(last.meta["shape"]))
        cfg = validate(RunConfig.from_dict(config))
    except (KeyError, ValueError, TypeError) as e:
        raise DifflabError(f"post-hoc EMA snapshot {last.path} has no readable config ({e})") from None
    state = combine(plan)
    model = build_denoiser(cfg, shape)
    load_weights(model, state, last.path)  # (the same network: refused in one line otherwise)
    meta = {"config": cfg.to_dict(), "shape": list(shape), "step": plan.step, "source": str(plan.run_dir),
            "phema": plan.record()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / RUN_FILE).write_text(json.dumps(meta, indent=1))
    return plan


__all__ = ["MAX_STD", "PowerEMA", "Reconstruction", "Snapshot", "check_std", "combine", "export_phema",
           "gamma_to_std", "inner", "list_snapshots", "plan_reconstruction", "power_beta", "profile_weights",
           "reconstruct", "solve", "std_to_gamma"]
