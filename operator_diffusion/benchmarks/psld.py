"""PSLD integrators benchmark: error against NFE for every PSLD solver on an exact Gaussian-mixture oracle.

Run: ``python -m operator_diffusion.benchmarks psld`` (rewrites its section of docs/benchmarks.md).

- Deterministic solvers: RMSE of the final x (data channels, at t_min) against the exact PF-ODE flow of the
  same z_T (float64 DOP853, rtol = atol = 1e-11).
- Stochastic solvers: distance between the law of the final x and the exact marginal of x at t_min (a
  Gaussian mixture, sampled exactly): the moment error ‖mean − μ‖₂ + ‖cov − Σ‖_F against the analytic
  moments, and the sliced 2-Wasserstein distance to exact samples (fixed random projections). Both have a
  sampling floor, reported: the same metric for a second exact sample of the same size.
- λ of the conjugate methods is tuned per NFE on separate tuning inputs (other z_T / noise seeds) over
  ``LAMS``; the table reports the evaluation error at the chosen λ.

The functions return rows; ``__main__`` formats them.
"""

from __future__ import annotations

import math
import time

import torch

from ..oracles import PSLDGaussianMixtureOracle
from ..schedules import PSLD, split, time_grid
from ..solvers import solve

NFES = (10, 20, 50, 100)
LAMS = (-16.0, -8.0, -4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
GRID = "quadratic"  # the PSLD code's optional quadratic striding; better than uniform for every method here
# (label, method, fixed options, tune λ?)
DETERMINISTIC = [
    ("euler", "euler", {}, False),
    ("lambda-ddim", "lambda-ddim", {}, True),
    ("lambda-ddim-block", "lambda-ddim-block", {}, True),
    ("nse", "nse", {}, False),
    ("rse", "rse", {}, False),
    ("nvv", "nvv", {}, False),
    ("rvv", "rvv", {}, False),
    ("csps-d (se)", "csps-d", {"variant": "se"}, True),
    ("csps-d (vv)", "csps-d", {"variant": "vv"}, True),
]
STOCHASTIC = [
    ("em", "em", {}, False),
    ("sscs", "sscs", {}, False),
    ("noba", "noba", {}, False),
    ("roba", "roba", {}, False),
    ("csps-s", "csps-s", {}, True),
]


def best_lam(error) -> float:
    """The λ of LAMS with the smallest finite ``error(λ)`` (on the tuning inputs)."""
    errs = {lam: error(lam) for lam in LAMS}
    return min(errs, key=lambda lam: errs[lam] if math.isfinite(errs[lam]) else math.inf)


def mixture(dim: int = 4, components: int = 6, seed: int = 0) -> PSLDGaussianMixtureOracle:
    """The benchmark's data: ``components`` isotropic Gaussians in ``dim`` dimensions, stds 0.1–0.5."""
    g = torch.Generator().manual_seed(seed)
    return PSLDGaussianMixtureOracle(
        PSLD(),
        weights=torch.rand(components, generator=g, dtype=torch.float64) + 0.5,
        means=torch.randn(components, dim, generator=g, dtype=torch.float64),
        stds=0.1 + 0.4 * torch.rand(components, generator=g, dtype=torch.float64),
    )


def steps_for(method: str, options: dict, nfe: int, schedule: PSLD) -> int:
    """The most steps whose NFE fits the budget: NFE(N) = a·N + b, read off 1- and 2-step dry runs."""

    def count(n):
        return solve(
            lambda z, t: torch.zeros_like(z),
            torch.zeros(1, 2, dtype=torch.float64),
            schedule,
            time_grid(schedule, n, GRID),
            method,
            **options,
        ).nfe

    per = count(2) - count(1)
    return (nfe - (count(1) - per)) // per


def _x_at_end(oracle, z_T, method, options, steps, seed=None) -> tuple[torch.Tensor, int]:
    """The x channels of the sample at t_min, and the NFE spent."""
    s = oracle.schedule
    extra = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    out = solve(oracle.eps, z_T, s, time_grid(s, steps, GRID), method, **options, **extra)
    return split(out.sample)[0], out.nfe


def _rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def benchmark_deterministic(
    oracle: PSLDGaussianMixtureOracle, batch: int = 256, tune_batch: int = 64, seed: int = 1
) -> tuple[float, list[dict]]:
    """The RMS of the reference x(t_min) (the error scale) and rows {label, nfe → (rmse, lam or None, nfe used)}."""
    s = oracle.schedule
    z_eval = s.prior((batch, *oracle.shape), generator=torch.Generator().manual_seed(seed))
    z_tune = s.prior((tune_batch, *oracle.shape), generator=torch.Generator().manual_seed(seed + 1000))
    ref_eval = split(oracle.flow(z_eval, [s.t_max, s.t_min], rtol=1e-11, atol=1e-11)[-1])[0]
    ref_tune = split(oracle.flow(z_tune, [s.t_max, s.t_min], rtol=1e-11, atol=1e-11)[-1])[0]
    rows = []
    for label, method, options, tune in DETERMINISTIC:
        row = {"label": label, "method": method}
        for nfe in NFES:
            steps = steps_for(method, options, nfe, s)
            lam = None
            if tune:
                lam = best_lam(
                    lambda l: _rmse(_x_at_end(oracle, z_tune, method, {**options, "lam": l}, steps)[0], ref_tune)
                )
            opts = {**options, "lam": lam} if tune else options
            x, used = _x_at_end(oracle, z_eval, method, opts, steps)
            row[nfe] = (_rmse(x, ref_eval), lam, used)
        rows.append(row)
    return float(ref_eval.pow(2).mean().sqrt()), rows


def exact_x_samples(oracle: PSLDGaussianMixtureOracle, n: int, t: float, generator: torch.Generator) -> torch.Tensor:
    """Exact samples of the x-marginal of p_t: component k, then x ~ N(Φ₀₀ m_k, Φ₀₀² s_k² + Σ_xx^HSM(t))."""
    s = oracle.schedule
    phi00, var_hsm = float(s.transition(t)[0, 0]), float(s.covariance(t)[0, 0])
    k = torch.multinomial(oracle.weights, n, replacement=True, generator=generator)
    std = torch.sqrt(phi00**2 * oracle.stds[k] ** 2 + var_hsm)
    return phi00 * oracle.means[k] + std * torch.randn((n, *oracle.shape), dtype=torch.float64, generator=generator)


def exact_x_moments(oracle: PSLDGaussianMixtureOracle, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the x-marginal of p_t (flattened)."""
    s = oracle.schedule
    phi00, var_hsm = float(s.transition(t)[0, 0]), float(s.covariance(t)[0, 0])
    w = oracle.weights
    m = phi00 * oracle.means.reshape(len(w), -1)
    v = phi00**2 * oracle.stds.reshape(len(w), -1) ** 2 + var_hsm
    mean = (w[:, None] * m).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(v) + m[:, :, None] * m[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def moment_error(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    xf = x.reshape(len(x), -1)
    return float(torch.linalg.vector_norm(xf.mean(0) - mean) + torch.linalg.matrix_norm(torch.cov(xf.T) - cov))


def sliced_w2(a: torch.Tensor, b: torch.Tensor, projections: torch.Tensor) -> float:
    """Sliced 2-Wasserstein distance between equal-size samples: RMS over projections of the sorted-sample W2."""
    pa, pb = (a.reshape(len(a), -1) @ projections).sort(0).values, (b.reshape(len(b), -1) @ projections).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def benchmark_stochastic(
    oracle: PSLDGaussianMixtureOracle, n: int = 20000, tune_n: int = 5000, seed: int = 2
) -> tuple[dict, list[dict]]:
    """Rows {label, nfe → (moment error, sliced W2, lam or None, nfe used)} and the sampling floors."""
    s = oracle.schedule
    dim = math.prod(oracle.shape)
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, 128, generator=g, dtype=torch.float64)
    proj = proj / proj.norm(dim=0, keepdim=True)
    mean, cov = exact_x_moments(oracle, s.t_min)
    exact = exact_x_samples(oracle, n, s.t_min, g)
    exact_tune = exact_x_samples(oracle, tune_n, s.t_min, g)
    floor = {
        "moment": moment_error(exact_x_samples(oracle, n, s.t_min, g), mean, cov),
        "sw2": sliced_w2(exact_x_samples(oracle, n, s.t_min, g), exact, proj),
    }
    z_eval = s.prior((n, *oracle.shape), generator=torch.Generator().manual_seed(seed + 1))
    z_tune = s.prior((tune_n, *oracle.shape), generator=torch.Generator().manual_seed(seed + 2))
    rows = []
    for label, method, options, tune in STOCHASTIC:
        row = {"label": label, "method": method}
        for nfe in NFES:
            steps = steps_for(method, options, nfe, s)
            lam = None
            if tune:
                lam = best_lam(
                    lambda l: sliced_w2(
                        _x_at_end(oracle, z_tune, method, {**options, "lam": l}, steps, seed=seed + 3)[0],
                        exact_tune,
                        proj,
                    )
                )
            opts = {**options, "lam": lam} if tune else options
            x, used = _x_at_end(oracle, z_eval, method, opts, steps, seed=seed + 4)
            row[nfe] = (moment_error(x, mean, cov), sliced_w2(x, exact, proj), lam, used)
        rows.append(row)
    return floor, rows


def run() -> dict:
    """Everything the benchmark section reports."""
    t0 = time.perf_counter()
    oracle = mixture()
    ref_rms, det = benchmark_deterministic(oracle)
    floor, sto = benchmark_stochastic(oracle)
    return {
        "oracle": oracle,
        "deterministic": det,
        "ref_rms": ref_rms,
        "stochastic": sto,
        "floor": floor,
        "seconds": time.perf_counter() - t0,
    }
