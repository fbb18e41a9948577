"""The one-step quality benchmark (``python -m operator_diffusion.benchmarks quality``, about 75 minutes on
2 CPU cores): DSNO@1's teacher-match error on the digits against training steps (1k, 2k, 4k, 8k at 32k
trajectories) and against trajectories (8k, 32k, 128k at 4k steps), each run with its own full learning-rate
schedule, beside the best fair solvers at 5, 10 and 15 NFE on the same held-out seeds (each solver on its own grid,
``bench.SOLVER_DEFAULTS``). Writes docs/quality.png; the goal is DSNO@1 ≤ the best fair solver at 10 NFE."""

from __future__ import annotations

from pathlib import Path

STEPS = (1000, 2000, 4000, 8000)
NUMS = (8192, 32768, 131072)
FIXED_NUM, FIXED_STEPS = 32768, 4000
SCALE = (("ddim", "deis", "dpmpp-2m", "unipc"), (5, 10, 15))
# held out from every row's training seeds (0 … max(NUMS) − 1): the other benchmarks' 100000-100255 lie inside the
# 131072-trajectory collection's, which `bench` refuses
EVAL_SEEDS = range(200_000, 200_256)


def quality_variants() -> list:
    from .ablations import Variant

    out = [Variant(f"{FIXED_NUM} trajectories, {s} steps", num=FIXED_NUM, train=(("max_steps", s),)) for s in STEPS]
    out += [
        Variant(f"{n} trajectories, {FIXED_STEPS} steps", num=n, train=(("max_steps", FIXED_STEPS),))
        for n in NUMS
        if n != FIXED_NUM
    ]
    return out


def run_quality(root: Path | None = None) -> list[dict]:
    from ..demo import DEMO
    from .ablations import run_ablations

    return run_ablations(root, quality_variants(), DEMO.lr, eval_seeds=EVAL_SEEDS, scale=SCALE)


def best_solver(solvers: dict[str, float], nfe: int) -> float | None:
    """The lowest RMSE among the ``method@nfe`` entries of one NFE (None if none)."""
    return min((v for k, v in solvers.items() if k.rsplit("@", 1)[1] == str(nfe)), default=None)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solvers = rows[0]["solvers"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, fixed, xs, label in (
        (axes[0], "max_steps", FIXED_NUM, STEPS, "training steps"),
        (axes[1], "num", FIXED_STEPS, NUMS, "trajectories"),
    ):
        other = "num" if key == "max_steps" else "max_steps"
        pts = sorted((r[key], r["rmse"]) for r in rows if r[other] == fixed and r[key] in xs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="k", label="DSNO, 1 NFE")
        for nfe, style in ((5, ":"), (10, "--"), (15, "-.")):
            best = best_solver(solvers, nfe)
            if best is not None:
                ax.axhline(best, linestyle=style, color="tab:blue", label=f"best solver, {nfe} NFE")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("teacher-match RMSE")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
