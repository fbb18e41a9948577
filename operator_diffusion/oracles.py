"""Exact denoisers with known probability-flow ODEs: the ground truth of the tests and the exact teacher
of ``opdiff spectrum``. Each oracle has ``eps(x, t)`` (the exact ε* = −σ_t ∇log p_t), ``denoise``,
``sample`` and ``flow`` (the PF-ODE solution map), for any schedule.

- ``GaussianOracle``: data N(μ, diag s²); the flow is affine and closed-form:
  x_t = α_t μ + (c_t/c_s)(x_s − α_s μ), c_t = (α_t² s² + σ_t²)^{1/2}.
- ``GaussianMixtureOracle``: ε* in closed form from the responsibilities; the reference flow is a
  float64 DOP853 solve (rtol = atol = 1e-12 by default) of dx̃/dλ = −e^{−λ} ε*(α x̃, t(λ)).
- ``EmpiricalOracle``: the optimal denoiser of a finite data set (a mixture of point masses), the
  exact ε of the training set smoothed by the forward process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Schedule

__all__ = ["GaussianOracle", "GaussianMixtureOracle", "EmpiricalOracle"]


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
        return _col(self.schedule.alpha(t1), x) * mu + self._c(t1, x) / self._c(t0, x) * (x - _col(self.schedule.alpha(t0), x) * mu)

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

        sol = solve_ivp(rhs, (float(lams[0]), float(lams[-1])), x0.numpy(), method="DOP853",
                        t_eval=lams.numpy(), rtol=rtol, atol=atol)
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
