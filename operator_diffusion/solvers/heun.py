"""EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1, S_churn = 0).

Works on x̃ = x/α in ρ (EDM's σ), where dx̃/dρ = ε: an Euler predictor x̃' = x̃_i + Δρ ε̂_i, then the
trapezoidal corrector x̃_{i+1} = x̃_i + Δρ (ε̂_i + ε̂(x', t_{i+1}))/2. Two NFE per step; global order 2.
(EDM's final Euler step to σ = 0 is ``denoise_to_zero``: x̃ − ρ ε̂ is exactly the denoiser.)
"""

from __future__ import annotations

from torch import Tensor

from .base import Evaluator, Grid


def heun(ev: Evaluator, x: Tensor, grid: Grid, *, final_euler: bool = False) -> Tensor:
    """EDM Heun (Karras et al. 2022, Algorithm 1); ``final_euler`` makes the last step a plain Euler step (one
    NFE), as EDM's sampler does on its last step, so that N steps cost 2N − 1 evaluations."""
    for i in range(grid.steps):
        _, a_s, _, _, r_s = grid[i]
        t_t, a_t, _, _, r_t = grid[i + 1]
        eps = ev(x, i)
        ev.visit(i, x, ev.denoise(x, eps, i))
        x_pred = (a_t / a_s) * x + a_t * (r_t - r_s) * eps
        if final_euler and i == grid.steps - 1:
            return x_pred
        eps_pred = ev.at(x_pred, t_t)
        x = (a_t / a_s) * x + a_t * (r_t - r_s) * 0.5 * (eps + eps_pred)
    return x
