"""DSNO ablations on the embedded digits default (paper Section 5.3 at this scale): each variant trains from
the shipped teacher for the demo's number of steps and is scored by its teacher-match RMSE on 256 held-out
seeds against the teacher's UniPC-50 reference. Variants: the learning rate of DSNO and of the one-step
baseline, sqrt-SNR vs uniform weighting, L1 vs L2, M = 2 / 4 / 8 output times, quadratic vs uniform
placement of the output times. Takes about 40 minutes on 2 CPU cores."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EVAL_SEEDS = range(100_000, 100_256)


@dataclass(frozen=True)
class Variant:
    name: str
    times: int = 4                   # M
    time_kind: str = "quadratic"     # placement of the output times
    steps: int = 20                  # collection solver steps (M = 8 needs a finer grid)
    train: tuple = ()                # TrainConfig overrides


def variants(lr: float, baseline_lr: float) -> list[Variant]:
    base = (("lr", lr),)
    return [
        Variant("DSNO lr 2e-4", train=(("lr", 2e-4),)),
        Variant("DSNO lr 5e-4", train=(("lr", 5e-4),)),
        Variant("DSNO lr 1e-3", train=(("lr", 1e-3),)),
        Variant("baseline lr 2e-4", train=(("lr", 2e-4), ("baseline", True))),
        Variant("baseline lr 5e-4", train=(("lr", 5e-4), ("baseline", True))),
        Variant("baseline lr 1e-3", train=(("lr", 1e-3), ("baseline", True))),
        Variant("baseline lr 2e-3", train=(("lr", 2e-3), ("baseline", True))),
        Variant("uniform weighting", train=base + (("weighting", "uniform"),)),
        Variant("L2 loss", train=base + (("loss", "l2"),)),
        Variant("M = 2", times=2, train=base),
        Variant("M = 8", times=8, steps=40, train=base),
        Variant("uniform output times", time_kind="uniform", train=base),
    ]


def run_ablations(root: Path | None = None) -> list[dict]:
    from ..bench import BenchSetup, run_bench
    from ..demo import DEMO, DIGITS_TEACHER, digits_teacher
    from ..sampling import TeacherSolver
    from ..training import TrainConfig, load_run, reset_accelerate_state, train
    from ..trajectories import CollectConfig, collect

    c = DEMO
    teacher = digits_teacher()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(root or tmp)
        for k, v in enumerate(variants(c.lr, c.baseline_lr)):
            data = root / f"data_m{v.times}_{v.time_kind}_{v.steps}"
            collect(teacher, data, CollectConfig(num=c.num, solver=c.solver, steps=v.steps, times=v.times,
                                                 time_kind=v.time_kind, batch_size=c.collect_batch,
                                                 shard_size=min(4096, c.num)), checkpoint=DIGITS_TEACHER)
            kw = {"modes": c.modes, "batch_size": c.batch_size, "lr": c.lr, "warmup": c.warmup, "ema": c.ema,
                  "max_steps": c.train_steps, **dict(v.train)}
            start = time.perf_counter()
            train(TrainConfig(data=str(data), out=str(root / f"run{k}"), init_from=str(DIGITS_TEACHER),
                              save_every=c.train_steps, log_every=50, **kw))
            reset_accelerate_state()
            seconds = time.perf_counter() - start
            model, _ = load_run(root / f"run{k}")
            ref = TeacherSolver(c.solver, c.reference_steps, "quadratic", float(model.times[-1]))
            result = run_bench(BenchSetup(teacher, ref, list(EVAL_SEEDS), None, (), (), "quadratic", {"m": model}, None))
            rows.append({"variant": v.name, "rmse": result.row("m").rmse, "train_s": seconds, **kw,
                         "times": v.times, "time_kind": v.time_kind})
    return rows
