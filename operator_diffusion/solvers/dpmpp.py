"""DPM-Solver++ multistep, data prediction (Lu et al. 2022, Algorithm 2 and the official 3M update).

With h = λ_t − λ_s, m_k the denoised predictions, r0 = (λ_s − λ_{s−1})/h, D1_0 = (m_0 − m_1)/r0:
  2M: x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) m_0 − ½ α_t (e^{−h} − 1) D1_0
  3M: with r1, D1_1 = (m_1 − m_2)/r1, D1 = D1_0 + r0/(r0+r1)(D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0+r1),
      φ2 = (e^{−h}−1)/h + 1, φ3 = φ2/h − ½:  x_t = (σ_t/σ_s) x_s − α_t(e^{−h}−1) m_0 + α_t φ2 D1 − α_t φ3 D2.

The published 3M update (dpm-solver, diffusers, k-diffusion) is reproduced faithfully, and it is only
second order: D2 ≈ h²D''/2 while the φ3 term needs h²D''. ``exact_third_order=True`` uses 2·D2, which
makes the method third order (both measured in tests/test_solver_orders.py).
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import Evaluator, Grid, multistep_order


def _dpmpp_multistep(
    ev: Evaluator, x: Tensor, grid: Grid, order: int, lower_order_final: bool | None, d2_factor: float = 1.0
) -> Tensor:
    ms: list[Tensor] = []  # denoised predictions m_i, m_{i−1}, … (most recent first)
    for i in range(grid.steps):
        _, _, sig_s, lam_s, _ = grid[i]
        _, a_t, sig_t, lam_t, _ = grid[i + 1]
        m0 = ev.denoise(x, ev(x, i), i)
        ev.visit(i, x, m0)
        ms = [m0] + ms[: order - 1]
        p = multistep_order(order, i, grid.steps, lower_order_final)
        h = lam_t - lam_s
        phi1 = math.expm1(-h)
        x = (sig_t / sig_s) * x - a_t * phi1 * m0
        if p >= 2:
            r0 = (lam_s - float(grid.lam[i - 1])) / h
            d1_0 = (m0 - ms[1]) / r0
            if p == 2:
                x = x - 0.5 * a_t * phi1 * d1_0
            else:
                r1 = (float(grid.lam[i - 1]) - float(grid.lam[i - 2])) / h
                d1_1 = (ms[1] - ms[2]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d2_factor / (r0 + r1)) * (d1_0 - d1_1)
                phi2 = phi1 / h + 1.0
                phi3 = phi2 / h - 0.5
                x = x + a_t * phi2 * d1 - a_t * phi3 * d2
    return x


def dpmpp_2m(ev: Evaluator, x: Tensor, grid: Grid, *, lower_order_final: bool | None = None) -> Tensor:
    """DPM-Solver++(2M): global order 2."""
    return _dpmpp_multistep(ev, x, grid, 2, lower_order_final)


def dpmpp_3m(
    ev: Evaluator, x: Tensor, grid: Grid, *, lower_order_final: bool | None = None, exact_third_order: bool = False
) -> Tensor:
    """DPM-Solver++(3M) as published (global order 2), or with the corrected D2 term (order 3)."""
    return _dpmpp_multistep(ev, x, grid, 3, lower_order_final, d2_factor=2.0 if exact_third_order else 1.0)
