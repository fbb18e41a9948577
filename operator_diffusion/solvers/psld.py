"""Deterministic samplers for Phase Space Langevin Diffusion (PSLD): Euler, the conjugate integrators
λ-DDIM (B = λI) and its block variant (B = λ𝟙), and the splitting integrators NSE, RSE, NVV, RVV and
CSPS-D (Pandey, Rudolph & Mandt, "Efficient Integrators for Diffusion Generative Models", ICLR 2024).

All of them integrate the probability-flow ODE in forward time from t_0 = T down to t_N,

    dz/dt = F_t z + P_t ε̂(z, t),    P_t = ½ G_tG_tᵀ L_t⁻ᵀ,

per coordinate pair (x, m) (``PSLD``). Write f_x, f_m for its x and m rows. The paper's body was not
available: the splitting and hybrid updates below are derived from their descriptions (docs/psld.md) and
checked against the exact Gaussian oracle, not transcribed. h = t_{n+1} − t_n < 0 throughout.

Every update is affine in (z, ε̂) with 2×2 per-coordinate matrices; a sub-step is a pair (K, J) acting as
z ← K z + J ε̂ (``affine_step``). Integrals over a step are Gauss–Legendre in v = √u, in which the integrands
(∝ L_u⁻ᵀ ~ u^{−1/2} near 0) are analytic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..schedules import PSLD, apply2
from .base import Evaluator

_I = torch.eye(2, dtype=torch.float64)
_ONES = torch.ones(2, 2, dtype=torch.float64)
_GL_X, _GL_W = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(32))


@dataclass(frozen=True)
class PSLDGrid:
    """The time grid t_0 > … > t_N (float64, CPU) of a PSLD solve."""

    schedule: PSLD
    t: Tensor

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def __getitem__(self, i: int) -> float:
        return float(self.t[i])


class PSLDEvaluator(Evaluator):
    """``Evaluator`` with PSLD's data prediction x̂₀ = (x − L₀₀ε̂_x)/Φ₀₀ (C channels) and its final step."""

    def denoise(self, z: Tensor, eps: Tensor, i: int) -> Tensor:
        return self.grid.schedule.denoise(z, eps, float(self.grid.t[i]))

    def denoise_to_zero(self, z: Tensor, eps: Tensor, i: int) -> Tensor:
        """The PSLD code's final noise-free step: one Euler step of the reverse-SDE drift from t_i to 0,
        z₀ = z − t_i (F z − GGᵀ s), s = −L⁻ᵀ ε̂. Returns the full state (x, m)."""
        sched, t = self.grid.schedule, float(self.grid.t[i])
        drift = apply2(sched.drift(t), z) + 2 * apply2(sched.eps_coefficient(t), eps)
        return z - t * drift


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------
def affine_step(KJ: tuple[Tensor, Tensor], z: Tensor, eps: Tensor) -> Tensor:
    """z ← K z + J ε̂."""
    K, J = KJ
    return apply2(K, z) + apply2(J, eps)


def coefficient_rows(A: Tensor, row: int | None) -> Tensor:
    """A with only row ``row`` kept (None: all of A)."""
    if row is None:
        return A
    mask = torch.zeros(2, 1, dtype=A.dtype)
    mask[row] = 1
    return A * mask


def quadrature(t_from: float, t_to: float) -> tuple[Tensor, Tensor]:
    """Nodes u (Q,) and signed weights w (Q,) with ∫_{t_from}^{t_to} f(u) du ≈ Σ w f(u): Gauss–Legendre
    (32 points) in v = √u, du = 2v dv, which makes the √u-type behaviour of L_u near 0 analytic."""
    v0, v1 = math.sqrt(t_from), math.sqrt(t_to)
    half, mid = 0.5 * (v1 - v0), 0.5 * (v1 + v0)
    v = mid + half * _GL_X
    return v**2, _GL_W * half * 2 * v


def euler_part(sched: PSLD, t: float, h: float, row: int | None = None) -> tuple[Tensor, Tensor]:
    """Explicit Euler sub-step of length h of the PF-ODE rows ``row`` (0: x, 1: m, None: both) at time t:
    K = I + h·F_t[row], J = h·P_t[row]."""
    return _I + h * coefficient_rows(sched.drift(t), row), h * coefficient_rows(sched.eps_coefficient(t), row)


def conjugate_part(sched: PSLD, t_from: float, t_to: float, lam: float, block: bool = False) -> tuple[Tensor, Tensor]:
    """One conjugate-integrator step (ẑ = A_t z, dA/dt = A(B − F), Euler on ẑ) from t_from to t_to:

        z ← R(t_to, t_from)(I + hB) z + ∫_{t_from}^{t_to} R(t_to, u) P_u du · ε̂,

    with R the transition matrix of dy/dt = (F_t − B) y (R(t, s) = A_t⁻¹A_s). B = λI gives
    R(t, u) = e^{−λ(t−u)}Φ(t, u); B = λ𝟙 (``block``) uses ``block_transition``. λ = 0: exponential Euler."""
    h = t_to - t_from
    u, w = quadrature(t_from, t_to)
    B = lam * (_ONES if block else _I)
    if block:
        R = block_transition(sched, lam, t_to, torch.cat([torch.tensor([t_from], dtype=torch.float64), u]))
        R_end, R_u = R[0], R[1:]
    else:
        R_end = math.exp(-lam * h) * sched.transition(t_to, t_from)
        R_u = torch.exp(-lam * (t_to - u))[:, None, None] * sched.transition(t_to, u)
    J = (w[:, None, None] * (R_u @ sched.eps_coefficient(u))).sum(0)
    return R_end @ (_I + h * B), J


def block_transition(sched: PSLD, lam: float, t: float, us: Tensor) -> Tensor:
    """R(t, u) for dy/dt = (F_t − λ𝟙) y at the times ``us`` (Q,) → (Q, 2, 2). Constant β: the matrix
    exponential of (t − u)(F − λ𝟙). Otherwise F_t and 𝟙 do not commute: dR/du = −R(F_u − λ𝟙), R(t, t) = I,
    solved with scipy's DOP853 (rtol = atol = 1e-12)."""
    if sched.constant_beta:
        return torch.linalg.matrix_exp((t - us)[:, None, None] * (sched.drift(t) - lam * _ONES))
    from scipy.integrate import solve_ivp

    def rhs(u, y):
        return -(y.reshape(2, 2) @ (sched.drift(u).numpy() - lam * _ONES.numpy())).ravel()

    order = torch.argsort(us)
    sol = solve_ivp(
        rhs, (t, float(us.max())), np.eye(2).ravel(), method="DOP853", t_eval=us[order].numpy(), rtol=1e-12, atol=1e-12
    )
    if not sol.success:
        raise RuntimeError(f"block conjugate transition solve failed: {sol.message}")
    out = torch.empty(len(us), 2, 2, dtype=torch.float64)
    out[order] = torch.from_numpy(sol.y.T.copy()).reshape(-1, 2, 2)
    return out


def conjugate_split_part(sched: PSLD, t_from: float, t_to: float, row: int | None, lam: float) -> tuple[Tensor, Tensor]:
    """One sub-step of row ``row`` (0: x, 1: m, None: both) of the conjugate integrator with B_t = F_t + λI,
    i.e. A_t = e^{λt}I and ẑ = e^{λt}z, dẑ/dt = (F_t + λ)ẑ + e^{λt}P_t ε̂: Euler on the linear part (at t_from),
    the ε̂ coefficient integrated exactly,

        z[row] ← e^{−λh}[(I + h(F_{t_from} + λI)) z][row] + (∫_{t_from}^{t_to} e^{−λ(t_to−u)} P_u du)[row] ε̂,

    the other row unchanged. (F's damping is not integrated exactly: near t = T the score cancels it, and
    the PF-ODE is close to the rotation (β/2)[[0, M⁻¹], [−1, 0]], which the splitting handles.)"""
    h = t_to - t_from
    u, w = quadrature(t_from, t_to)
    J = coefficient_rows(((w * torch.exp(-lam * (t_to - u)))[:, None, None] * sched.eps_coefficient(u)).sum(0), row)
    K = math.exp(-lam * h) * (_I + h * (sched.drift(t_from) + lam * _I))
    if row is not None:
        keep = torch.zeros(2, 1, dtype=torch.float64)
        keep[1 - row] = 1
        K = K * (1 - keep) + _I * keep
    return K, J


# ----------------------------------------------------------------------------------------------------
# Solvers: (ev, z, grid, **options) -> z_N; each calls ev.visit(i, z_i, x̂₀_i) once per i < N
# ----------------------------------------------------------------------------------------------------
def euler(ev: Evaluator, z: Tensor, grid: PSLDGrid) -> Tensor:
    """PF-ODE Euler: z_{n+1} = z_n + h (F_n z_n + P_n ε̂_n). 1 NFE per step, order 1."""
    for i in range(grid.steps):
        eps = ev(z, i)
        ev.visit(i, z, ev.denoise(z, eps, i))
        z = affine_step(euler_part(grid.schedule, grid[i], grid[i + 1] - grid[i]), z, eps)
    return z


def lambda_ddim(ev: Evaluator, z: Tensor, grid: PSLDGrid, *, lam: float = 0.0) -> Tensor:
    """λ-DDIM (conjugate integrator, B = λI): z_{n+1} = (1 + λh)e^{−λh}Φ(t_{n+1}, t_n) z_n
    + ∫ e^{−λ(t_{n+1}−u)}Φ(t_{n+1}, u) P_u du · ε̂_n. λ = 0 is exponential Euler. 1 NFE, order 1."""
    return _conjugate(ev, z, grid, lam, block=False)


def lambda_ddim_block(ev: Evaluator, z: Tensor, grid: PSLDGrid, *, lam: float = 0.0) -> Tensor:
    """λ-DDIM-II (B = λ𝟙, 𝟙 the 2×2 all-ones block coupling x and m): z_{n+1} = R(t_{n+1}, t_n)(I + hλ𝟙) z_n
    + ∫ R(t_{n+1}, u) P_u du · ε̂_n, R the transition of F − λ𝟙. λ = 0 is exponential Euler. 1 NFE, order 1."""
    return _conjugate(ev, z, grid, lam, block=True)


def _conjugate(ev: Evaluator, z: Tensor, grid: PSLDGrid, lam: float, block: bool) -> Tensor:
    for i in range(grid.steps):
        eps = ev(z, i)
        ev.visit(i, z, ev.denoise(z, eps, i))
        z = affine_step(conjugate_part(grid.schedule, grid[i], grid[i + 1], lam, block), z, eps)
    return z


def nse(ev: Evaluator, z: Tensor, grid: PSLDGrid) -> Tensor:
    """Naive symplectic Euler: m_{n+1} = m_n + h f_m(x_n, m_n; ε̂(z_n, t_n)), then
    x_{n+1} = x_n + h f_x(x_n, m_{n+1}; ε̂((x_n, m_{n+1}), t_n)). 2 NFE per step, order 1."""
    return _symplectic_euler(ev, z, grid, reuse=False)


def rse(ev: Evaluator, z: Tensor, grid: PSLDGrid) -> Tensor:
    """Reduced symplectic Euler: NSE with the step's one ε̂(z_n, t_n) reused in the position update
    (which still sees the new momentum through F's M⁻¹m term). 1 NFE per step, order 1."""
    return _symplectic_euler(ev, z, grid, reuse=True)


def _symplectic_euler(ev: Evaluator, z: Tensor, grid: PSLDGrid, reuse: bool) -> Tensor:
    sched = grid.schedule
    for i in range(grid.steps):
        t, h = grid[i], grid[i + 1] - grid[i]
        eps = ev(z, i)
        ev.visit(i, z, ev.denoise(z, eps, i))
        z = affine_step(euler_part(sched, t, h, row=1), z, eps)
        if not reuse:
            eps = ev.at(z, t)
        z = affine_step(euler_part(sched, t, h, row=0), z, eps)
    return z


def nvv(ev: Evaluator, z: Tensor, grid: PSLDGrid) -> Tensor:
    """Naive velocity Verlet (B_{h/2} A_h B_{h/2}, explicit sub-steps, a fresh ε̂ for each):
    m ← m + (h/2) f_m(z; ε̂(z, t_n)) at t_n;  x ← x + h f_x(z; ε̂(z, t_{n+½})) at t_{n+½};
    m ← m + (h/2) f_m(z; ε̂(z, t_{n+1})) at t_{n+1}. 3 NFE per step; order 1 (the sub-flows are not
    separable: f_m depends on m, so the explicit half-kicks are only first-order accurate)."""
    sched = grid.schedule
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        h, tm = t1 - t0, 0.5 * (t0 + t1)
        eps = ev(z, i)
        ev.visit(i, z, ev.denoise(z, eps, i))
        z = affine_step(euler_part(sched, t0, h / 2, row=1), z, eps)
        z = affine_step(euler_part(sched, tm, h, row=0), z, ev.at(z, tm))
        z = affine_step(euler_part(sched, t1, h / 2, row=1), z, ev.at(z, t1))
    return z


def rvv(ev: Evaluator, z: Tensor, grid: PSLDGrid) -> Tensor:
    """Reduced velocity Verlet: NVV with one ε̂ per step. The half-kick and the drift reuse the ε̂ carried
    from the previous step's end (evaluated at (x_n, m_{n−½}), t_n); the closing half-kick evaluates
    ε̂((x_{n+1}, m_{n+½}), t_{n+1}), which is carried on (first-same-as-last). ε̂ is reused, not s: the
    coefficients P_t are taken at each sub-step's own time. N + 1 NFE for N steps, order 1."""
    sched = grid.schedule
    eps = ev(z, 0)
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        h, tm = t1 - t0, 0.5 * (t0 + t1)
        ev.visit(i, z, ev.denoise(z, eps, i))
        z = affine_step(euler_part(sched, t0, h / 2, row=1), z, eps)
        z = affine_step(euler_part(sched, tm, h, row=0), z, eps)
        eps = ev(z, i + 1)
        z = affine_step(euler_part(sched, t1, h / 2, row=1), z, eps)
    return z


def csps_d(ev: Evaluator, z: Tensor, grid: PSLDGrid, *, lam: float = 0.0, variant: str = "se") -> Tensor:
    """Conjugate splitting sampler (deterministic): the conjugate integrator with B_t = F_t + λI (A_t = e^{λt}I:
    ε̂'s coefficient ∫e^{λu}P_u du integrated exactly, the drift by Euler) applied to the position and momentum
    rows in turn, as a symplectic splitting (``conjugate_split_part``).

    ``variant="se"`` (conjugate symplectic Euler): ε̂_n = ε̂(z_n, t_n); m_{n+1} from (x_n, m_n), then
    x_{n+1} from (x_n, m_{n+1}), both with ε̂_n. 1 NFE per step, order 1.
    ``variant="vv"`` (conjugate velocity Verlet, first-same-as-last as ``rvv``): m over the first half step,
    x over the whole step, then ε̂ at (x_{n+1}, m_{n+½}), t_{n+1} for the second m half step, carried to the
    next step. N + 1 NFE, order 1."""
    if variant not in ("se", "vv"):
        raise ValueError(f"csps-d variant must be 'se' or 'vv', got {variant!r}")
    sched = grid.schedule
    eps = ev(z, 0) if variant == "vv" else None
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        if variant == "se":
            eps = ev(z, i)
            ev.visit(i, z, ev.denoise(z, eps, i))
            z = affine_step(conjugate_split_part(sched, t0, t1, 1, lam), z, eps)
            z = affine_step(conjugate_split_part(sched, t0, t1, 0, lam), z, eps)
        else:
            tm = 0.5 * (t0 + t1)
            ev.visit(i, z, ev.denoise(z, eps, i))
            z = affine_step(conjugate_split_part(sched, t0, tm, 1, lam), z, eps)
            z = affine_step(conjugate_split_part(sched, t0, t1, 0, lam), z, eps)
            eps = ev(z, i + 1)
            z = affine_step(conjugate_split_part(sched, tm, t1, 1, lam), z, eps)
    return z


__all__ = [
    "PSLDGrid",
    "PSLDEvaluator",
    "euler",
    "lambda_ddim",
    "lambda_ddim_block",
    "nse",
    "rse",
    "nvv",
    "rvv",
    "csps_d",
    "quadrature",
    "euler_part",
    "conjugate_part",
    "conjugate_split_part",
    "block_transition",
]
