"""DSNO ablations on the embedded digits default (paper Section 5.3 at this scale): each variant trains from
the shipped teacher with the demo's data and settings and is scored by its teacher-match RMSE on 256 held-out
seeds against the teacher's UniPC-50 reference. Variants: M = 2 / 4 / 8 output times, sqrt-SNR vs uniform
weighting, quadratic vs uniform placement of the output times, and the one-step baseline's learning rate
(its own best is what the demo compares with). About 50 minutes on 2 CPU cores."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EVAL_SEEDS = range(100_000, 100_256)
X0_TEACHER_FILE = "digits_teacher_x0.safetensors"  # in the package assets, if ever shipped (it is not: levers)
LR = 1e-3  # the DSNO variants' learning rate (the demo now uses 2e-3: better FID, slightly worse RMSE)


@dataclass(frozen=True)
class Variant:
    name: str
    times: int = 4  # M
    time_kind: str = "quadratic"  # placement of the output times
    steps: int = 15  # collection solver steps (M = 8 needs a finer grid: 40)
    train: tuple = ()  # TrainConfig overrides
    teacher: str | None = None  # a teacher checkpoint other than the shipped one (its own collection)
    num: int | None = None  # trajectories (default: the demo's)


def variants(lr: float) -> list[Variant]:
    base = (("lr", lr),)
    return [
        Variant("DSNO lr 1e-3 (M = 4, sqrt-SNR, quadratic times)", train=base),
        Variant("M = 2", times=2, train=base),
        Variant("M = 8", times=8, steps=40, train=base),
        Variant("uniform weighting", train=base + (("weighting", "uniform"),)),
        Variant("uniform output times", time_kind="uniform", train=base),
        Variant("baseline lr 5e-4", train=(("lr", 5e-4), ("baseline", True))),
        Variant("baseline lr 1e-3", train=(("lr", 1e-3), ("baseline", True))),
        Variant("baseline lr 2e-3", train=(("lr", 2e-3), ("baseline", True))),
        Variant("baseline lr 4e-3", train=(("lr", 4e-3), ("baseline", True))),
        Variant("baseline lr 8e-3", train=(("lr", 8e-3), ("baseline", True))),
    ]


def train_settings(v: Variant, lr: float, train_steps: int | None = None) -> dict:
    """The TrainConfig fields of a variant: its sampler's demo settings (DSNO's or the baseline's batch, warm-up and
    steps; the demo's modes, schedule, EMA and dropout), then the variant's own overrides."""
    from ..demo import DEMO as c

    sampler = c.sampler_settings(dict(v.train).get("baseline", False))
    return {
        "modes": c.modes,
        **sampler,
        "lr": lr,
        "lr_decay": c.lr_decay,
        "ema": c.ema,
        "backbone_options": {"dropout": c.dropout},  # the demo's (a variant may set its own)
        "max_steps": train_steps or sampler["max_steps"],
        **dict(v.train),
    }


def score_run(run: Path, teacher: Path, eval_seeds, scale=((), ())):
    """``opdiff bench`` of a trained run on ``eval_seeds`` against its teacher's reference (the demo's): the model's
    row, and the RMSE of each ``scale`` solver at each NFE ({"method@nfe": rmse})."""
    from ..bench import plan_bench, run_bench
    from ..configs import BenchConfig
    from ..demo import DEMO, reference_fields

    config = BenchConfig(
        run=str(run),
        seeds=tuple(eval_seeds),
        solvers=scale[0],
        nfes=scale[1],
        teacher_checkpoint=str(teacher),
        device="cpu",
        **reference_fields(DEMO.reference_steps),
    )
    result = run_bench(plan_bench(config))
    (model_row,) = [r for r in result.rows if r.kind == "model"]  # "DSNO" or "one-step baseline"
    return model_row, {f"{r.method}@{r.nfe}": r.rmse for r in result.rows if r.kind == "solver"}


def run_ablations(
    root: Path | None = None,
    chosen: list[Variant] | None = None,
    lr: float = LR,
    train_steps: int | None = None,
    eval_seeds=EVAL_SEEDS,
    scale: tuple[tuple[str, ...], tuple[int, ...]] = (("ddim",), (10,)),
) -> list[dict]:
    """Train and score each variant (default: ``variants(LR)``); the first row of each teacher also scores the
    ``scale`` solvers at their NFEs (each on its own grid, ``bench.SOLVER_DEFAULTS``) on the same seeds."""
    from ..backbones import backbone_from_checkpoint
    from ..collection import collect
    from ..collection_plan import CollectConfig
    from ..demo import DEMO, DIGITS_TEACHER, digits_teacher
    from ..training import TrainConfig, reset_accelerate_state, train

    c = DEMO
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(root or tmp)
        for k, v in enumerate(chosen or variants(lr)):
            ckpt = Path(v.teacher or DIGITS_TEACHER)
            teacher = digits_teacher() if v.teacher is None else backbone_from_checkpoint(ckpt).eval()
            num = v.num or c.num
            data = root / f"data_m{v.times}_{v.time_kind}_{v.steps}_{ckpt.stem}_{num}"
            collect(
                teacher,
                data,
                CollectConfig(
                    num=num,
                    solver=c.solver,
                    steps=v.steps,
                    times=v.times,
                    time_kind=v.time_kind,
                    precision=c.precision,
                    batch_size=c.collect_batch,
                    shard_size=min(4096, num),
                ),
                checkpoint=ckpt,
            )
            kw = train_settings(v, lr, train_steps)
            start = time.perf_counter()
            train(
                TrainConfig(
                    data=str(data),
                    out=str(root / f"run{k}"),
                    init_from=str(ckpt),
                    save_every=kw["max_steps"],
                    log_every=50,
                    **kw,
                )
            )
            reset_accelerate_state()
            seconds = time.perf_counter() - start
            first = all(r["teacher"] != str(ckpt) for r in rows)
            solvers, nfes = scale if first else ((), ())
            model_row, solver_rows = score_run(root / f"run{k}", ckpt, eval_seeds, (solvers, nfes))
            rows.append(
                {
                    "variant": v.name,
                    "rmse": model_row.rmse,
                    "compute": model_row.compute,  # the sample's measured cost / one teacher evaluation
                    "train_s": seconds,
                    **kw,
                    "times": v.times,
                    "time_kind": v.time_kind,
                    "teacher": str(ckpt),
                    "solvers": solver_rows,
                    "num": num,
                    "ddim10": solver_rows.get("ddim@10"),
                }
            )
    return rows


PLACEMENT_SCALE = (("ddim", "dpmpp-2m", "unipc"), (3, 5, 10))


def placement_variants(lr: float) -> list[Variant]:
    """DSNO at each opdiff-unet placement preset, the demo's settings otherwise (issue 18's quality check)."""
    return [
        Variant(f"placement {p}", train=(("lr", lr), ("placement", p))) for p in ("full", "through-up1", "through-mid")
    ]


def run_placements(root: Path | None = None) -> list[dict]:
    """Quality of each placement preset on the demo's data and budget, with the fair solvers on the same seeds."""
    from ..demo import DEMO

    return run_ablations(root, placement_variants(DEMO.lr), DEMO.lr, scale=PLACEMENT_SCALE)


def x0_teacher(root: Path) -> Path:
    """The x₀-prediction digits teacher of the levers study: the shipped one if present, else trained here with
    the shipped ε teacher's recipe (`opdiff teacher train --data digits --max-steps 4000 --lr-decay cosine
    --prediction x0`, about 8 minutes on 2 CPU cores)."""
    from ..fid import ASSETS
    from ..teacher import TeacherConfig, train_teacher
    from ..training import reset_accelerate_state

    if (ASSETS / X0_TEACHER_FILE).is_file():
        return ASSETS / X0_TEACHER_FILE
    out = root / "x0-teacher"
    result = train_teacher(
        TeacherConfig(data="digits", out=str(out), max_steps=4000, lr_decay="cosine", prediction="x0")
    )
    reset_accelerate_state()
    return Path(result.checkpoint)


def lever_variants(x0_checkpoint: Path, lr: float) -> list[Variant]:
    """The one-step quality levers of issue 14, each against the demo's own settings."""
    base = (("lr", lr),)
    return [
        Variant("demo settings (L1, sqrt-SNR weights, ε teacher)", train=base),
        Variant("last frame weight 1e4 (the reference's ~99.9% share)", train=base + (("final_weight", 1e4),)),
        Variant("pseudo-Huber loss (iCT c)", train=base + (("loss", "pseudo-huber"),)),
        Variant("L2 loss", train=base + (("loss", "l2"),)),
        Variant("x₀-prediction teacher (its own trajectories and reference)", train=base, teacher=str(x0_checkpoint)),
    ]


def demo_lever_variants(lr: float, baseline_lr: float) -> list[Variant]:
    """Levers at the demo's budget, each for DSNO and for the baseline (which gets its own learning rate)."""
    no_dropout = ("backbone_options", {"dropout": 0.0})
    skip = ("output_skip", "fit")
    rows = []
    for who, base in (("DSNO", (("lr", lr),)), ("baseline", (("lr", baseline_lr), ("baseline", True)))):
        rows += [
            Variant(f"{who}: demo settings", train=base),
            Variant(f"{who}: output skip", train=base + (skip,)),
            Variant(f"{who}: dropout 0", train=base + (no_dropout,)),
            Variant(f"{who}: output skip, dropout 0", train=base + (skip, no_dropout)),
        ]
    rows.append(Variant("DSNO: 3 Fourier modes", train=(("lr", lr), ("modes", 3))))
    rows.append(Variant("DSNO: 3 Fourier modes, dropout 0", train=(("lr", lr), ("modes", 3), no_dropout)))
    for who, base in (("DSNO", (("lr", lr),)), ("baseline", (("lr", baseline_lr), ("baseline", True)))):
        for ema in (0.9, 0.999):  # the EMA decay, at the demo's settings after dropout 0 (the demo's EMA: 0.99)
            rows.append(Variant(f"{who}: dropout 0, EMA {ema:g}", train=base + (no_dropout, ("ema", ema))))
    # batch size at the demo's compute (batch × steps = 64 000 trajectory draws) and the learning-rate schedule,
    # run after the demo took dropout 0 (its rows: "…: dropout 0, EMA …" and the dropout-0 rows above)
    for who, base, rate in (
        ("DSNO", (("baseline", False),), lr),
        ("baseline", (("baseline", True),), baseline_lr),
    ):
        common = base + (no_dropout,)
        for batch, steps, scale in ((32, 2000, 0.5), (32, 2000, 1.0), (128, 500, 1.0), (128, 500, 2.0)):
            rows.append(
                Variant(
                    f"{who}: dropout 0, batch {batch} × {steps} steps, lr {rate * scale:g}",
                    train=common + (("lr", rate * scale), ("batch_size", batch), ("max_steps", steps)),
                )
            )
        for decay in ("constant", "linear"):
            rows.append(
                Variant(f"{who}: dropout 0, {decay} schedule", train=common + (("lr", rate), ("lr_decay", decay)))
            )
        rows.append(Variant(f"{who}: dropout 0, warm-up 200 steps", train=common + (("lr", rate), ("warmup", 200))))
    # the two that helped DSNO, again from another initialisation and batch order, and together
    small = (("lr", lr), ("batch_size", 32), ("max_steps", 2000), no_dropout)
    rows += [
        Variant("DSNO: dropout 0, seed 1", train=(("lr", lr), no_dropout, ("seed", 1))),
        Variant(f"DSNO: dropout 0, batch 32 × 2000 steps, lr {lr:g}, seed 1", train=small + (("seed", 1),)),
        Variant(
            "DSNO: dropout 0, warm-up 200 steps, seed 1", train=(("lr", lr), no_dropout, ("warmup", 200), ("seed", 1))
        ),
        Variant(
            f"DSNO: dropout 0, batch 32 × 2000 steps, lr {lr:g}, warm-up 400 steps", train=small + (("warmup", 400),)
        ),
    ]
    for seed in (1, 2):  # the modes lever again, from other initialisations and batch orders (TrainConfig.seed)
        rows.append(Variant(f"DSNO: demo settings, seed {seed}", train=(("lr", lr), ("seed", seed))))
        rows.append(Variant(f"DSNO: 3 Fourier modes, seed {seed}", train=(("lr", lr), ("modes", 3), ("seed", seed))))
    return rows


def run_levers(root: Path | None = None) -> list[dict]:
    from ..demo import DEMO

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(root or tmp)
        chosen = lever_variants(x0_teacher(root), DEMO.lr)
        return run_ablations(root, chosen, DEMO.lr, scale=(("ddim", "dpmpp-2m", "unipc"), (5, 10)))
