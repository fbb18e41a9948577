"""Training-free probability-flow ODE solvers behind one pure function, ``solve``.

    from operator_diffusion.schedules import VPLinear, time_grid
    from operator_diffusion.solvers import solve
    ts = time_grid(VPLinear(), 10, "logsnr")
    out = solve(eps_fn, x_T, VPLinear(), ts, "dpmpp-2m", record=[0, 5, 10])
    out.sample, out.nfe, out.states, out.denoised

``eps_fn(x, t, **extra_args)`` gets a batch of times of shape (B,) and returns ε̂ of x's shape.
Class labels (and anything else the model needs) go in ``extra_args``; classifier-free guidance is
``operator_diffusion.prediction.classifier_free_guidance(eps_fn, scale, null_label)``.

With a ``PSLD`` schedule the state is the phase-space z = (x, m) of shape (B, 2C, ...), ``eps_fn`` returns
the 2C-channel HSM ε̂, and ``method`` names one of the PSLD solvers (``available_solvers(PSLD())``:
deterministic and stochastic integrators of docs/psld.md); the α/σ solvers above do not apply to it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..schedules import DiffusionProcess, split
from . import psld as _psld
from . import psld_sde as _psld_sde
from .base import EpsFn, Evaluator, Grid, NonFiniteError, SolverStep
from .conjugate import lambda_ddim
from .ddim import ddim
from .deis import deis, ipndm
from .dpmpp import dpmpp_2m, dpmpp_3m
from .heun import heun
from .unipc import unipc

__all__ = ["solve", "available_solvers", "solver_info", "SolveResult", "SolverSpec", "SolverStep", "NonFiniteError"]


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver: its function, a one-line summary, and its global order of convergence."""

    name: str
    fn: Callable[..., Tensor]
    summary: str
    order: str
    nfe_per_step: int = 1
    stochastic: bool = False  # takes generator / noise_sampler and samples the reverse SDE

    @property
    def options(self) -> dict[str, Any]:
        """Keyword options and their defaults."""
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        return {p.name: p.default for p in params}


_SOLVERS: dict[str, SolverSpec] = {
    s.name: s
    for s in (
        SolverSpec("ddim", ddim, "DDIM (η=0) = DPM-Solver-1 = exponential Euler", "1"),
        SolverSpec("deis", deis, "tAB-DEIS (variant='rho': ρAB-DEIS), exact coefficients", "order+1"),
        SolverSpec("ipndm", ipndm, "iPNDM: fixed-weight Adams–Bashforth in ρ", "2 (order+1 on a uniform-ρ grid)"),
        SolverSpec("dpmpp-2m", dpmpp_2m, "DPM-Solver++(2M), data prediction", "2"),
        SolverSpec(
            "dpmpp-3m", dpmpp_3m, "DPM-Solver++(3M) as published (exact_third_order=True: corrected)", "2 (3 corrected)"
        ),
        SolverSpec("unipc", unipc, "UniPC predictor–corrector (bh1/bh2), data prediction", "order+1"),
        SolverSpec("heun", heun, "EDM Heun (2nd order, 2 NFE per step)", "2", nfe_per_step=2),
        SolverSpec("lambda-ddim", lambda_ddim, "λ-DDIM conjugate integrator (B_t = λI); λ=0 is DDIM", "1"),
    )
}


# PSLD (phase-space) solvers: a separate registry, chosen when the schedule is a PSLD. Orders are the
# measured global orders on the exact Gaussian oracle (tests/test_psld.py; weak orders for the SDEs).
_PSLD_SOLVERS: dict[str, SolverSpec] = {
    s.name: s
    for s in (
        SolverSpec("euler", _psld.euler, "PF-ODE Euler", "1"),
        SolverSpec(
            "lambda-ddim", _psld.lambda_ddim, "λ-DDIM conjugate integrator, B = λI; λ=0: exponential Euler", "1"
        ),
        SolverSpec(
            "lambda-ddim-block", _psld.lambda_ddim_block, "λ-DDIM-II conjugate integrator, B = λ·(2×2 ones)", "1"
        ),
        SolverSpec("nse", _psld.nse, "naive symplectic Euler (m then x, fresh ε̂ each)", "1", nfe_per_step=2),
        SolverSpec("rse", _psld.rse, "reduced symplectic Euler (one ε̂ per step)", "1"),
        SolverSpec("nvv", _psld.nvv, "naive velocity Verlet (explicit sub-steps)", "1", nfe_per_step=3),
        SolverSpec("rvv", _psld.rvv, "reduced velocity Verlet (ε̂ reused, N+1 NFE)", "1"),
        SolverSpec(
            "csps-d",
            _psld.csps_d,
            "conjugate splitting: conjugate symplectic Euler ('se') / velocity Verlet ('vv')",
            "1",
        ),
        SolverSpec("em", _psld_sde.em, "Euler–Maruyama on the reverse SDE", "1 (weak)", stochastic=True),
        SolverSpec(
            "sscs", _psld_sde.sscs, "symmetric splitting CLD sampler (exact OU half-steps)", "1 (weak)", stochastic=True
        ),
        SolverSpec(
            "noba",
            _psld_sde.noba,
            "naive OBA splitting (O exact, B, A; fresh score each)",
            "1 (weak)",
            nfe_per_step=2,
            stochastic=True,
        ),
        SolverSpec("roba", _psld_sde.roba, "reduced OBA splitting (one score per step)", "1 (weak)", stochastic=True),
        SolverSpec(
            "csps-s",
            _psld_sde.csps_s,
            "conjugate splitting sampler, stochastic (O half-steps, conjugate B/A)",
            "1 (weak)",
            stochastic=True,
        ),
    )
}


@dataclass(frozen=True)
class SolverFamily:
    """The solvers of one kind of process (``DiffusionProcess.solver_family``): its registry, how a grid is
    built on the process, the evaluator the solvers call, and the check of the state they take."""

    solvers: dict[str, SolverSpec]
    grid: Callable[[DiffusionProcess, Tensor], Any]
    evaluator: type
    check_state: Callable[[Tensor], Any]


FAMILIES: dict[str, SolverFamily] = {
    "alpha-sigma": SolverFamily(_SOLVERS, Grid.build, Evaluator, lambda x: None),
    "psld": SolverFamily(_PSLD_SOLVERS, _psld.PSLDGrid, _psld.PSLDEvaluator, split),  # split: x is (B, 2C, ...)
}


def _family(schedule: DiffusionProcess | None) -> SolverFamily:
    return FAMILIES["alpha-sigma" if schedule is None else schedule.solver_family]


def _registry(schedule: DiffusionProcess | None) -> dict[str, SolverSpec]:
    return _family(schedule).solvers


def available_solvers(schedule: DiffusionProcess | None = None) -> list[str]:
    """The solvers for ``schedule``: the α/σ solvers (also when None), or the PSLD ones for a ``PSLD``."""
    return list(_registry(schedule))


def solver_info(method: str, schedule: DiffusionProcess | None = None) -> SolverSpec:
    """The registered solver ``method`` for ``schedule`` (None: the α/σ solvers)."""
    registry = _registry(schedule)
    if method in registry:
        return registry[method]
    if registry is _PSLD_SOLVERS:
        hint = f" ({method!r} is for α/σ schedules such as VP and EDM, not PSLD)" if method in _SOLVERS else ""
        raise ValueError(f"unknown solver {method!r} for the psld schedule; valid: {', '.join(registry)}{hint}")
    hint = f" ({method!r} is a PSLD solver: it needs a PSLD schedule)" if method in _PSLD_SOLVERS else ""
    raise ValueError(f"unknown solver {method!r}; valid: {', '.join(registry)}{hint}")


@dataclass(frozen=True)
class SolveResult:
    """``sample``: the final state (x̂_0 when ``denoise_to_zero``); ``nfe``: network evaluations spent;
    ``times``: the grid (float64); ``recorded``: the grid indices asked for in ``record``;
    ``states`` / ``denoised``: (B, K, ...) stacks of x(t_i) and x̂_0(t_i) at those indices (or None)."""

    sample: Tensor
    nfe: int
    times: Tensor
    recorded: tuple[int, ...] = ()
    states: Tensor | None = None
    denoised: Tensor | None = None


def _check_grid(schedule: DiffusionProcess, ts) -> Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    if ts.dim() != 1 or len(ts) < 2:
        raise ValueError(f"ts must be a 1-D sequence of at least 2 times, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"ts contains NaN/Inf at index {int((~torch.isfinite(ts)).nonzero()[0])}")
    diffs = ts[1:] - ts[:-1]
    if not bool((diffs < 0).all()):
        k = int((diffs >= 0).nonzero()[0])
        hint = " (it is increasing: pass it reversed, noise → data)" if bool((diffs > 0).all()) else ""
        raise ValueError(
            f"ts must be strictly decreasing; ts[{k}]={float(ts[k]):.6g} is followed by "
            f"ts[{k + 1}]={float(ts[k + 1]):.6g}{hint}"
        )
    schedule.check_times(ts, what="ts entry")
    return ts


def _check_record(record, steps: int) -> list[int]:
    out = []
    for r in record or []:
        r = int(r)
        if not -(steps + 1) <= r <= steps:
            raise ValueError(f"record index {r} is outside the grid indices 0..{steps}")
        out.append(r % (steps + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"record indices must be distinct, got {list(record)}")
    return out


def solve(
    eps_fn: EpsFn,
    x: Tensor,
    schedule: DiffusionProcess,
    ts,
    method: str = "dpmpp-2m",
    *,
    extra_args: dict[str, Any] | None = None,
    record=None,
    record_denoised: bool = True,
    denoise_to_zero: bool = False,
    callback: Callable[[SolverStep], None] | None = None,
    check_finite: bool = True,
    **options,
) -> SolveResult:
    """Integrate the probability-flow ODE (or, for the stochastic PSLD methods, the reverse SDE) from x at
    ts[0] down to ts[-1] with ``method``.

    ``options`` are the method's own (``order``, ``lower_order_final``, ``variant``, ``lam``, …; see
    ``solver_info(method).options``). ``record`` lists grid indices (0..N, negatives allowed) whose states
    and denoised predictions are kept. The denoised prediction at the last index costs one more NFE
    (counted), as does ``denoise_to_zero``, which returns x̂_0(x_N, t_N) as the sample.
    ``callback(SolverStep)`` runs once per grid index i < N (and at N when x̂_0 there was computed anyway)
    with the state and the denoised prediction; it never costs an evaluation.

    PSLD: ``x`` is the state (B, 2C, ...); the denoised predictions are x̂_0 (C channels), and
    ``denoise_to_zero`` is the PSLD code's final noise-free reverse-SDE Euler step from t_N to 0 (the full
    state at t = 0, one NFE). Stochastic methods take ``generator`` or ``noise_sampler``.
    """
    spec = solver_info(method, schedule)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(
            f"solver {method!r} has no option {', '.join(sorted(unknown))}; its options: "
            f"{', '.join(f'{k}={v!r}' for k, v in spec.options.items()) or 'none'}"
        )
    ts = _check_grid(schedule, ts)
    family = _family(schedule)
    family.check_state(x)
    grid, evaluator = family.grid(schedule, ts), family.evaluator
    ev = evaluator(eps_fn, grid, extra_args, _check_record(record, grid.steps), record_denoised, callback, check_finite)
    x_n = spec.fn(ev, x, grid, **options)
    n = grid.steps
    sample = x_n
    if denoise_to_zero or (n in ev.record and record_denoised):
        eps_n = ev(x_n, n)
        d_n = ev.denoise(x_n, eps_n, n)
        sample = ev.denoise_to_zero(x_n, eps_n, n) if denoise_to_zero else x_n
    else:
        d_n = None
    ev.visit(n, x_n, d_n)
    recorded = tuple(ev.record)
    states = torch.stack([ev.states[i] for i in recorded], 1) if recorded else None
    denoised = torch.stack([ev.denoised[i] for i in recorded], 1) if recorded and record_denoised else None
    return SolveResult(sample, ev.nfe, grid.t, recorded, states, denoised)
