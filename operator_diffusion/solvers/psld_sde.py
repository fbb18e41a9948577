"""Stochastic samplers for Phase Space Langevin Diffusion: Euler–Maruyama, SSCS (the PSLD code's symmetric
splitting, from CLD), the OBA splittings NOBA / ROBA and the conjugate splitting CSPS-S.

The reverse SDE, in forward time (dt < 0) with the family of diffusions that keep the marginals exact,

    dz = [F_t z − ½(G_tG_tᵀ + D_t) s] dt + D_t^{1/2} dw̄,    D_t = β diag(λ_s Γ, Mν),  s = −L_t⁻ᵀ ε̂,

is λ_s = 1 for the usual reverse SDE (D = GGᵀ); λ_s scales the position-space noise (λ_s = 0: none).
With Σ∞ = diag(1, M) the drift splits, in reverse time τ, into an Ornstein–Uhlenbeck part with stationary
law N(0, Σ∞), solved exactly ("O"),

    dz = (β/2)[[−λ_sΓ, −M⁻¹], [1, −ν]] z dτ + D^{1/2} dw,

and a deterministic score part dz/dτ = ½(GGᵀ + D)(s + Σ∞⁻¹z), whose m row is "B" (momentum) and x row
"A" (position). δ = t_n − t_{n+1} > 0 is the reverse-time step. Noise comes from ``noise_sampler(z)`` (a
standard normal tensor like z; default ``torch.randn`` with ``generator``), drawn on z's device and dtype.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..schedules import PSLD, apply2, inv_transpose2, mat2
from .base import Evaluator
from .psld import PSLDGrid, affine_step, coefficient_rows, quadrature

_I = torch.eye(2, dtype=torch.float64)
NoiseSampler = Callable[[Tensor], Tensor]


def _noise(generator: torch.Generator | None, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """The standard-normal draw used by a stochastic solver: ``noise_sampler`` if given, else torch.randn
    with ``generator`` (drawn on the generator's device, then moved to z's)."""
    if noise_sampler is not None:
        return noise_sampler
    if generator is None:
        return torch.randn_like

    def draw(z: Tensor) -> Tensor:
        return torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)

    return draw


def _safe_cholesky2(Q: Tensor) -> Tensor:
    """Lower Cholesky factor of a 2×2 PSD matrix, exact zeros allowed (no noise in a direction)."""
    l00 = torch.sqrt(Q[..., 0, 0].clamp_min(0))
    l10 = torch.where(l00 > 0, Q[..., 1, 0] / torch.where(l00 > 0, l00, torch.ones_like(l00)), torch.zeros_like(l00))
    l11 = torch.sqrt((Q[..., 1, 1] - l10**2).clamp_min(0))
    return mat2(l00, torch.zeros_like(l00), l10, l11)


def ou_part(sched: PSLD, t_from: float, t_to: float, lam_s: float = 1.0) -> tuple[Tensor, Tensor]:
    """Exact O step from t_from to t_to < t_from: z ← E z + L_Q ξ, ξ ~ N(0, I), returns (E, L_Q).

    E = exp((b/2)[[−λ_sΓ, −M⁻¹], [1, −ν]]) with b = B(t_from) − B(t_to), and Q = Σ∞ − EΣ∞Eᵀ (the OU
    part keeps N(0, Σ∞)). For λ_s = 1 this is S Φ̄(b) S with S = diag(1, −1) and Q = S Σ̄(b) S, the forward
    kernel's closed forms from a zero covariance (the PSLD code's SSCS ``_mean``/``_var``)."""
    b = float(sched.beta_integral(t_from) - sched.beta_integral(t_to))
    S = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    if lam_s == 1.0:
        E = S @ sched.transition_from_integral(b) @ S
        Q = S @ sched.covariance_from_integral(b, 0.0, 0.0) @ S
    else:
        O = mat2(-lam_s * sched.gamma, -sched.mass_inv, 1.0, -sched.nu)
        E = torch.linalg.matrix_exp(0.5 * b * O)
        stat = torch.diag(torch.tensor([1.0, sched.mass], dtype=torch.float64))
        Q = stat - E @ stat @ E.T
        Q = 0.5 * (Q + Q.T)
    return E, _safe_cholesky2(Q)


def _score_rates(sched: PSLD, lam_s: float) -> tuple[float, float]:
    """½(GGᵀ + D) = β diag(r_x, r_m) with r_x = ½(1 + λ_s)Γ, r_m = Mν; times Σ∞⁻¹: β diag(r_x, ν)."""
    return 0.5 * (1 + lam_s) * sched.gamma, sched.mass * sched.nu


def score_euler_part(
    sched: PSLD, t: float, delta: float, lam_s: float = 1.0, row: int | None = None
) -> tuple[Tensor, Tensor]:
    """Euler step of the score part at time t over reverse time δ: z ← z + δ·½(GGᵀ + D)(s + Σ∞⁻¹z), i.e.
    K = I + δ·β diag(r_x, ν), J = −δ·β diag(r_x, r_m) L_t⁻ᵀ (only row ``row`` if given)."""
    rx, rm = _score_rates(sched, lam_s)
    beta = float(sched.beta(t))
    Dh = mat2(rx * beta, 0.0, 0.0, rm * beta)
    K = _I + coefficient_rows(delta * Dh @ torch.diag(torch.tensor([1.0, sched.mass_inv], dtype=torch.float64)), row)
    J = coefficient_rows(-delta * Dh @ inv_transpose2(sched.cholesky(t)), row)
    return K, J


def score_conjugate_part(
    sched: PSLD, t_from: float, t_to: float, lam_s: float = 1.0, lam: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The score part from t_from to t_to as a conjugate integrator with A_t = e^{λt}I (B_t = its linear part
    + λI): in forward time dz/dt = −β diag(r_x, ν) z + β diag(r_x, r_m) L_t⁻ᵀ ε̂; Euler on the linear part (at
    t_from), ε̂ frozen and its coefficient integrated exactly over the step:

        z ← e^{−λh}(I + h(−β_{t_from} diag(r_x, ν) + λI)) z + ∫ e^{−λ(t_to−u)} β_u diag(r_x, r_m) L_u⁻ᵀ du · ε̂.

    (Integrating the linear part exactly instead is much worse: near t = T the score cancels it.)"""
    rx, rm = _score_rates(sched, lam_s)
    h = t_to - t_from
    lin = -float(sched.beta(t_from)) * torch.diag(torch.tensor([rx, sched.nu], dtype=torch.float64))
    K = math.exp(-lam * h) * (_I + h * (lin + lam * _I))
    u, w = quadrature(t_from, t_to)
    coef = (w * sched.beta(u) * torch.exp(-lam * (t_to - u)))[:, None] * torch.tensor(
        [rx, rm], dtype=torch.float64
    )  # (Q, 2)
    J = (coef[:, :, None] * inv_transpose2(sched.cholesky(u))).sum(0)
    return K, J


def _ou(z: Tensor, EL: tuple[Tensor, Tensor], draw: NoiseSampler) -> Tensor:
    E, L = EL
    return apply2(E, z) + apply2(L, draw(z))


# ----------------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------------
def em(
    ev: Evaluator,
    z: Tensor,
    grid: PSLDGrid,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE: z_{n+1} = z_n + h(F_n z_n − G_nG_nᵀ s_n) + √δ G_n ξ_n
    (= z_n + h(F_n z_n + 2P_n ε̂_n) + …). 1 NFE per step, weak order 1."""
    sched, draw = grid.schedule, _noise(generator, noise_sampler)
    for i in range(grid.steps):
        t, h = grid[i], grid[i + 1] - grid[i]
        eps = ev(z, i)
        ev.visit(i, z, ev.denoise(z, eps, i))
        beta = float(sched.beta(t))
        G = mat2(math.sqrt(sched.gamma * beta), 0.0, 0.0, math.sqrt(sched.mass * sched.nu * beta))
        z = (
            z
            + h * (apply2(sched.drift(t), z) + 2 * apply2(sched.eps_coefficient(t), eps))
            + math.sqrt(-h) * apply2(G, draw(z))
        )
    return z


def sscs(
    ev: Evaluator,
    z: Tensor,
    grid: PSLDGrid,
    *,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Symmetric splitting CLD sampler (Dockhorn et al. 2022; the PSLD code's ``sscs_sde``): exact O half-step
    t_n → t_{n+½}, Euler score step z ← z + δ GGᵀ(s + Σ∞⁻¹z) with s = s(z, t_n) at the half-step state and
    β(t_n) (as the code), exact O half-step t_{n+½} → t_{n+1}. 1 NFE per step, weak order 1. The recorded
    x̂₀ at t_n is the one of the evaluated (half-stepped) state."""
    sched, draw = grid.schedule, _noise(generator, noise_sampler)
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        tm = 0.5 * (t0 + t1)
        z_i = z
        z = _ou(z, ou_part(sched, t0, tm), draw)
        eps = ev(z, i)
        ev.visit(i, z_i, ev.denoise(z, eps, i))
        z = affine_step(score_euler_part(sched, t0, t0 - t1), z, eps)
        z = _ou(z, ou_part(sched, tm, t1), draw)
    return z


def noba(
    ev: Evaluator,
    z: Tensor,
    grid: PSLDGrid,
    *,
    lam_s: float = 1.0,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Naive OBA: exact O over the whole step (position noise scaled by λ_s), then B: m ← m + δ Mνβ_n(s_m + M⁻¹m)
    with s = s(z, t_n) at the O-stepped state, then A: x ← x + δ ½(1+λ_s)Γβ_n(s_x + x) with a fresh s at the
    B-updated state (time t_n). 2 NFE per step, weak order 1."""
    return _oba(ev, z, grid, lam_s, _noise(generator, noise_sampler), reuse=False)


def roba(
    ev: Evaluator,
    z: Tensor,
    grid: PSLDGrid,
    *,
    lam_s: float = 1.0,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Reduced OBA: NOBA with the one score of the step reused for A. 1 NFE per step, weak order 1."""
    return _oba(ev, z, grid, lam_s, _noise(generator, noise_sampler), reuse=True)


def _oba(ev: Evaluator, z: Tensor, grid: PSLDGrid, lam_s: float, draw: NoiseSampler, reuse: bool) -> Tensor:
    if lam_s < 0:
        raise ValueError(f"lam_s scales the position-space noise and must be >= 0, got {lam_s}")
    sched = grid.schedule
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        z_i = z
        z = _ou(z, ou_part(sched, t0, t1, lam_s), draw)
        eps = ev(z, i)
        ev.visit(i, z_i, ev.denoise(z, eps, i))
        z = affine_step(score_euler_part(sched, t0, t0 - t1, lam_s, row=1), z, eps)
        if not reuse:
            eps = ev.at(z, t0)
        z = affine_step(score_euler_part(sched, t0, t0 - t1, lam_s, row=0), z, eps)
    return z


def csps_s(
    ev: Evaluator,
    z: Tensor,
    grid: PSLDGrid,
    *,
    lam: float = 0.0,
    lam_s: float = 1.0,
    generator: torch.Generator | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Conjugate splitting sampler (stochastic): exact O half-step t_n → t_{n+½} (position noise scaled by λ_s),
    the B and A score updates as one conjugate step (``score_conjugate_part``, ε̂ = ε̂(z, t_n) at the half-stepped
    state, its coefficient integrated over [t_n, t_{n+1}]; the score part's linear part is diagonal, so B and
    A with one ε̂ are this single update), exact O half-step t_{n+½} → t_{n+1}. With λ = 0, λ_s = 1 it is SSCS
    with the score step's coefficient integrated instead of frozen at t_n. 1 NFE per step, weak order 1."""
    if lam_s < 0:
        raise ValueError(f"lam_s scales the position-space noise and must be >= 0, got {lam_s}")
    sched, draw = grid.schedule, _noise(generator, noise_sampler)
    for i in range(grid.steps):
        t0, t1 = grid[i], grid[i + 1]
        tm = 0.5 * (t0 + t1)
        z_i = z
        z = _ou(z, ou_part(sched, t0, tm, lam_s), draw)
        eps = ev(z, i)
        ev.visit(i, z_i, ev.denoise(z, eps, i))
        z = affine_step(score_conjugate_part(sched, t0, t1, lam_s, lam), z, eps)
        z = _ou(z, ou_part(sched, tm, t1, lam_s), draw)
    return z


__all__ = ["em", "sscs", "noba", "roba", "csps_s", "ou_part", "score_euler_part", "score_conjugate_part"]
