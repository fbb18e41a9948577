"""Exact denoisers with known probability-flow ODEs: the ground truth of the tests and the exact teacher
of ``opdiff spectrum``. Each oracle has ``eps(x, t)`` (the exact ε* = −σ_t ∇log p_t), ``denoise``,
``sample`` and ``flow`` (the PF-ODE solution map), for any schedule.

- ``GaussianOracle``: data N(μ, diag s²); the flow is affine and closed-form:
  x_t = α_t μ + (c_t/c_s)(x_s − α_s μ), c_t = (α_t² s² + σ_t²)^{1/2}.
- ``GaussianMixtureOracle``: ε* in closed form from the responsibilities; the reference flow is a
  float64 DOP853 solve (rtol = atol = 1e-12 by default) of dx̃/dλ = −e^{−λ} ε*(α x̃, t(λ)).
- ``EmpiricalOracle``: the optimal denoiser of a finite data set (a mixture of point masses), the
  exact ε of the training set smoothed by the forward process.
- ``PSLDGaussianOracle`` / ``PSLDGaussianMixtureOracle``: the same for the phase-space process ``PSLD``
  (states (B, 2C, ...), HSM ε of 2C channels); the Gaussian flow is affine, z_t = μ_t + Ψ(t, s)(z_s − μ_s),
  with the 2×2 Ψ from a float64 DOP853 solve.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .schedules import PSLD, Schedule, apply2, join, split

__all__ = [
    "GaussianOracle",
    "GaussianMixtureOracle",
    "EmpiricalOracle",
    "PSLDGaussianOracle",
    "PSLDGaussianMixtureOracle",
]


def _col(c: Tensor, x: Tensor) -> Tensor:
    """Per-item (B,) or scalar coefficient as a column broadcasting against x (B, ...)."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


class GaussianOracle:
    """Data ~ N(mean, diag(std²)) with ``mean``/``std`` of the data shape (or broadcastable to it)."""

    def __init__(self, schedule: Schedule, mean: Tensor, std: Tensor):
        self.schedule = schedule
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.shape = torch.broadcast_shapes(self.mean.shape, self.std.shape)

    def _c(self, t: Tensor, x: Tensor) -> Tensor:
        """c_t = sqrt(α_t² s² + σ_t²), broadcast to x."""
        a, s = _col(self.schedule.alpha(t), x), _col(self.schedule.sigma(t), x)
        return torch.sqrt(a**2 * self.std.to(x) ** 2 + s**2)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """ε*(x, t) = σ_t (x − α_t μ) / (α_t² s² + σ_t²)."""
        a, s = _col(self.schedule.alpha(t), x), _col(self.schedule.sigma(t), x)
        return s * (x - a * self.mean.to(x)) / self._c(t, x) ** 2

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        a, s = _col(self.schedule.alpha(t), x), _col(self.schedule.sigma(t), x)
        return (x - s * self.eps(x, t)) / a

    def flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """Exact PF-ODE map from time ``t_from`` to ``t_to`` (either direction)."""
        t0 = torch.full((len(x),), float(t_from), dtype=torch.float64)
        t1 = torch.full((len(x),), float(t_to), dtype=torch.float64)
        mu = self.mean.to(x)
        return _col(self.schedule.alpha(t1), x) * mu + self._c(t1, x) / self._c(t0, x) * (
            x - _col(self.schedule.alpha(t0), x) * mu
        )

    def sample(self, n: int, t: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """n samples of p_t (of the data when ``t`` is None)."""
        z = torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)
        if t is None:
            return self.mean + self.std * z
        tt = torch.full((n,), float(t), dtype=torch.float64)
        return _col(self.schedule.alpha(tt), z) * self.mean + self._c(tt, z) * z


class GaussianMixtureOracle:
    """Mixture Σ_k w_k N(m_k, diag s_k²) in D = prod(data shape) dimensions.

    ``means``: (K, *shape); ``stds``: (K,) isotropic per component or (K, *shape); ``weights``: (K,).
    """

    def __init__(self, schedule: Schedule, weights: Tensor, means: Tensor, stds: Tensor):
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.shape = tuple(self.means.shape[1:])
        k = len(self.means)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = (stds.reshape(k, *([1] * len(self.shape))) if stds.dim() == 1 else stds).expand(k, *self.shape)
        if self.weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(self.weights.shape)}")

    def _responsibilities_and_eps(self, x: Tensor, t: Tensor) -> Tensor:
        b = len(x)
        xf = x.reshape(b, -1).to(torch.float64)
        a = self.schedule.alpha(t).to(torch.float64).reshape(b, 1, 1)
        s = self.schedule.sigma(t).to(torch.float64).reshape(b, 1, 1)
        m = self.means.reshape(1, len(self.means), -1)  # (1, K, D)
        v = a**2 * self.stds.reshape(1, len(self.means), -1) ** 2 + s**2  # (B, K, D)
        diff = xf[:, None, :] - a * m  # (B, K, D)
        logp = torch.log(self.weights) - 0.5 * (diff**2 / v + torch.log(v)).sum(-1)  # (B, K)
        r = torch.softmax(logp, dim=1)
        eps = s[:, :, 0] * (r[:, :, None] * diff / v).sum(1)  # (B, D)
        return eps.reshape(x.shape).to(x.dtype)

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """ε*(x, t) = σ_t Σ_k r_k(x, t) (x − α_t m_k)/(α_t² s_k² + σ_t²), r_k the posterior of component k."""
        return self._responsibilities_and_eps(x, torch.as_tensor(t, dtype=torch.float64).expand(len(x)))

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        return (x - _col(self.schedule.sigma(t), x) * self.eps(x, t)) / _col(self.schedule.alpha(t), x)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k] * z

    def flow(self, x: Tensor, ts, rtol: float = 1e-12, atol: float = 1e-12) -> Tensor:
        """Reference PF-ODE solution from ts[0] through every ts[i]: returns (len(ts), B, *shape), float64.

        Integrates x̃ = x/α in λ (dx̃/dλ = −e^{−λ} ε*(α x̃, t(λ))) with scipy's DOP853, which is smooth
        in λ on every schedule, at the given tolerances.
        """
        from scipy.integrate import solve_ivp

        ts = torch.as_tensor(ts, dtype=torch.float64)
        lams = self.schedule.log_snr(ts)
        b = len(x)
        x0 = x.to(torch.float64).reshape(-1) / float(self.schedule.alpha(ts[0]))

        def rhs(lam: float, y):
            lam_t = torch.tensor(lam, dtype=torch.float64)
            t = self.schedule.t_from_log_snr(lam_t).expand(b)
            a = float(self.schedule.alpha(t[0]))
            xs = torch.from_numpy(y).reshape(b, *self.shape) * a
            return (-math.exp(-lam) * self.eps(xs, t)).reshape(-1).numpy()

        sol = solve_ivp(
            rhs,
            (float(lams[0]), float(lams[-1])),
            x0.numpy(),
            method="DOP853",
            t_eval=lams.numpy(),
            rtol=rtol,
            atol=atol,
        )
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        xt = torch.from_numpy(sol.y.T.copy()).reshape(len(ts), b, *self.shape)
        return xt * self.schedule.alpha(ts).reshape(-1, *([1] * (xt.dim() - 1)))


class EmpiricalOracle(GaussianMixtureOracle):
    """The optimal denoiser of a finite data set {y_n}: ε*(x, t) = (x − α_t Σ_n r_n y_n)/σ_t with
    r = softmax_n(−‖x − α_t y_n‖²/(2σ_t²)). Its flow maps noise onto the training points."""

    def __init__(self, schedule: Schedule, data: Tensor, chunk: int = 256):
        data = torch.as_tensor(data, dtype=torch.float64)
        n = len(data)
        super().__init__(schedule, torch.full((n,), 1.0 / n), data, torch.zeros(n))
        self.chunk = chunk
        self._sq = (data.reshape(n, -1) ** 2).sum(1)  # ‖y_n‖²

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        y = self.means.reshape(len(self.means), -1)
        out = []
        for xs, ts in zip(x.split(self.chunk), t.split(self.chunk)):
            xf = xs.reshape(len(xs), -1).to(torch.float64)
            a, s = self.schedule.alpha(ts)[:, None], self.schedule.sigma(ts)[:, None]
            # ‖x − αy‖² = ‖x‖² − 2α x·y + α²‖y‖², as one matmul against the whole data set
            d2 = (xf**2).sum(1, keepdim=True) - 2 * a * (xf @ y.T) + a**2 * self._sq[None]
            r = torch.softmax(-d2 / (2 * s**2), dim=1)
            out.append(((xf - a * (r @ y)) / s).reshape(xs.shape).to(x.dtype))
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------------
# Phase Space Langevin Diffusion
# ----------------------------------------------------------------------------------------------------
def _times_like(t, z: Tensor) -> Tensor:
    """Times as a float64 (B,) tensor for a batch z."""
    return torch.as_tensor(t, dtype=torch.float64).expand(len(z)).clone()


def _psld_moments(schedule: PSLD, t: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-coordinate marginal of z_t for x₀ ~ N(mean, var) and HSM m₀ ~ N(0, κM): t (B,), mean/var (*S)
    → μ_x, μ_m of shape (B, *S) and Σ_t of shape (B, *S, 2, 2)."""
    tb = t.reshape(-1, *([1] * mean.dim()))
    phi = schedule.transition(tb)  # (B, 1.., 2, 2)
    mu_x, mu_m = phi[..., 0, 0] * mean, phi[..., 1, 0] * mean
    cov = schedule.covariance(tb, xx0=var)
    return mu_x, mu_m, cov.expand(*mu_x.shape, 2, 2)


def _solve2(S: Tensor, v: Tensor) -> Tensor:
    """S⁻¹v for 2×2 matrices S (..., 2, 2) and vectors v (..., 2), by Cramer's rule."""
    det = S[..., 0, 0] * S[..., 1, 1] - S[..., 0, 1] * S[..., 1, 0]
    a = (S[..., 1, 1] * v[..., 0] - S[..., 0, 1] * v[..., 1]) / det
    b = (S[..., 0, 0] * v[..., 1] - S[..., 1, 0] * v[..., 0]) / det
    return torch.stack([a, b], -1)


class PSLDGaussianOracle:
    """PSLD with data x₀ ~ N(mean, diag std²) (``mean``/``std`` of the data shape (C, ...) or broadcastable)
    and HSM momentum m₀ ~ N(0, κM): every marginal is Gaussian, p_t = N(μ_t, Σ_t) per coordinate with
    μ_t = Φ_t (μ₀, 0) and Σ_t = ``schedule.covariance(t, xx0=std², mm0=κM)``; the PF-ODE is affine."""

    def __init__(self, schedule: PSLD, mean: Tensor, std: Tensor):
        if not isinstance(schedule, PSLD):
            raise ValueError(f"PSLDGaussianOracle needs a PSLD schedule, got {schedule.name!r}")
        self.schedule = schedule
        self.mean = torch.as_tensor(mean, dtype=torch.float64)
        self.std = torch.as_tensor(std, dtype=torch.float64)
        self.shape = tuple(torch.broadcast_shapes(self.mean.shape, self.std.shape))
        self.mean, self.std = self.mean.expand(self.shape), self.std.expand(self.shape)
        self._psi_cache: dict[tuple, Tensor] = {}  # flow_matrix solves, keyed by (t, s, rtol, atol)

    def moments(self, t) -> tuple[Tensor, Tensor]:
        """(μ_t as a state (1, 2C, ...), Σ_t per coordinate (C, ..., 2, 2)) at a scalar time t."""
        tt = torch.as_tensor(t, dtype=torch.float64).reshape(1)
        mu_x, mu_m, cov = _psld_moments(self.schedule, tt, self.mean, self.std**2)
        return join(mu_x, mu_m), cov[0]

    def score(self, z: Tensor, t) -> Tensor:
        """s*(z, t) = −Σ_t⁻¹(z − μ_t), per coordinate."""
        tt = _times_like(t, z)
        mu_x, mu_m, cov = _psld_moments(self.schedule, tt, self.mean, self.std**2)
        x, m = split(z.to(torch.float64))
        s = -_solve2(cov, torch.stack([x - mu_x, m - mu_m], -1))
        return join(s[..., 0], s[..., 1]).to(z.dtype)

    def eps(self, z: Tensor, t) -> Tensor:
        """ε*(z, t) = L_tᵀ Σ_t⁻¹ (z − μ_t) = −L_tᵀ s*, with L_t the HSM Cholesky factor the solvers use."""
        tt = _times_like(t, z)
        return apply2(-self.schedule.cholesky(tt).transpose(-1, -2), self.score(z.to(torch.float64), tt)).to(z.dtype)

    def denoise(self, z: Tensor, t) -> Tensor:
        """E[x₀ | z_t] (C channels)."""
        return self.schedule.denoise(z, self.eps(z, t), _times_like(t, z))

    def flow_matrix(self, t: float, s: float, rtol: float = 1e-13, atol: float = 1e-13) -> Tensor:
        """Ψ(t, s) per coordinate, shape (C, ..., 2, 2): the PF-ODE map z_t − μ_t = Ψ (z_s − μ_s), from a float64
        DOP853 solve of dΨ/dt = (F_t + ½G_tG_tᵀΣ_t⁻¹)Ψ, Ψ(s, s) = I — one 2×2 system per distinct std."""
        from scipy.integrate import solve_ivp

        key = (float(t), float(s), rtol, atol)
        if key in self._psi_cache:
            return self._psi_cache[key]
        sched, kappa_m = self.schedule, self.schedule.kappa * self.schedule.mass
        stds, inverse = torch.unique(self.std.reshape(-1), return_inverse=True)
        var = stds**2

        def rhs(tau, y):
            F, Q = sched.drift(tau).numpy(), sched.diffusion(tau).numpy()
            A = F + 0.5 * Q @ np.linalg.inv(sched.covariance(tau, xx0=var, mm0=kappa_m).numpy())
            return (A @ y.reshape(-1, 2, 2)).ravel()

        if float(t) == float(s):
            psi = torch.eye(2, dtype=torch.float64).expand(len(stds), 2, 2)
        else:
            sol = solve_ivp(
                rhs, (float(s), float(t)), np.tile(np.eye(2).ravel(), len(stds)), method="DOP853", rtol=rtol, atol=atol
            )
            if not sol.success:
                raise RuntimeError(f"flow-matrix solve failed: {sol.message}")
            psi = torch.from_numpy(sol.y[:, -1].reshape(-1, 2, 2).copy())
        out = psi[inverse].reshape(*self.shape, 2, 2)
        self._psi_cache[key] = out
        return out

    def flow(self, z: Tensor, t_from: float, t_to: float) -> Tensor:
        """Exact PF-ODE map from ``t_from`` to ``t_to``: μ_t + Ψ(t, s)(z − μ_s)."""
        mu_s, _ = self.moments(t_from)
        mu_t, _ = self.moments(t_to)
        psi = self.flow_matrix(t_to, t_from)
        return (mu_t + apply2(psi[None], z.to(torch.float64) - mu_s)).to(z.dtype)

    def sample(self, n: int, t: float | None = None, generator: torch.Generator | None = None) -> Tensor:
        """n data samples x₀ (n, C, ...) when ``t`` is None, else n states z_t ~ p_t (n, 2C, ...)."""
        if t is None:
            return self.mean + self.std * torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)
        mu, cov = self.moments(t)
        L = torch.linalg.cholesky(cov)[None]
        return mu + apply2(
            L, torch.randn((n, 2 * self.shape[0], *self.shape[1:]), dtype=torch.float64, generator=generator)
        )


class PSLDGaussianMixtureOracle:
    """PSLD with data Σ_k w_k N(m_k, diag s_k²) (``means`` (K, C, ...), ``stds`` (K,) or (K, C, ...)) and HSM
    momentum: ε* in closed form from the responsibilities; the reference flow is a float64 DOP853 solve of
    the PF-ODE dz/dt = F_t z − ½G_tG_tᵀ s*(z, t)."""

    def __init__(self, schedule: PSLD, weights: Tensor, means: Tensor, stds: Tensor):
        if not isinstance(schedule, PSLD):
            raise ValueError(f"PSLDGaussianMixtureOracle needs a PSLD schedule, got {schedule.name!r}")
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.shape = tuple(self.means.shape[1:])
        k = len(self.means)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {tuple(self.weights.shape)}")
        self.weights = self.weights / self.weights.sum()
        stds = torch.as_tensor(stds, dtype=torch.float64)
        self.stds = (stds.reshape(k, *([1] * len(self.shape))) if stds.dim() == 1 else stds).expand(k, *self.shape)

    def score(self, z: Tensor, t) -> Tensor:
        """s*(z, t) = Σ_k r_k(z, t)·(−Σ_{k,t}⁻¹(z − μ_{k,t})), r_k the posterior of component k."""
        tt = _times_like(t, z)
        b, k = len(z), len(self.means)
        mu_x, mu_m, cov = _psld_moments(self.schedule, tt, self.means, self.stds**2)  # (B, K, *S), (B, K, *S, 2, 2)
        x, m = split(z.to(torch.float64))
        d = torch.stack([x[:, None] - mu_x, m[:, None] - mu_m], -1)  # (B, K, *S, 2)
        sinv_d = _solve2(cov, d)
        det = cov[..., 0, 0] * cov[..., 1, 1] - cov[..., 0, 1] * cov[..., 1, 0]
        logp = -0.5 * ((d * sinv_d).sum(-1) + torch.log(det)).reshape(b, k, -1).sum(-1) + torch.log(self.weights)
        r = torch.softmax(logp, dim=1).reshape(b, k, *([1] * (len(self.shape) + 1)))
        s = -(r * sinv_d).sum(1)  # (B, *S, 2)
        return join(s[..., 0], s[..., 1]).to(z.dtype)

    def eps(self, z: Tensor, t) -> Tensor:
        """ε*(z, t) = −L_tᵀ s*(z, t)."""
        tt = _times_like(t, z)
        return apply2(-self.schedule.cholesky(tt).transpose(-1, -2), self.score(z.to(torch.float64), tt)).to(z.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n data samples x₀ (n, C, ...)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.stds[k] * torch.randn((n, *self.shape), dtype=torch.float64, generator=generator)

    def flow(self, z: Tensor, ts, rtol: float = 1e-12, atol: float = 1e-12) -> Tensor:
        """Reference PF-ODE solution from ts[0] through every ts[i]: (len(ts), B, 2C, ...), float64.
        Integrated in u = √t (dz/du = 2u·dz/dt), which removes the √t behaviour of the flow near t = 0."""
        from scipy.integrate import solve_ivp

        ts = torch.as_tensor(ts, dtype=torch.float64)
        shape = z.shape

        def rhs(u: float, y):
            t = u * u
            zz = torch.from_numpy(y).reshape(shape)
            v = apply2(self.schedule.drift(t), zz) - 0.5 * apply2(self.schedule.diffusion(t), self.score(zz, t))
            return (2 * u * v).reshape(-1).numpy()

        us = torch.sqrt(ts)
        sol = solve_ivp(
            rhs,
            (float(us[0]), float(us[-1])),
            z.to(torch.float64).reshape(-1).numpy(),
            method="DOP853",
            t_eval=us.numpy(),
            rtol=rtol,
            atol=atol,
        )
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        return torch.from_numpy(sol.y.T.copy()).reshape(len(ts), *shape)
