"""Tests for Phase Space Langevin Diffusion: the schedule's closed forms, its exact oracles and the PSLD
integrators of ``solve``.

References written here, independently of the library: a float64 DOP853 solve of the moment equations
dΣ/dt = FΣ + ΣFᵀ + GGᵀ, dΦ/dt = FΦ from the SDE's F and GGᵀ; Gaussian log-densities whose autograd
gradients give the exact score; a direct DOP853 solve of the PF-ODE on z with that score; DOP853 solves of
the frozen-ε linear ODE and of the OU moment equations. Under the exact ε* every integrator is affine in
(z, noise), so its composed map is read off exactly from unit inputs and compared with the exact flow
(deterministic) or with the exact marginal (stochastic: mean and covariance propagated exactly) — no Monte
Carlo anywhere. Everything is float64 with one or three coordinates.
"""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from operator_diffusion.oracles import PSLDGaussianMixtureOracle, PSLDGaussianOracle
from operator_diffusion.schedules import PSLD, VPLinear, apply2, join, schedule_from_config, split, time_grid
from operator_diffusion.solvers import available_solvers, solve, solver_info
from operator_diffusion.solvers.psld import block_transition, conjugate_part
from operator_diffusion.solvers.psld_sde import ou_part

F64 = torch.float64
Tensor = torch.Tensor
CIFAR = PSLD()
LINEAR = PSLD(beta_min=0.1, beta_max=20.0, gamma=0.02, nu=4.02)
CLD = PSLD(gamma=0.0, nu=4.0)
WIDE = PSLD(gamma=1.0, nu=3.0)


def _np(A):
    return A.detach().numpy()


# ----------------------------------------------------------------------------------------------------
# Schedule: closed forms against the moment ODEs
# ----------------------------------------------------------------------------------------------------
def _moment_solve(s: PSLD, xx0: float, mm0: float, t_from: float, ts):
    """Σ(t) and Φ(t, t_from) from dΣ/dt = FΣ + ΣFᵀ + GGᵀ, dΦ/dt = FΦ (DOP853, rtol = atol = 1e-13)."""

    def rhs(t, y):
        F, Q = _np(s.drift(t)), _np(s.diffusion(t))
        S, P = y[:4].reshape(2, 2), y[4:].reshape(2, 2)
        return np.concatenate([(F @ S + S @ F.T + Q).ravel(), (F @ P).ravel()])

    y0 = np.concatenate([np.diag([xx0, mm0]).ravel(), np.eye(2).ravel()])
    sol = solve_ivp(rhs, (t_from, max(ts)), y0, method="DOP853", t_eval=ts, rtol=1e-13, atol=1e-13)
    assert sol.success
    return torch.from_numpy(sol.y[:4].T.reshape(-1, 2, 2).copy()), torch.from_numpy(
        sol.y[4:].T.reshape(-1, 2, 2).copy()
    )


@pytest.mark.parametrize("sched", [CIFAR, LINEAR, CLD, WIDE], ids=["cifar", "linear-beta", "cld", "gamma1"])
@pytest.mark.parametrize("xx0", [0.0, 0.3, 0.7])
def test_kernel_matches_moment_odes(sched, xx0):
    mm0 = sched.kappa * sched.mass
    ts = [1e-3, 0.05, 0.3, 0.7, 1.0]
    S, P = _moment_solve(sched, xx0, mm0, 0.0, ts)
    t = torch.tensor(ts, dtype=F64)
    torch.testing.assert_close(sched.covariance(t, xx0=xx0), S, rtol=0, atol=1e-10 * float(S.abs().max()))
    torch.testing.assert_close(sched.transition(t), P, rtol=0, atol=1e-10 * float(P.abs().max()))
    # Φ(t, s) for s > 0, and the composition Φ(t, s) = Φ(t, 0)Φ(s, 0)⁻¹
    _, P_s = _moment_solve(sched, xx0, mm0, 0.3, [0.3, 0.7, 1.0])
    t_s = torch.tensor([0.3, 0.7, 1.0], dtype=F64)
    torch.testing.assert_close(sched.transition(t_s, 0.3), P_s, rtol=0, atol=1e-10 * float(P_s.abs().max()))
    torch.testing.assert_close(
        sched.transition(t_s, 0.3),
        sched.transition(t_s) @ torch.linalg.inv(sched.transition(0.3)),
        rtol=1e-12,
        atol=1e-13,
    )


def test_stationary_law():
    """Σ_t = Σ∞ + Φ_t(Σ₀ − Σ∞)Φ_tᵀ with Σ∞ = diag(1, M): at β = 8, Σ_1 is Σ∞ within ‖Φ_1‖²_F·max|Σ₀ − Σ∞|."""
    s = CIFAR
    stat = torch.diag(torch.tensor([1.0, s.mass], dtype=F64))
    S0 = torch.diag(torch.tensor([0.0, s.kappa * s.mass], dtype=F64))
    for t in (0.1, 0.5, 1.0):
        phi = s.transition(t)
        torch.testing.assert_close(s.covariance(t), stat + phi @ (S0 - stat) @ phi.T, rtol=0, atol=1e-13)
    bound = float((s.transition(1.0) ** 2).sum()) * float((S0 - stat).abs().max())
    assert bound < 1e-4
    assert float((s.covariance(1.0) - stat).abs().max()) <= bound
    # the stationary law is a fixed point of the moment equations
    F, Q = s.drift(0.5), s.diffusion(0.5)
    torch.testing.assert_close(F @ stat + stat @ F.T + Q, torch.zeros(2, 2, dtype=F64), rtol=0, atol=1e-14)


def test_critical_damping_and_config():
    s = CIFAR
    assert s.mass_inv == pytest.approx(4.0) and s.mass == pytest.approx(0.25)
    assert (s.name, s.beta_min, s.beta_max, s.gamma, s.nu, s.kappa, s.t_min, s.t_max, s.numerical_eps) == (
        "psld",
        8.0,
        8.0,
        0.01,
        4.01,
        0.04,
        1e-3,
        1.0,
        1e-9,
    )
    assert schedule_from_config(LINEAR.config()) == LINEAR
    assert schedule_from_config(dict(CIFAR.config())) == CIFAR
    assert torch.allclose(s.beta_integral(torch.tensor(0.5, dtype=F64)), torch.tensor(4.0, dtype=F64))
    assert float(LINEAR.beta_integral(1.0)) == pytest.approx(0.1 + 0.5 * 19.9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gamma": 1.0, "nu": 1.0},
        {"beta_min": 0.0},
        {"kappa": 0.0},
        {"t_min": 0.0},
        {"gamma": -0.1},
        {"numerical_eps": -1.0},
    ],
)
def test_bad_schedule_parameters(kwargs):
    with pytest.raises(ValueError, match="PSLD"):
        PSLD(**kwargs)


def test_time_grids():
    for kind in ("uniform", "quadratic"):
        ts = time_grid(CIFAR, 8, kind)
        assert float(ts[0]) == 1.0 and float(ts[-1]) == 1e-3 and bool((ts[1:] < ts[:-1]).all())
    for kind in ("logsnr", "edm"):
        with pytest.raises(ValueError, match="uniform, quadratic"):
            time_grid(CIFAR, 8, kind)


# ----------------------------------------------------------------------------------------------------
# Noise model: Cholesky, ε ↔ score, perturb, denoise, prior
# ----------------------------------------------------------------------------------------------------
def test_cholesky_and_score_conversions():
    s = CIFAR
    t = torch.tensor([1e-3, 0.01, 0.2, 1.0], dtype=F64)
    L, S = s.cholesky(t), s.covariance(t)
    assert bool((L[:, 0, 1] == 0).all())
    torch.testing.assert_close(L @ L.transpose(-1, -2), S + 1e-9 * torch.eye(2, dtype=F64), rtol=1e-13, atol=1e-16)
    # s = −L⁻ᵀε with the PSLD code's closed-form L⁻ᵀ (psld.md §3), on the jittered covariance
    xx, xm, mm = S[:, 0, 0] + 1e-9, S[:, 0, 1], S[:, 1, 1] + 1e-9
    det = xx * mm - xm**2
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(4, 6, dtype=F64, generator=g)  # C = 3
    ex, em = split(eps)
    col = lambda v: v[:, None]  # noqa: E731
    ref = join(-(col(1 / xx.sqrt()) * ex - col(xm / (xx.sqrt() * det.sqrt())) * em), -col((xx / det).sqrt()) * em)
    score = s.eps_to_score(eps, t)
    torch.testing.assert_close(score, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.score_to_eps(score, t), eps, rtol=1e-12, atol=1e-12)


def test_perturb_has_the_kernel_moments():
    """perturb is affine in (x₀, ε): its mean part is Φ_t(x₀, 0) and its ε map L_t has L_tL_tᵀ = Σ_t (+ jitter)."""
    s = LINEAR
    t = torch.tensor([0.02, 0.5], dtype=F64)
    x0 = torch.tensor([[0.3], [-1.2]], dtype=F64)
    mean = s.perturb(x0, t, torch.zeros(2, 2, dtype=F64))
    torch.testing.assert_close(
        mean, join(s.transition(t)[:, 0, 0, None] * x0, s.transition(t)[:, 1, 0, None] * x0), rtol=1e-14, atol=0
    )
    cols = torch.stack(
        [s.perturb(torch.zeros_like(x0), t, torch.eye(2, dtype=F64)[k].expand(2, 2)) for k in range(2)], -1
    )  # (B, 2, 2)
    torch.testing.assert_close(
        cols @ cols.transpose(-1, -2),
        s.covariance(t) + s.numerical_eps * torch.eye(2, dtype=F64),
        rtol=1e-13,
        atol=1e-16,
    )
    with pytest.raises(ValueError, match="twice the channels"):
        s.perturb(x0, t, torch.zeros(2, 3, dtype=F64))


def test_denoise_is_the_posterior_mean():
    """x̂₀ = (x − L₀₀ε̂_x)/Φ₀₀ with the exact ε̂ = E[ε | z_t] equals E[x₀ | z_t] by Gaussian conditioning."""
    s = PSLD(numerical_eps=0.0)
    mu0, s0 = torch.tensor([0.4, -1.0], dtype=F64), torch.tensor([0.3, 1.5], dtype=F64)
    oracle = PSLDGaussianOracle(s, mu0, s0)
    g = torch.Generator().manual_seed(1)
    for t in (1e-3, 0.05, 0.6):
        z = oracle.sample(5, t=t, generator=g)
        phi, S = s.transition(t), s.covariance(t, xx0=s0**2)  # (2, 2), (C, 2, 2)
        x, m = split(z)
        d = torch.stack([x - phi[0, 0] * mu0, m - phi[1, 0] * mu0], -1)  # (B, C, 2)
        cross = s0[:, None] ** 2 * phi[:, 0]  # Cov(x₀, z_t) per coordinate (C, 2)
        ref = mu0 + (cross * torch.linalg.solve(S, d[..., None])[..., 0]).sum(-1)
        torch.testing.assert_close(oracle.denoise(z, t), ref, rtol=1e-10, atol=1e-12)


def test_prior():
    z = CIFAR.prior((20000, 1), generator=torch.Generator().manual_seed(0))
    assert z.shape == (20000, 2) and z.dtype == F64
    assert abs(float(z[:, 0].var()) - 1) < 0.05 and abs(float(z[:, 1].var()) - CIFAR.mass) < 0.05 * CIFAR.mass


def test_apply2_layouts():
    z = torch.arange(12, dtype=F64).reshape(2, 6)  # B = 2, C = 3
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    x, m = split(z)
    torch.testing.assert_close(apply2(A, z), join(x + 2 * m, 3 * x + 4 * m))
    per_item = torch.stack([A, 2 * A])
    torch.testing.assert_close(apply2(per_item, z)[1], 2 * apply2(A, z)[1])
    with pytest.raises(ValueError, match="even number of channels"):
        split(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------------------------------
def _gaussian_log_p(s: PSLD, z, t, mean, var):
    """Σ_c log N((x_c, m_c); Φ_t(μ_c, 0), Σ_t(var_c)) at one time t, per item."""
    phi, S = s.transition(t), s.covariance(t, xx0=var)
    x, m = split(z)
    mu = torch.stack([phi[0, 0] * mean, phi[1, 0] * mean], -1)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=S)
    return dist.log_prob(torch.stack([x, m], -1)).sum(-1)


def _score_by_autograd(log_p, z):
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_p(z).sum(), z)
    return g


@pytest.mark.parametrize("t", [1e-3, 0.03, 0.4, 1.0])
def test_oracle_eps_is_the_exact_score(t):
    s = LINEAR
    mean, std = torch.tensor([0.7, -0.4, 1.5], dtype=F64), torch.tensor([0.01, 0.5, 2.0], dtype=F64)
    gauss = PSLDGaussianOracle(s, mean, std)
    z = gauss.sample(6, t=t, generator=torch.Generator().manual_seed(2))
    score = _score_by_autograd(lambda y: _gaussian_log_p(s, y, t, mean, std**2), z)
    torch.testing.assert_close(gauss.score(z, t), score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gauss.eps(z, t), s.score_to_eps(score, t), rtol=1e-9, atol=1e-9)
    # the mixture: log Σ_k w_k p_k
    w, means, stds = (
        torch.tensor([0.2, 0.5, 0.3], dtype=F64),
        torch.tensor([[1.0, 0.0, -1.0], [-1.0, 0.5, 0.0], [0.3, -1.2, 0.8]], dtype=F64),
        torch.tensor([0.3, 0.1, 0.6], dtype=F64),
    )
    mix = PSLDGaussianMixtureOracle(s, w, means, stds)

    def log_p(y):
        comps = torch.stack([_gaussian_log_p(s, y, t, means[k], stds[k].expand(3) ** 2) for k in range(3)], 1)
        return torch.logsumexp(torch.log(w) + comps, 1)

    torch.testing.assert_close(mix.eps(z, t), s.score_to_eps(_score_by_autograd(log_p, z), t), rtol=1e-9, atol=1e-9)


def test_flow_matrix_invariant_and_direct_pf_ode():
    """ΨΣ_sΨᵀ = Σ_t (closed forms), and ``flow`` agrees with a direct DOP853 solve of dz/dt = Fz − ½GGᵀ∇log p_t
    (autograd score) — which also checks the rotation that the invariant cannot see."""
    s = CIFAR
    mean, std = torch.tensor([0.7, -0.4, 1.5], dtype=F64), torch.tensor([0.01, 0.5, 2.0], dtype=F64)
    oracle = PSLDGaussianOracle(s, mean, std)
    for t_to, t_from in [(1e-3, 1.0), (0.1, 0.6)]:
        psi = oracle.flow_matrix(t_to, t_from)
        _, S_from = oracle.moments(t_from)
        _, S_to = oracle.moments(t_to)
        torch.testing.assert_close(psi @ S_from @ psi.transpose(-1, -2), S_to, rtol=1e-10, atol=1e-12)
    z = s.prior((2, 3), generator=torch.Generator().manual_seed(3))

    def rhs(t, y):
        zz = torch.from_numpy(y).reshape(z.shape)
        sc = _score_by_autograd(lambda v: _gaussian_log_p(s, v, t, mean, std**2), zz)
        return (apply2(s.drift(t), zz) - 0.5 * apply2(s.diffusion(t), sc)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (1.0, 1e-3), z.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    direct = torch.from_numpy(sol.y[:, -1].copy()).reshape(z.shape)
    torch.testing.assert_close(oracle.flow(z, 1.0, 1e-3), direct, rtol=1e-8, atol=1e-8)
    # the whitened flow rotates: Ψ is not the covariance square-root map
    L_to, L_from = torch.linalg.cholesky(oracle.moments(1e-3)[1]), torch.linalg.cholesky(oracle.moments(1.0)[1])
    assert (
        float((torch.linalg.inv(L_to) @ oracle.flow_matrix(1e-3, 1.0) @ L_from - torch.eye(2, dtype=F64)).abs().max())
        > 0.5
    )


def test_mixture_flow_with_one_component_is_the_gaussian_flow():
    s = CIFAR
    mean, std = torch.tensor([[0.5, -1.0]], dtype=F64), torch.tensor([[0.05, 0.5]], dtype=F64)
    mix = PSLDGaussianMixtureOracle(s, torch.tensor([1.0]), mean, std)
    gauss = PSLDGaussianOracle(s, mean[0], std[0])
    z = s.prior((3, 2), generator=torch.Generator().manual_seed(4))
    ref = mix.flow(z, [1.0, 0.2, 1e-3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref[1], gauss.flow(z, 1.0, 0.2), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ref[2], gauss.flow(z, 1.0, 1e-3), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# Integrators: composed affine maps against the exact flow / marginal
# ----------------------------------------------------------------------------------------------------
MEAN3, STD3 = torch.tensor([0.7, -0.4, 1.5], dtype=F64), torch.tensor([0.01, 0.5, 2.0], dtype=F64)  # stiff to mild


def _per_coordinate(cols: Tensor, c: int, C: int) -> Tensor:
    """2×2 block of coordinate c from the responses cols[j] to the unit inputs e_j (j over 2C)."""
    return torch.stack([torch.stack([cols[c, c], cols[C + c, c]]), torch.stack([cols[c, C + c], cols[C + c, C + c]])])


def composed_map(oracle, sched, method, ts, **options):
    """(K (C, 2, 2), offset (1, 2C)) with solve(z) = apply2(K, z) + offset exactly, from the inputs 0, e_1, …, e_2C."""
    C = len(oracle.mean)
    z = torch.cat([torch.zeros(1, 2 * C, dtype=F64), torch.eye(2 * C, dtype=F64)])
    out = solve(oracle.eps, z, sched, ts, method, **options).sample
    cols = out[1:] - out[:1]
    return torch.stack([_per_coordinate(cols, c, C) for c in range(C)]), out[:1]


def ode_error(oracle, sched, method, n, **options):
    """Max error of the composed map and offset against Ψ(t_N, t_0) and μ_{t_N} − Ψμ_{t_0}."""
    ts = time_grid(sched, n, "quadratic")
    t0, t1 = float(ts[0]), float(ts[-1])
    psi = oracle.flow_matrix(t1, t0)
    K, off = composed_map(oracle, sched, method, ts, **options)
    off_ref = oracle.moments(t1)[0] - apply2(psi[None], oracle.moments(t0)[0])
    return max(float((K - psi).abs().max()), float((off - off_ref).abs().max()))


ODE_CASES = [
    # (schedule, method, options, order of the derivation in docs/psld.md)
    (CIFAR, "euler", {}, 1),
    (CIFAR, "lambda-ddim", {"lam": 0.0}, 1),
    (CIFAR, "lambda-ddim", {"lam": 1.0}, 1),
    (CIFAR, "lambda-ddim-block", {"lam": 0.5}, 1),
    (CIFAR, "nse", {}, 1),
    (CIFAR, "rse", {}, 1),
    (CIFAR, "nvv", {}, 1),  # explicit Verlet sub-steps of non-separable sub-flows: 1, not 2
    (CIFAR, "rvv", {}, 1),
    (CIFAR, "csps-d", {}, 1),
    (CIFAR, "csps-d", {"variant": "vv", "lam": 0.5}, 1),
    (LINEAR, "lambda-ddim", {"lam": 1.0}, 1),
    (LINEAR, "lambda-ddim-block", {"lam": 0.5}, 1),  # non-constant β: the numerical transition
    (LINEAR, "rse", {}, 1),
    (LINEAR, "csps-d", {"lam": -1.0}, 1),
]


@pytest.mark.parametrize(
    "sched,method,options,order",
    ODE_CASES,
    ids=[f"{'cifar' if s is CIFAR else 'linear'}-{m}-{o}" for s, m, o, _ in ODE_CASES],
)
def test_ode_integrator_order(sched, method, options, order):
    """Quadratic grids, N = 100, 200, 400 (asymptotic for every method here; psld.md §6 O3): the error falls
    monotonically and the last halving gives the order within ±0.15."""
    oracle = PSLDGaussianOracle(sched, MEAN3, STD3)
    errs = [ode_error(oracle, sched, method, n, **options) for n in (100, 200, 400)]
    assert errs[0] > errs[1] > errs[2] > 1e-8, errs
    slope = math.log2(errs[1] / errs[2])
    assert abs(slope - order) < 0.15, (
        f"{method} {options}: measured order {slope:.2f}, expected {order} (errors {errs})"
    )


def test_splitting_beats_conjugate_on_the_stiff_oracle():
    """What the benchmark shows at scale, on the exact oracle: at 20 NFE the conjugate splitting (csps-d) is
    more accurate than λ-DDIM and Euler, and RSE is more accurate than λ-DDIM (quadratic grid, β = 8)."""
    oracle = PSLDGaussianOracle(CIFAR, MEAN3, STD3)
    err = {m: ode_error(oracle, CIFAR, m, 20) for m in ("euler", "lambda-ddim", "rse", "csps-d")}
    assert err["csps-d"] < err["lambda-ddim"] and err["csps-d"] < err["euler"] and err["rse"] < err["lambda-ddim"], err


def test_lambda_zero_is_exponential_euler():
    """B = 0 (λ = 0, either variant) is the exponential integrator: each step is the exact solution of the
    linear ODE dz/dt = F_t z + P_t ε̂_n with ε̂ frozen, solved here by DOP853."""
    s = CIFAR
    for t_from, t_to in [(1.0, 0.9), (0.1, 1e-3), (1.0, 1e-3)]:
        K, J = conjugate_part(s, t_from, t_to, 0.0)

        def rhs(t, y):
            Y = y.reshape(2, 4)
            F, P = _np(s.drift(t)), _np(s.eps_coefficient(t))
            return np.concatenate([F @ Y[:, :2], F @ Y[:, 2:] + P], 1).ravel()

        sol = solve_ivp(
            rhs,
            (t_from, t_to),
            np.concatenate([np.eye(2), np.zeros((2, 2))], 1).ravel(),
            method="DOP853",
            rtol=1e-13,
            atol=1e-13,
        )
        Y = torch.from_numpy(sol.y[:, -1].reshape(2, 4).copy())
        scale = float(Y.abs().max())
        torch.testing.assert_close(K, Y[:, :2], rtol=0, atol=1e-11 * scale)
        torch.testing.assert_close(J, Y[:, 2:], rtol=0, atol=1e-11 * scale)
    oracle = PSLDGaussianOracle(LINEAR, MEAN3, STD3)
    ts = time_grid(LINEAR, 12, "quadratic")
    a = composed_map(oracle, LINEAR, "lambda-ddim", ts, lam=0.0)
    b = composed_map(oracle, LINEAR, "lambda-ddim-block", ts, lam=0.0)
    torch.testing.assert_close(a[0], b[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(a[1], b[1], rtol=1e-9, atol=1e-9)


def test_block_transition_numerical_path():
    """For non-constant β the B = λ𝟙 transition is integrated numerically; on a β that is constant up to 1e-12
    it must agree with the matrix-exponential path."""
    const, almost = PSLD(), PSLD(beta_max=8.0 + 1e-12)
    us = torch.tensor([0.35, 0.3, 0.22, 0.2], dtype=F64)
    torch.testing.assert_close(
        block_transition(almost, 0.7, 0.2, us), block_transition(const, 0.7, 0.2, us), rtol=1e-9, atol=1e-10
    )


@pytest.mark.parametrize("lam_s", [1.0, 0.3, 0.0])
def test_ou_step_is_exact(lam_s):
    """The O step against a DOP853 solve of its mean and covariance equations in reverse time."""
    s = LINEAR
    t_from, t_to = 0.6, 0.45
    E, L = ou_part(s, t_from, t_to, lam_s)

    def rhs(u, y):  # forward time u decreasing; reverse-time drift A and diffusion D at time u
        beta = float(s.beta(u))
        A = 0.5 * beta * np.array([[-lam_s * s.gamma, -s.mass_inv], [1.0, -s.nu]])
        D = beta * np.diag([lam_s * s.gamma, s.mass * s.nu])
        M, C = y[:4].reshape(2, 2), y[4:].reshape(2, 2)
        return -np.concatenate([(A @ M).ravel(), (A @ C + C @ A.T + D).ravel()])

    sol = solve_ivp(
        rhs, (t_from, t_to), np.concatenate([np.eye(2).ravel(), np.zeros(4)]), method="DOP853", rtol=1e-13, atol=1e-14
    )
    M, C = (torch.from_numpy(sol.y[:4, -1].reshape(2, 2).copy()), torch.from_numpy(sol.y[4:, -1].reshape(2, 2).copy()))
    torch.testing.assert_close(E, M, rtol=0, atol=1e-11)
    torch.testing.assert_close(L @ L.T, C, rtol=0, atol=1e-11)


def sde_moments(oracle, sched, method, n, **options):
    """Exact (mean, covariance) of the sampler's output for z_T ~ p_{t_0} under ε*: one batched solve whose items
    are 0, e_1, e_2 with no noise and 0 with a single unit noise component at one draw each."""
    ts = time_grid(sched, n, "quadratic")
    draws = 2 * n + 2
    z = torch.zeros(3 + 2 * draws, 2, dtype=F64)
    z[1, 0] = z[2, 1] = 1
    count = [0]

    def noise(zz):
        out, j = torch.zeros_like(zz), count[0]
        count[0] += 1
        assert j < draws
        out[3 + 2 * j, 0] = out[4 + 2 * j, 1] = 1
        return out

    res = solve(oracle.eps, z, sched, ts, method, noise_sampler=noise, **options).sample
    c, K, V = res[0], (res[1:3] - res[0]).T, res[3:] - res[0]
    mu0, S0 = oracle.moments(float(ts[0]))
    return K @ mu0[0] + c, K @ S0[0] @ K.T + V.T @ V, oracle.moments(float(ts[-1]))


SDE_CASES = [
    ("em", {}),
    ("sscs", {}),
    ("noba", {}),
    ("roba", {}),
    ("roba", {"lam_s": 0.3}),
    ("csps-s", {}),
    ("csps-s", {"lam": 1.0, "lam_s": 0.0}),
]


@pytest.mark.parametrize("method,options", SDE_CASES, ids=[f"{m}-{o}" for m, o in SDE_CASES])
def test_sde_weak_order(method, options):
    """Mean and covariance of the output, propagated exactly, against the exact marginal at t_N: the weak error
    falls monotonically at order 1 (±0.15) over N = 50, 100, 200 (quadratic grids)."""
    oracle = PSLDGaussianOracle(CIFAR, torch.tensor([0.7], dtype=F64), torch.tensor([0.3], dtype=F64))
    errs = []
    for n in (50, 100, 200):
        mean, cov, (mu_ref, S_ref) = sde_moments(oracle, CIFAR, method, n, **options)
        errs.append(float((mean - mu_ref[0]).abs().max() + (cov - S_ref[0]).abs().max()))
    assert errs[0] > errs[1] > errs[2], errs
    slope = math.log2(errs[1] / errs[2])
    assert abs(slope - 1) < 0.15, f"{method} {options}: weak order {slope:.2f} (errors {errs})"


# ----------------------------------------------------------------------------------------------------
# solve(): bookkeeping, randomness and bad input
# ----------------------------------------------------------------------------------------------------
def test_nfe_record_callback_and_denoise_to_zero():
    s = CIFAR
    oracle = PSLDGaussianOracle(s, torch.tensor([0.5, -0.5], dtype=F64), torch.tensor([0.2, 0.4], dtype=F64))
    z = s.prior((3, 2), generator=torch.Generator().manual_seed(5))
    ts = time_grid(s, 6, "quadratic")
    expected = {
        "euler": 6,
        "lambda-ddim": 6,
        "lambda-ddim-block": 6,
        "nse": 12,
        "rse": 6,
        "nvv": 18,
        "rvv": 7,
        "csps-d": 6,
        "em": 6,
        "sscs": 6,
        "noba": 12,
        "roba": 6,
        "csps-s": 6,
    }
    assert set(expected) == set(available_solvers(s))
    for method, nfe in expected.items():
        seen = []
        out = solve(oracle.eps, z, s, ts, method, record=[0, 3], callback=lambda st: seen.append(st.i))
        assert out.nfe == nfe, method
        assert out.states.shape == (3, 2, 4) and out.denoised.shape == (3, 2, 2)
        assert seen == list(range(6)) and torch.equal(out.states[:, 0], z)
    out = solve(oracle.eps, z, s, ts, "csps-d", denoise_to_zero=True)
    last = solve(oracle.eps, z, s, ts, "csps-d").sample
    t_n = float(ts[-1])
    score = oracle.score(last, t_n)
    ref = last - t_n * (apply2(s.drift(t_n), last) - apply2(s.diffusion(t_n), score))
    assert out.nfe == 7
    torch.testing.assert_close(out.sample, ref, rtol=1e-9, atol=1e-9)


def test_stochastic_solvers_use_the_generator():
    s = CIFAR
    oracle = PSLDGaussianOracle(s, torch.tensor([0.5], dtype=F64), torch.tensor([0.2], dtype=F64))
    z = s.prior((4, 1), generator=torch.Generator().manual_seed(6))
    ts = time_grid(s, 5, "quadratic")
    for method in ("em", "sscs", "noba", "roba", "csps-s"):
        a = solve(oracle.eps, z, s, ts, method, generator=torch.Generator().manual_seed(7)).sample
        b = solve(oracle.eps, z, s, ts, method, generator=torch.Generator().manual_seed(7)).sample
        c = solve(oracle.eps, z, s, ts, method, generator=torch.Generator().manual_seed(8)).sample
        assert torch.equal(a, b) and not torch.equal(a, c)
    z32 = z.float()
    out = solve(
        lambda x, t: oracle.eps(x.double(), t.double()).float(),
        z32,
        s,
        ts,
        "sscs",
        generator=torch.Generator().manual_seed(7),
    )
    assert out.sample.dtype == torch.float32


def test_solver_registry_and_bad_input():
    s = CIFAR
    z = torch.zeros(2, 2, dtype=F64)
    ts = time_grid(s, 4, "uniform")
    eps = lambda x, t: torch.zeros_like(x)  # noqa: E731
    assert "ddim" in available_solvers() and "csps-d" not in available_solvers()
    assert available_solvers(s)[:3] == ["euler", "lambda-ddim", "lambda-ddim-block"]
    assert solver_info("csps-d", s).options == {"lam": 0.0, "variant": "se"}
    assert solver_info("roba", s).stochastic and not solver_info("rse", s).stochastic
    with pytest.raises(ValueError, match="unknown solver 'nope' for the psld schedule; valid: euler, lambda-ddim"):
        solve(eps, z, s, ts, "nope")
    with pytest.raises(
        ValueError, match=r"unknown solver 'ddim' for the psld schedule; valid: euler.* \('ddim' is for α/σ schedules"
    ):
        solve(eps, z, s, ts, "ddim")
    with pytest.raises(
        ValueError,
        match=r"unknown solver 'csps-d'; valid: ddim.* \('csps-d' is a PSLD solver: it needs a PSLD schedule\)",
    ):
        solve(eps, z, VPLinear(), time_grid(VPLinear(), 4), "csps-d")
    with pytest.raises(ValueError, match="even number of channels"):
        solve(eps, torch.zeros(2, 3, dtype=F64), s, ts, "euler")
    with pytest.raises(ValueError, match="solver 'euler' has no option lam"):
        solve(eps, z, s, ts, "euler", lam=0.5)
    with pytest.raises(ValueError, match="solver 'rse' has no option generator"):
        solve(eps, z, s, ts, "rse", generator=torch.Generator())
    with pytest.raises(ValueError, match="variant must be 'se' or 'vv'"):
        solve(eps, z, s, ts, "csps-d", variant="leapfrog")
    with pytest.raises(ValueError, match="lam_s .* must be >= 0"):
        solve(eps, z, s, ts, "roba", lam_s=-1.0)
    with pytest.raises(ValueError, match="outside the range of the psld schedule"):
        solve(eps, z, s, torch.tensor([1.0, 0.0], dtype=F64), "euler")
