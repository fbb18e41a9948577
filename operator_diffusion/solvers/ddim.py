"""DDIM (Song et al. 2021), deterministic η = 0: the exponential-integrator Euler step.

x_t = (α_t/α_s) x_s + α_t (ρ_t − ρ_s) ε̂_s, i.e. x̃_t = x̃_s + (ρ_t − ρ_s) ε̂_s on x̃ = x/α (dx̃/dρ = ε).
It is also DPM-Solver-1, tAB-DEIS order 0 and λ-DDIM with λ = 0. Global order 1.
"""

from __future__ import annotations

from torch import Tensor

from .base import Evaluator, Grid


def ddim(ev: Evaluator, x: Tensor, grid: Grid) -> Tensor:
    for i in range(grid.steps):
        _, a_s, _, _, r_s = grid[i]
        _, a_t, _, _, r_t = grid[i + 1]
        eps = ev(x, i)
        ev.visit(i, x, ev.denoise(x, eps, i))
        x = (a_t / a_s) * x + a_t * (r_t - r_s) * eps
    return x
