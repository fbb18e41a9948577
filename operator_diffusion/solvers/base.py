"""What every solver shares: the grid's coefficients, the counted and checked ε evaluation, and the
``visit`` hook through which states and denoised predictions are recorded and the callback is called.

A solver is a pure function ``solver(ev, x, grid, *, options...) -> x_N``: it reads the precomputed
float64 grid, calls ``ev(x, i)`` for ε̂(x, t_i) (``ev.at(x, t)`` for off-grid stages), calls
``ev.visit(i, x_i, denoised_i)`` once for every grid index i < N, and returns the state at t_N.
Nothing survives a call: ``solve`` builds a fresh evaluator each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ..schedules import Schedule

EpsFn = Callable[..., Tensor]


class NonFiniteError(FloatingPointError):
    """``eps_fn`` returned NaN or Inf; the message names the step, the time and the batch items."""

    def __init__(self, message: str, step: int, t: float, items: list[int]):
        super().__init__(message)
        self.step, self.t, self.items = step, t, items


@dataclass(frozen=True)
class Grid:
    """The time grid t_0 > … > t_N and its schedule quantities, all float64 on the CPU.

    ``lam`` is the log-SNR λ_i = log(α_i/σ_i) and ``rho`` is ρ_i = σ_i/α_i = e^{−λ_i}.
    """

    schedule: Schedule
    t: Tensor
    alpha: Tensor
    sigma: Tensor
    lam: Tensor
    rho: Tensor

    @classmethod
    def build(cls, schedule: Schedule, ts: Tensor) -> "Grid":
        t = ts.detach().to("cpu", torch.float64)
        return cls(schedule, t, schedule.alpha(t), schedule.sigma(t), schedule.log_snr(t), schedule.rho(t))

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def __getitem__(self, i: int) -> tuple[float, float, float, float, float]:
        """(t, α, σ, λ, ρ) at grid index i as Python floats."""
        return (float(self.t[i]), float(self.alpha[i]), float(self.sigma[i]), float(self.lam[i]), float(self.rho[i]))


# Gauss–Legendre rule on [-1, 1]; 32 nodes integrate the smooth step integrands below to ~1e-15.
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(32))


def integrate_drho(schedule: Schedule, f: Callable[[Tensor], Tensor], lam_s: Tensor, lam_t: Tensor) -> Tensor:
    """∫ f(τ) dρ(τ) over steps from λ_s to λ_t (tensors of shape (S,)), by Gauss–Legendre in λ
    (dρ = −e^{−λ} dλ), for all S steps at once.

    ``f`` maps times τ of shape (S, Q) to values of shape (S, Q, ...); the result has shape (S, ...).
    Substituting λ makes the integrand analytic and mildly varying, so the rule is exact to round-off:
    these are the "exact" (not Riemann-sum) coefficients of DEIS and the conjugate integrators.
    """
    lam_s, lam_t = lam_s.to(torch.float64)[:, None], lam_t.to(torch.float64)[:, None]
    half, mid = 0.5 * (lam_t - lam_s), 0.5 * (lam_t + lam_s)
    lam = mid + half * _GL_X  # (S, Q)
    vals = f(schedule.t_from_log_snr(lam))
    w = _GL_W * half * -torch.exp(-lam)  # (S, Q)
    return (w.reshape(w.shape + (1,) * (vals.dim() - 2)) * vals).sum(1)


def lagrange_basis(nodes: Tensor, u: Tensor) -> Tensor:
    """ℓ_j(u) for the Lagrange basis on ``nodes`` (S, K), at points ``u`` (S, Q) → (S, Q, K)."""
    k = nodes.shape[-1]
    out = torch.ones(*u.shape, k, dtype=torch.float64)
    for j in range(k):
        for m in range(k):
            if m != j:
                out[..., j] *= (u - nodes[:, m : m + 1]) / (nodes[:, j : j + 1] - nodes[:, m : m + 1])
    return out


def _time_batch(t: float, x: Tensor) -> Tensor:
    """A time per item, shape (B,), float64 for float64 states and float32 otherwise (bf16 t is too coarse)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


class Evaluator:
    """Calls ``eps_fn``, counts network evaluations (NFE), rejects NaN/Inf, records and calls back."""

    def __init__(
        self,
        eps_fn: EpsFn,
        grid: Grid,
        extra_args: dict[str, Any] | None = None,
        record: list[int] | None = None,
        record_denoised: bool = True,
        callback: Callable[["SolverStep"], None] | None = None,
        check_finite: bool = True,
    ):
        self.eps_fn, self.grid = eps_fn, grid
        self.extra_args = extra_args or {}
        self.record = record or []
        self.record_denoised = record_denoised
        self.callback = callback
        self.check_finite = check_finite
        self.nfe = 0
        self.states: dict[int, Tensor] = {}
        self.denoised: dict[int, Tensor] = {}
        self._step = 0

    def at(self, x: Tensor, t: float) -> Tensor:
        """ε̂(x, t) at any time t (one NFE)."""
        eps = self.eps_fn(x, _time_batch(t, x), **self.extra_args)
        self.nfe += 1
        if eps.shape != x.shape:
            raise ValueError(f"eps_fn returned shape {tuple(eps.shape)} for a state of shape {tuple(x.shape)}")
        if self.check_finite:
            bad = ~torch.isfinite(eps.reshape(len(eps), -1)).all(1)
            if bool(bad.any()):
                items = bad.nonzero().flatten().tolist()
                raise NonFiniteError(
                    f"eps_fn returned NaN/Inf at step {self._step} (t={t:.6g}) for batch items {items[:10]}"
                    f"{' …' if len(items) > 10 else ''}; check the model, its inputs and the time range",
                    self._step,
                    t,
                    items,
                )
        return eps

    def __call__(self, x: Tensor, i: int) -> Tensor:
        """ε̂(x, t_i) at grid index i (one NFE)."""
        self._step = i
        return self.at(x, float(self.grid.t[i]))

    def denoise(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """x̂_0 = (x − σ_i ε̂)/α_i at grid index i."""
        return (x - float(self.grid.sigma[i]) * eps) / float(self.grid.alpha[i])

    def denoise_to_zero(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """The sample ``solve(..., denoise_to_zero=True)`` returns from x_N and ε̂_N: here x̂_0 (PSLD overrides it)."""
        return self.denoise(x, eps, i)

    def visit(self, i: int, x: Tensor, denoised: Tensor | None) -> None:
        """Every solver calls this once per grid index i < N with the state x_i and the data prediction
        x̂_0 the solver used there; ``solve`` calls it for i = N."""
        if i in self.record:
            self.states[i] = x
            if self.record_denoised and denoised is not None:
                self.denoised[i] = denoised
        if self.callback is not None and denoised is not None:
            self.callback(SolverStep(i=i, t=float(self.grid.t[i]), x=x, denoised=denoised, nfe=self.nfe))


@dataclass(frozen=True)
class SolverStep:
    """What the per-step callback sees (as k-diffusion's callback dict): grid index, time, state x_i,
    the denoised prediction x̂_0 used at t_i, and the NFE spent so far."""

    i: int
    t: float
    x: Tensor
    denoised: Tensor
    nfe: int


LOWER_ORDER_FINAL_BELOW = 15  # diffusers' rule: lower-order final steps when a schedule has fewer steps


def lower_order_final_default(lower_order_final: bool | None, steps: int) -> bool:
    """``lower_order_final=None`` (every multistep solver's default) means on below
    ``LOWER_ORDER_FINAL_BELOW`` steps, as diffusers' DPM-Solver++ and UniPC schedulers do; it stabilises
    the short schedules where the last log-SNR step is the longest (docs/solvers.md)."""
    return steps < LOWER_ORDER_FINAL_BELOW if lower_order_final is None else bool(lower_order_final)


def multistep_order(order: int, i: int, steps: int, lower_order_final: bool | None) -> int:
    """Order used at step i (0-based) of a multistep method that keeps ``order`` evaluations:
    warm-up with what is available (i+1 evaluations), and with ``lower_order_final`` the last steps
    drop to orders N−i (as DPM-Solver / UniPC), which stabilises very short schedules. None: on below
    ``LOWER_ORDER_FINAL_BELOW`` steps (``lower_order_final_default``)."""
    p = min(order, i + 1)
    if lower_order_final_default(lower_order_final, steps):
        p = min(p, steps - i)
    return p
