"""UniPC (Zhao et al., NeurIPS 2023): unified predictor–corrector, data prediction, B(h) variants.

With hh = −h, hφ_1 = e^{hh} − 1, r_k = (λ_{i−k} − λ_i)/h, D1_k = (m_{i−k} − m_i)/r_k and
R[k, m] = r_m^{k−1}, b_k = k!·hφ_{k+1}/B(h) (B = hh for bh1, e^{hh} − 1 for bh2):
  predictor UniP-p:  x̂_t = (σ_t/σ_s) x_s − α_t hφ_1 m_i − α_t B Σ_k ρ^p_k D1_k,  ρ^p = R[:−1,:−1]⁻¹ b[:−1]
  corrector UniC-p:  x_t = (σ_t/σ_s) x_s − α_t hφ_1 m_i − α_t B (Σ_k ρ^c_k D1_k + ρ^c_p (m_t − m_i)),  ρ^c = R⁻¹ b
where m_t = D(x̂_t, t) is then reused as the next step's history, so the corrector costs no extra NFE.
No corrector on the final step. Global order p + 1 (p with ``corrector=False``). The default order is 2
(diffusers' default too): on the shipped digits teacher at 3–10 NFE order 2 beat order 3, with or without
lower-order final steps (docs/benchmarks.md, "solver-grids").
The recorded denoised prediction at t_i is m_i = D(x̂_i, t_i), the one the method uses.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .base import Evaluator, Grid, multistep_order


def unipc_coefficients(hh: float, rks: list[float], order: int, variant: str) -> tuple[float, list[float], list[float]]:
    """(B(h), ρ^p, ρ^c) for one step; ``rks`` are r_1 … r_{order−1}. Tiny systems: numpy float64."""
    b_h = hh if variant == "bh1" else math.expm1(hh)
    r = np.array(rks + [1.0])
    h_phi_k = math.expm1(hh) / hh - 1.0  # hφ_2
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b_vec = np.stack(rows), np.array(b)
    if order == 1:
        return b_h, [], [0.5]
    rho_p = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b_vec[:-1]).tolist()
    return b_h, rho_p, np.linalg.solve(R, b_vec).tolist()


def unipc(
    ev: Evaluator,
    x: Tensor,
    grid: Grid,
    *,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
    corrector: bool = True,
    lower_order_final: bool | None = None,
) -> Tensor:
    if order not in (1, 2, 3, 4):
        raise ValueError(f"unipc order must be 1, 2, 3 or 4, got {order!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    m = ev.denoise(x, ev(x, 0), 0)
    ev.visit(0, x, m)
    ms: list[Tensor] = [m]  # m_i, m_{i−1}, … (most recent first)
    for i in range(grid.steps):
        _, _, sig_s, lam_s, _ = grid[i]
        t_t, a_t, sig_t, lam_t, _ = grid[i + 1]
        p = multistep_order(order, i, grid.steps, lower_order_final)
        h = lam_t - lam_s
        hh = -h
        rks = [(float(grid.lam[i - k]) - lam_s) / h for k in range(1, p)]
        d1s = [(ms[k] - ms[0]) / rk for k, rk in enumerate(rks, start=1)]
        b_h, rho_p, rho_c = unipc_coefficients(hh, rks, p, variant)
        x_base = (sig_t / sig_s) * x - a_t * math.expm1(hh) * ms[0]
        x_pred = x_base - a_t * b_h * sum((c * d for c, d in zip(rho_p, d1s)), torch.zeros_like(x))
        last = i == grid.steps - 1
        if last:
            x = x_pred
            break
        m_t = ev.denoise(x_pred, ev(x_pred, i + 1), i + 1)
        if corrector:
            corr = sum((c * d for c, d in zip(rho_c[:-1], d1s)), torch.zeros_like(x))
            x = x_base - a_t * b_h * (corr + rho_c[-1] * (m_t - ms[0]))
        else:
            x = x_pred
        ev.visit(i + 1, x, m_t)
        ms = [m_t] + ms[: order - 1]
    return x
