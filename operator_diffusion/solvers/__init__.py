"""Training-free probability-flow ODE solvers behind one pure function, ``solve``.

    from operator_diffusion.schedules import VPLinear, time_grid
    from operator_diffusion.solvers import solve
    ts = time_grid(VPLinear(), 10, "logsnr")
    out = solve(eps_fn, x_T, VPLinear(), ts, "dpmpp-2m", record=[0, 5, 10])
    out.sample, out.nfe, out.states, out.denoised

``eps_fn(x, t, **extra_args)`` gets a batch of times of shape (B,) and returns ε̂ of x's shape.
Class labels (and anything else the model needs) go in ``extra_args``; classifier-free guidance is
``operator_diffusion.prediction.classifier_free_guidance(eps_fn, scale, null_label)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..schedules import Schedule
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
        SolverSpec("dpmpp-3m", dpmpp_3m, "DPM-Solver++(3M) as published (exact_third_order=True: corrected)", "2 (3 corrected)"),
        SolverSpec("unipc", unipc, "UniPC predictor–corrector (bh1/bh2), data prediction", "order+1"),
        SolverSpec("heun", heun, "EDM Heun (2nd order, 2 NFE per step)", "2", nfe_per_step=2),
        SolverSpec("lambda-ddim", lambda_ddim, "λ-DDIM conjugate integrator (B_t = λI); λ=0 is DDIM", "1"),
    )
}


def available_solvers() -> list[str]:
    return list(_SOLVERS)


def solver_info(method: str) -> SolverSpec:
    if method not in _SOLVERS:
        raise ValueError(f"unknown solver {method!r}; valid: {', '.join(_SOLVERS)}")
    return _SOLVERS[method]


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


def _check_grid(schedule: Schedule, ts) -> Tensor:
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
            f"ts must be strictly decreasing; ts[{k}]={float(ts[k]):.6g} is followed by ts[{k + 1}]={float(ts[k + 1]):.6g}{hint}"
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
    schedule: Schedule,
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
    """Integrate the probability-flow ODE from x at ts[0] down to ts[-1] with ``method``.

    ``options`` are the method's own (``order``, ``lower_order_final``, ``variant``, ``lam``, …; see
    ``solver_info(method).options``). ``record`` lists grid indices (0..N, negatives allowed) whose states
    and denoised predictions are kept. The denoised prediction at the last index costs one more NFE
    (counted), as does ``denoise_to_zero``, which returns x̂_0(x_N, t_N) as the sample.
    ``callback(SolverStep)`` runs once per grid index i < N (and at N when x̂_0 there was computed anyway)
    with the state and the denoised prediction; it never costs an evaluation.
    """
    spec = solver_info(method)
    unknown = set(options) - set(spec.options)
    if unknown:
        raise ValueError(
            f"solver {method!r} has no option {', '.join(sorted(unknown))}; its options: "
            f"{', '.join(f'{k}={v!r}' for k, v in spec.options.items()) or 'none'}"
        )
    grid = Grid.build(schedule, _check_grid(schedule, ts))
    ev = Evaluator(eps_fn, grid, extra_args, _check_record(record, grid.steps), record_denoised, callback, check_finite)
    x_n = spec.fn(ev, x, grid, **options)
    n = grid.steps
    sample = x_n
    if denoise_to_zero or (n in ev.record and record_denoised):
        d_n = ev.denoise(x_n, ev(x_n, n), n)
        sample = d_n if denoise_to_zero else x_n
    else:
        d_n = None
    ev.visit(n, x_n, d_n)
    recorded = tuple(ev.record)
    states = torch.stack([ev.states[i] for i in recorded], 1) if recorded else None
    denoised = torch.stack([ev.denoised[i] for i in recorded], 1) if recorded and record_denoised else None
    return SolveResult(sample, ev.nfe, grid.t, recorded, states, denoised)
