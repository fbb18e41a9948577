"""Solver benchmark: accuracy against NFE on the exact mixture flow, and per-step solver overhead
relative to one evaluation of a small U-Net on this machine's CPU.

Run: ``python -m operator_diffusion.benchmarks solvers`` (rewrites its section of docs/benchmarks.md).
The functions return rows; ``__main__`` formats them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..oracles import GaussianMixtureOracle
from ..schedules import VPLinear, time_grid
from ..solvers import available_solvers, solve, solver_info

# (label, method, options, grid kind): defaults as a user would call them, plus DEIS on its own grid.
CONFIGS = [
    ("ddim", "ddim", {}, "logsnr"),
    ("deis (tAB-3)", "deis", {"order": 3}, "logsnr"),
    ("deis (tAB-3, quadratic t)", "deis", {"order": 3}, "quadratic"),
    ("ipndm", "ipndm", {}, "logsnr"),
    ("dpmpp-2m", "dpmpp-2m", {}, "logsnr"),
    ("dpmpp-3m", "dpmpp-3m", {}, "logsnr"),
    ("unipc (bh2, p=3)", "unipc", {}, "logsnr"),
    ("heun", "heun", {}, "edm"),
    ("lambda-ddim (λ=0.5)", "lambda-ddim", {"lam": 0.5}, "logsnr"),
]
NFES = (5, 10, 20, 50)


def benchmark_mixture(dim: int = 16, components: int = 8, batch: int = 256, seed: int = 0) -> tuple[dict, list[dict]]:
    """RMSE of x(t_min) against a float64 DOP853 reference for each solver at each NFE budget."""
    schedule = VPLinear()
    g = torch.Generator().manual_seed(seed)
    oracle = GaussianMixtureOracle(
        schedule,
        weights=torch.rand(components, generator=g, dtype=torch.float64) + 0.5,
        means=torch.randn(components, dim, generator=g, dtype=torch.float64),
        stds=0.1 + 0.4 * torch.rand(components, generator=g, dtype=torch.float64),
    )
    x_T = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    ref = oracle.flow(x_T, [schedule.t_max, schedule.t_min], rtol=1e-12, atol=1e-12)[-1]
    setup = {"dim": dim, "components": components, "batch": batch, "schedule": schedule.config()}
    rows = []
    for label, method, options, kind in CONFIGS:
        row = {"solver": label, "grid": kind}
        for nfe in NFES:
            steps = nfe // solver_info(method).nfe_per_step
            out = solve(oracle.eps, x_T, schedule, time_grid(schedule, steps, kind), method, **options)
            row[nfe] = (float((out.sample - ref).pow(2).mean().sqrt()), out.nfe)
        rows.append(row)
    return setup, rows


@dataclass(frozen=True)
class Overhead:
    solver: str
    per_step_ms: float
    ratio: float  # solver overhead per NFE / one network evaluation


def benchmark_overhead(network_eps, x: torch.Tensor, steps: int = 20, repeats: int = 7) -> tuple[float, list[Overhead]]:
    """Per-NFE solver overhead (solve() with a free ε, i.e. a precomputed tensor) against the median time
    of one ``network_eps`` evaluation on the same batch, measured side by side (interleaved) in one run."""
    schedule = VPLinear()
    ts = time_grid(schedule, steps, "logsnr")
    from .adapter import interleaved_medians

    with torch.inference_mode():
        eps0 = network_eps(x, torch.full((len(x),), 0.5))

        def free_eps(x_, t_):
            return eps0

        names = available_solvers()
        nfes = {name: solve(free_eps, x, schedule, ts, name).nfe for name in names}
        fns = {"network": lambda: network_eps(x, torch.full((len(x),), 0.5))}
        fns.update({name: (lambda name=name: solve(free_eps, x, schedule, ts, name)) for name in names})
        medians = interleaved_medians(fns, repeats, warmups=0)  # the NFE counts above were the warm-up
    t_net = medians["network"]
    rows = [Overhead(name, 1e3 * medians[name] / steps, (medians[name] / nfes[name]) / t_net) for name in names]
    return t_net, rows
