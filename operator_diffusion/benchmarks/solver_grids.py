"""Each solver's best grid and options on the shipped digits teacher, measured on tuning seeds only: the
evidence behind ``bench.SOLVER_DEFAULTS`` and UniPC's default order. Every candidate of ``bench.tune_candidates``
(every grid × the ``TUNE_OPTIONS`` variants) runs at each NFE, spending all its evaluations on steps and ending
at x(t_min), and is scored by teacher-match RMSE against UniPC-50 (the demo's reference). A solver's default is
the candidate with the lowest mean log-RMSE over the NFEs (one choice for every budget); the per-NFE best is
what ``opdiff bench --tune`` would pick. A few minutes on 2 CPU cores."""

from __future__ import annotations

import math

SEEDS = range(900_000, 900_128)   # tuning seeds: disjoint from every seed the demo, bench and ablations report
NFES = (3, 5, 10, 15)
SOLVERS = ("ddim", "deis", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc", "heun")


def run() -> tuple[list[dict], dict]:
    from ..bench import BenchSetup, SolverChoice, tune_solvers
    from ..demo import DEMO, digits_teacher, reference_solver

    teacher = digits_teacher()
    t_end = 1e-3
    ref = reference_solver(DEMO.reference_steps, t_end)
    setup = BenchSetup(teacher, ref, [], None, SOLVERS, NFES, tune_seeds=list(SEEDS), batch_size=256)
    choices, table = tune_solvers(setup, SOLVERS)
    best_single: dict[str, tuple[float, SolverChoice]] = {}
    for solver in SOLVERS:
        keyed: dict[str, list[float]] = {}
        for r in table:
            if r["solver"] == solver:
                keyed.setdefault(repr(SolverChoice(r["grid"], r["options"])), []).append(math.log(r["rmse"]))
        full = {k: sum(v) / len(v) for k, v in keyed.items() if len(v) == max(len(x) for x in keyed.values())}
        k = min(full, key=full.get)
        best_single[solver] = (full[k], next(SolverChoice(r["grid"], r["options"]) for r in table
                                             if r["solver"] == solver and repr(SolverChoice(r["grid"], r["options"])) == k))
    return table, {"per_nfe": choices, "single": best_single}
