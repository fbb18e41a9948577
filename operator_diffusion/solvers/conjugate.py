"""Conjugate integrators (Pandey, Rudolph & Mandt, "Efficient Integrators for Diffusion Generative
Models", ICLR 2024): λ-DDIM, the conjugate integrator with B_t = λI.

Conjugate variable x̂_t = A_t x_t with A_t = e^{λt}/α_t, which turns the PF-ODE dx/dt = (α̇/α) x + α ρ̇ ε
into dx̂/dt = λ x̂ + e^{λt} ρ̇ ε. One Euler step of that:
  x̂_{n+1} = x̂_n (1 + λ (t_{n+1} − t_n)) + (Φ_{n+1} − Φ_n) ε̂_n,   Φ_{n+1} − Φ_n = ∫ e^{λu} dρ(u).
With λ = 0, Φ = ρ and x̂ = x/α: exactly DDIM (the paper's proposition). Global order 1.
Φ is integrated by Gauss–Legendre in log-SNR (exact to round-off; the authors' code uses RK45).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Evaluator, Grid, integrate_drho


def lambda_ddim(ev: Evaluator, x: Tensor, grid: Grid, *, lam: float = 0.0) -> Tensor:
    d_phis = integrate_drho(grid.schedule, lambda u: torch.exp(lam * u), grid.lam[:-1], grid.lam[1:]).tolist()
    for i, d_phi in enumerate(d_phis):
        t_s, a_s, _, _, _ = grid[i]
        t_t, a_t, _, _, _ = grid[i + 1]
        eps = ev(x, i)
        ev.visit(i, x, ev.denoise(x, eps, i))
        # x_{n+1} = x̂_{n+1} / A_{t_{n+1}} with A_t = e^{λt}/α_t
        x = (a_t / a_s) * math.exp(lam * (t_s - t_t)) * (1.0 + lam * (t_t - t_s)) * x + a_t * math.exp(
            -lam * t_t
        ) * d_phi * eps
    return x
