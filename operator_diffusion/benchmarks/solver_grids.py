"""Each solver's best grid and options on the shipped digits teacher, measured on tuning seeds only: the
evidence behind ``bench.SOLVER_DEFAULTS`` and UniPC's default order. Every candidate of ``bench.tune_candidates``
(every grid × the ``TUNE_OPTIONS`` variants) runs at each NFE, spending all its evaluations on steps and ending
at x(t_min), and is scored by teacher-match RMSE against UniPC-50 (the demo's reference). A solver's default is
the candidate with the lowest mean log-RMSE over the NFEs (one choice for every budget); the per-NFE best is
what ``opdiff bench --tune`` would pick. A few minutes on 2 CPU cores."""

from __future__ import annotations

import math

SEEDS = range(900_000, 900_128)  # tuning seeds: disjoint from every seed the demo, bench and ablations report
NFES = (3, 5, 10, 15)
SOLVERS = ("ddim", "deis", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc", "heun")


def run() -> tuple[list[dict], dict]:
    from ..bench import BenchSetup, SolverChoice, tune_solvers
    from ..demo import DEMO, digits_teacher, reference_solver

    teacher = digits_teacher()
    t_end = 1e-3
    ref = reference_solver(DEMO.reference_steps, t_end)
    # a tuning study on the teacher alone (no run to plan from): the setup is built from objects in memory
    setup = BenchSetup(teacher, ref, seeds=[], solvers=SOLVERS, nfes=NFES, tune_seeds=list(SEEDS), batch_size=256)
    choices, table = tune_solvers(setup, SOLVERS)
    best_single: dict[str, tuple[float, SolverChoice]] = {}
    for solver in SOLVERS:
        logs: dict[SolverChoice, list[float]] = {}
        for r in table:
            if r["solver"] == solver:
                logs.setdefault(SolverChoice.of(r), []).append(math.log(r["rmse"]))
        most = max(len(v) for v in logs.values())  # Heun's endings each spend only odd or only even NFE counts
        complete = {c: sum(v) / len(v) for c, v in logs.items() if len(v) == most}  # scored at the most NFEs
        choice = min(complete, key=complete.get)
        best_single[solver] = (complete[choice], choice)
    return table, {"per_nfe": choices, "single": best_single}
