"""Measured global convergence orders of every solver against the exact mixture flow (float64).

The reference is an independent float64 DOP853 solve of the PF-ODE (rtol = atol = 1e-13); the solvers
run on log-SNR grids (EDM grids for the EDM schedule) with N doubling over 4 values, where every method
is in its asymptotic regime (the uniform-t grid is pre-asymptotic up to N ≈ 640, see solvers.md).
The fitted order is the least-squares slope of −log2(error) against log2(N).
"""

import math

import pytest
import torch

from operator_diffusion.oracles import GaussianMixtureOracle
from operator_diffusion.schedules import EDM, VPLinear, time_grid
from operator_diffusion.solvers import solve

NS = (80, 160, 320, 640)
TOL = 0.25  # a method of order p has slope in (p − 0.25, p + 0.25); neighbouring orders are 1 apart

CASES = [
    # (method, options, theoretical global order)
    ("ddim", {}, 1),
    ("deis", {"order": 1}, 2),
    ("deis", {"order": 2}, 3),
    ("deis", {"order": 3}, 4),
    ("ipndm", {"order": 4}, 2),  # fixed AB weights on a non-uniform grid: order 2
    ("dpmpp-2m", {}, 2),
    ("dpmpp-3m", {}, 2),  # the published update is second order (D2 is half what order 3 needs)
    ("dpmpp-3m", {"exact_third_order": True}, 3),
    ("unipc", {"order": 1}, 2),
    ("unipc", {"order": 2}, 3),
    ("unipc", {"order": 3}, 4),
    ("unipc", {"order": 2, "corrector": False}, 2),
    ("heun", {}, 2),
    ("lambda-ddim", {"lam": 0.5}, 1),
    ("lambda-ddim", {"lam": -1.0}, 1),
]


def _mixture(schedule):
    return GaussianMixtureOracle(
        schedule,
        weights=torch.tensor([0.5, 0.3, 0.2]),
        means=torch.tensor([[1.0, 0.5], [-1.0, 0.0], [0.2, -1.2]]),
        stds=torch.tensor([0.6, 0.5, 0.7]),
    )


def _fitted_order(schedule, grid_kind, method, options):
    oracle = _mixture(schedule)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(8, 2, dtype=torch.float64, generator=g) * float(schedule.sigma(torch.tensor(schedule.t_max)))
    ref = oracle.flow(x_T, [schedule.t_max, schedule.t_min], rtol=1e-13, atol=1e-13)[-1]
    errs = []
    for n in NS:
        out = solve(oracle.eps, x_T, schedule, time_grid(schedule, n, grid_kind), method, **options)
        errs.append(float((out.sample - ref).pow(2).mean().sqrt()))
    x = torch.tensor([math.log2(n) for n in NS], dtype=torch.float64)
    y = torch.tensor([-math.log2(e) for e in errs], dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return slope, errs


@pytest.mark.parametrize("method,options,order", CASES, ids=[f"{m}-{o}" for m, o, _ in CASES])
def test_global_order_vp_logsnr(method, options, order):
    slope, errs = _fitted_order(VPLinear(), "logsnr", method, options)
    assert errs[-1] > 1e-11, "error reached the reference's accuracy: the fit would be meaningless"
    assert abs(slope - order) < TOL, f"{method} {options}: measured order {slope:.2f}, expected {order} (errors {errs})"


@pytest.mark.parametrize(
    "method,options,order",
    [("ddim", {}, 1), ("deis", {"order": 3}, 4), ("dpmpp-2m", {}, 2), ("unipc", {"order": 2}, 3), ("heun", {}, 2)],
)
def test_global_order_edm_schedule(method, options, order):
    """The solvers only use α, σ, λ: the same orders hold on the variance-exploding EDM schedule."""
    slope, errs = _fitted_order(EDM(), "edm", method, options)
    assert abs(slope - order) < TOL, f"{method} {options}: measured order {slope:.2f}, expected {order} (errors {errs})"
