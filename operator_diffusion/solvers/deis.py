"""DEIS (Zhang & Chen, ICLR 2023): exponential-integrator Adams–Bashforth multistep methods, and iPNDM.

tAB-DEIS of order r: x_t = (α_t/α_s) x_s + Σ_{j=0..r} C_j ε̂_{i−j}, with
C_j = α_t ∫_{t_i}^{t_{i+1}} ℓ_j(τ) dρ(τ)  (ℓ_j: Lagrange basis in t on t_i … t_{i−r}; DEIS eq. 14 in ρ form).
The official code takes the integral with a 10 000-point Riemann sum; here it is Gauss–Legendre in λ,
exact to round-off. ``variant="rho"`` is ρAB-DEIS (Lagrange basis in ρ instead of t).
Global order r + 1; order 0 is DDIM.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .base import Evaluator, Grid, integrate_drho, lagrange_basis, multistep_order


def deis_coefficients(grid: Grid, steps: Tensor, r: int, variant: str = "tab") -> Tensor:
    """(S, r+1) coefficients C_0 … C_r for the steps t_i → t_{i+1}, i in ``steps`` (each i ≥ r),
    using ε̂ at t_i, t_{i−1}, …, t_{i−r} (float64)."""
    knots = grid.t if variant == "tab" else grid.rho
    nodes = torch.stack([knots[steps - j] for j in range(r + 1)], 1)  # (S, r+1): t_i, t_{i−1}, …
    u = (lambda tau: tau) if variant == "tab" else grid.schedule.rho
    integral = integrate_drho(
        grid.schedule, lambda tau: lagrange_basis(nodes, u(tau)), grid.lam[steps], grid.lam[steps + 1]
    )
    return grid.alpha[steps + 1, None] * integral


def _deis_table(grid: Grid, order: int, variant: str, lower_order_final: bool | None) -> list[list[float]]:
    """Every step's coefficients, computed up front in one vectorised pass per order."""
    rs = torch.tensor([multistep_order(order + 1, i, grid.steps, lower_order_final) - 1 for i in range(grid.steps)])
    table: list[list[float]] = [[] for _ in range(grid.steps)]
    for r in rs.unique().tolist():
        steps = (rs == r).nonzero().flatten()
        for i, c in zip(steps.tolist(), deis_coefficients(grid, steps, r, variant).tolist()):
            table[i] = c
    return table


def deis(
    ev: Evaluator,
    x: Tensor,
    grid: Grid,
    *,
    order: int = 3,
    variant: Literal["tab", "rho"] = "tab",
    lower_order_final: bool | None = None,
) -> Tensor:
    if order not in (0, 1, 2, 3):
        raise ValueError(f"deis order must be 0, 1, 2 or 3 (number of past ε̂ used), got {order!r}")
    if variant not in ("tab", "rho"):
        raise ValueError(f"deis variant must be 'tab' or 'rho', got {variant!r}")
    table = _deis_table(grid, order, variant, lower_order_final)
    history: list[Tensor] = []  # ε̂_i, ε̂_{i−1}, … (most recent first)
    for i in range(grid.steps):
        eps = ev(x, i)
        ev.visit(i, x, ev.denoise(x, eps, i))
        history = [eps] + history[:order]
        x = float(grid.alpha[i + 1] / grid.alpha[i]) * x + sum(c * e for c, e in zip(table[i], history))
    return x


# Fixed Adams–Bashforth weights of iPNDM (Zhang & Chen 2023, after PNDM), by number of ε̂ used.
IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm(ev: Evaluator, x: Tensor, grid: Grid, *, order: int = 4, lower_order_final: bool | None = None) -> Tensor:
    """iPNDM: x_t = (α_t/α_s) x_s + α_t(ρ_t − ρ_s) ε̄ with ε̄ the fixed-weight AB combination.
    Equals ρAB-DEIS on a grid uniform in ρ; globally order 2 on non-uniform grids."""
    if order not in IPNDM_WEIGHTS:
        raise ValueError(f"ipndm order must be 1, 2, 3 or 4, got {order!r}")
    history: list[Tensor] = []
    for i in range(grid.steps):
        _, a_s, _, _, r_s = grid[i]
        _, a_t, _, _, r_t = grid[i + 1]
        eps = ev(x, i)
        ev.visit(i, x, ev.denoise(x, eps, i))
        history = [eps] + history[: order - 1]
        p = multistep_order(order, i, grid.steps, lower_order_final)
        eps_bar = sum(w * e for w, e in zip(IPNDM_WEIGHTS[p], history))
        x = (a_t / a_s) * x + a_t * (r_t - r_s) * eps_bar
    return x


__all__ = ["deis", "deis_coefficients", "ipndm", "IPNDM_WEIGHTS"]
