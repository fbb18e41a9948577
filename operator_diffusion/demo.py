"""`opdiff demo`: the whole DSNO pipeline on the embedded default — scikit-learn's 8×8 digits and the teacher
shipped with opdiff — on a laptop CPU: collect → train DSNO (and the one-step baseline) → sample → spectrum →
bench, with a markdown report.

Every stage is the library call the matching command makes (``collect``, ``train``, ``dsno_batches``,
``dense_trajectories``, ``run_bench``), so the demo is also the integration test of the pipeline. Stages
resume: collection shards and training checkpoints already in ``out`` are reused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .configs import BenchConfig
from .fid import ASSETS, DIGITS_FEATURENET, DIGITS_STATS  # the digits feature network and its reference statistics

DIGITS_TEACHER = ASSETS / "digits_teacher.safetensors"  # `opdiff teacher train --data digits` (assets/README.md)

Progress = Callable[[str, int, int], None]  # progress(stage, done, total)
REFERENCE_SOLVER = "unipc"  # the bench's reference solution: UniPC with DemoConfig.reference_steps (quadratic grid)
REFERENCE_OPTIONS = {"order": 3}  # at 50 steps order 3 is the more accurate (below 15 steps order 2 wins)


def reference_solver(steps: int, t_end: float):
    """The teacher's reference solution of the demo, the ablations and the solver-grid study."""
    from .sampling import TeacherSolver

    return TeacherSolver(REFERENCE_SOLVER, steps, "quadratic", t_end, "denoised", dict(REFERENCE_OPTIONS))


def reference_fields(steps: int) -> dict[str, Any]:
    """``reference_solver`` as the reference fields of a ``BenchConfig`` (the demo's and the ablations' benches)."""
    return {
        "reference_solver": REFERENCE_SOLVER,
        "reference_steps": steps,
        "reference_grid": "quadratic",
        "reference_options": dict(REFERENCE_OPTIONS),
    }


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of each stage. ``DEMO`` fits ≤ 10 minutes on 2 CPU cores of the slower, AVX2-only kind with a margin
    for a slow day on a shared machine (measured there: 479 s in all, DSNO's 2000 steps at batch 32 in 307 s, the
    baseline's 1000 at batch 64 in 95 s, collection 3.8–5.1 ms per trajectory in fp32; docs/benchmarks.md, demo),
    ``QUICK`` ≤ 2 minutes."""

    num: int = 12288  # trajectories collected (docs/benchmarks.md, demo; sized for AVX2-only CPUs)
    solver: str = "deis"  # teacher solver of the collection: DEIS-15 (16 NFE) is 0.020 RMSE from
    steps: int = 15  # UniPC-50, closer than UniPC-20 (0.032), at 3/4 of its cost
    precision: str = "auto"  # measured on the machine: bf16 autocast only where it is faster (docs/collect.md)
    times: int = 4  # M output times
    # DSNO's and the baseline's batch × steps are equal (64,000 trajectory draws), each at its own best split:
    # DSNO batch 32 × 2000 with a 400-step warm-up (-6.9% against 64 × 1000 with 50), the baseline 64 × 1000 with 50
    # (batch 32: +1-2%, a longer warm-up +0.6%) (docs/benchmarks.md, demo-levers §)
    train_steps: int = 2000  # DSNO optimizer steps
    batch_size: int = 32  # DSNO's
    baseline_train_steps: int = 1000
    baseline_batch_size: int = 64
    lr: float = 2e-3  # 2e-3: RMSE 0.132 / FID 0.534; 1e-3: 0.125 / 0.648 (docs/demo.md)
    lr_decay: str = "cosine"
    baseline_lr: float = 2e-3  # the baseline's own best of 1e-3 … 8e-3 at this budget (docs/benchmarks.md, baseline-lr)
    warmup: int = 400  # DSNO's linear warm-up steps
    baseline_warmup: int = 50
    loss: str = "l1"  # DSNO's and the baseline's loss (docs/benchmarks.md, levers)
    final_weight: float | None = None  # DSNO's weight of the last output time (None: sqrt-SNR, ~77% of the loss)
    ema: float = 0.99
    modes: int = (
        2  # 3 (all of M = 4's rfft modes): -2.3% over three seeds, inside their spread (benchmarks, demo-levers)
    )
    # both samplers' backbone dropout (the teacher's 0.1 otherwise): 0 helps DSNO (-2.6%) and the baseline (-5.5%)
    # at this budget (benchmarks, demo-levers, whose "demo settings" rows had 0.1), so neither runs with a handicap
    dropout: float = 0.0
    samples: int = 64  # images in the sample grids
    bench_num: int = 512  # held-out seeds in the bench table
    bench_nfes: tuple[int, ...] = (1, 2, 3, 5, 10)
    bench_solvers: tuple[str, ...] = ("ddim", "deis", "dpmpp-2m", "unipc")
    reference_steps: int = 50  # the bench's reference solution (unipc, quadratic grid)
    spectrum_num: int = 16
    spectrum_points: int = 256
    collect_batch: int = 512

    def sampler_settings(self, baseline: bool) -> dict[str, Any]:
        """``TrainConfig`` fields in which DSNO and the one-step baseline differ: each sampler's own learning rate,
        batch, steps and warm-up (the same trajectory draws, each at its own best split)."""
        if baseline:
            return {
                "lr": self.baseline_lr,
                "batch_size": self.baseline_batch_size,
                "max_steps": self.baseline_train_steps,
                "warmup": self.baseline_warmup,
            }
        return {"lr": self.lr, "batch_size": self.batch_size, "max_steps": self.train_steps, "warmup": self.warmup}


DEMO = DemoConfig()
QUICK = replace(
    DEMO,
    num=512,
    train_steps=80,
    warmup=10,
    baseline_train_steps=40,
    baseline_warmup=5,
    samples=16,
    bench_num=64,
    bench_nfes=(1, 2, 5, 10),
    bench_solvers=("ddim", "unipc"),
    reference_steps=20,
    spectrum_num=4,
    spectrum_points=64,
)


def digits_teacher():
    """The shipped digits teacher (an ``opdiff-unet``, preset ``digits``), ready to sample."""
    from .backbones import backbone_from_checkpoint

    if not DIGITS_TEACHER.is_file():
        raise FileNotFoundError(
            f"the shipped digits teacher is missing ({DIGITS_TEACHER}); reinstall opdiff or retrain "
            "it with `opdiff teacher train --data digits` (see docs/teacher.md)"
        )
    return backbone_from_checkpoint(DIGITS_TEACHER).eval()


def build_digits_featurenet(epochs: int = 30, seed: int = 0) -> dict[str, Any]:
    """Train the shipped digits feature network (a ``FeatureNet`` classifier on all 1,797 digits but a 10%
    hold-out) and write it with the digits' reference statistics into the package's assets; returns the
    accuracies. How the shipped files were made: ``python -c "from operator_diffusion.demo import
    build_digits_featurenet as b; print(b())"``."""
    from .fid import FeatureNetExtractor, stats_of_images, train_feature_net
    from .images import load_images

    digits = load_images("digits")
    torch.manual_seed(seed)
    net, metrics = train_feature_net(digits, epochs=epochs, seed=seed)
    ASSETS.mkdir(exist_ok=True)
    net.save(DIGITS_FEATURENET)
    stats = stats_of_images(digits, FeatureNetExtractor(DIGITS_FEATURENET))
    stats.save(DIGITS_STATS)
    return {**metrics, "extractor": stats.extractor, "n": stats.n}


@dataclass
class DemoResult:
    out: Path
    report: Path
    seconds: dict[str, float]
    bench: Any


# what run_demo writes into its folder (a demo folder holds nothing else)
DEMO_ENTRIES = (
    "data",
    "run",
    "baseline",
    "samples",
    "trajectories",
    "spectrum",
    "side_by_side.png",
    "bench.json",
    "report.md",
)


def check_demo_out(out: Path) -> None:
    """Refuse a --out that holds anything the demo does not write (the user's files, another tool's output):
    the demo overwrites its own report, samples and bench.json there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES and not p.name.startswith("."))
    if out.is_dir() and foreign:
        raise ValueError(
            f"--out {str(out)!r} holds files the demo does not write ({', '.join(foreign[:3])}), and the demo "
            "replaces its own files there"
        )


def bench_config(out: Path, c: DemoConfig, seeds: tuple[int, ...]) -> BenchConfig:
    """The demo's bench of ``out/run`` and ``out/baseline`` on ``seeds``, on the CPU: ``c``'s solvers and NFEs
    against its reference solution (``reference_solver``), FID with the shipped digits network and statistics."""
    fid = {"ref": str(DIGITS_STATS), "feature_extractor": str(DIGITS_FEATURENET)} if DIGITS_FEATURENET.is_file() else {}
    if fid and not DIGITS_STATS.is_file():
        fid["ref"] = "digits"
    return BenchConfig(
        run=str(out / "run"),
        baseline=str(out / "baseline"),
        seeds=seeds,
        solvers=c.bench_solvers,
        nfes=c.bench_nfes,
        device="cpu",
        **reference_fields(c.reference_steps),
        **fid,
    )


def run_demo(out: str | Path, config: DemoConfig = DEMO, progress: Progress | None = None) -> DemoResult:
    """Run every stage into ``out`` (new, or an earlier demo's folder: ``check_demo_out``) and write
    ``out/report.md``."""
    from .bench import plan_bench, run_bench
    from .collection import collect
    from .collection_plan import CollectConfig
    from .sampling import SampleWriter, dsno_batches, side_by_side, teacher_batches
    from .training import TrainConfig, load_run, reset_accelerate_state, train

    out = Path(out)
    if out.exists():
        check_demo_out(out)
    out.mkdir(parents=True, exist_ok=True)
    c = config
    report = lambda stage: (lambda done, total: progress(stage, done, total)) if progress else None  # noqa: E731
    seconds: dict[str, float] = {}
    teacher = digits_teacher()

    start = time.perf_counter()
    collected = collect(
        teacher,
        out / "data",
        CollectConfig(
            num=c.num,
            solver=c.solver,
            steps=c.steps,
            times=c.times,
            precision=c.precision,
            batch_size=c.collect_batch,
            shard_size=min(4096, c.num),
        ),
        checkpoint=DIGITS_TEACHER,
        progress=_count(report("collect"), c.num),
    )
    seconds["collect"] = time.perf_counter() - start
    precision = collected.info["collection"]["precision"]  # "auto" resolved by measuring on this machine

    runs = {"DSNO": (out / "run", False), "one-step baseline": (out / "baseline", True)}
    for name, (path, baseline) in runs.items():
        settings = c.sampler_settings(baseline)
        start = time.perf_counter()
        stage = report(f"train {name}")
        train(
            TrainConfig(
                data=str(out / "data"),
                out=str(path),
                init_from=str(DIGITS_TEACHER),
                backbone_options={"dropout": c.dropout},
                modes=c.modes,
                lr_decay=c.lr_decay,
                ema=c.ema,
                loss=c.loss,
                final_weight=None if baseline else c.final_weight,
                save_every=settings["max_steps"],
                **settings,
                log_every=10,
                baseline=baseline,
            ),
            progress=None if stage is None else (lambda step, total, m, s=stage: s(step, total)),
        )
        reset_accelerate_state()
        seconds[f"train {name}"] = time.perf_counter() - start
    model, info = load_run(out / "run")

    # samples: DSNO's trajectories and the teacher's samples for the same held-out seeds
    start = time.perf_counter()
    seeds = list(range(c.num, c.num + c.samples))
    writer = SampleWriter(out / "samples", ("png", "grid"), {"source": "dsno", "run": str(out / "run")}, overwrite=True)
    for batch in dsno_batches(model, seeds):
        writer.add(batch)
    writer.close()
    ref_solver = reference_solver(c.reference_steps, float(model.times[-1]))
    twriter = SampleWriter(out / "samples" / "teacher", ("png", "grid"), {"source": "teacher"}, overwrite=True)
    for batch in teacher_batches(teacher, seeds, ref_solver):
        twriter.add(batch)
    twriter.close()
    side_by_side(out / "samples" / "grid.png", out / "samples" / "teacher" / "grid.png", out / "side_by_side.png")
    strips = SampleWriter(out / "trajectories", ("grid",), {"source": "dsno", "times": "all"}, overwrite=True)
    strips.add(next(dsno_batches(model, seeds[:16])))  # all M outputs: trajectories.png, one per row
    strips.close()
    seconds["sample"] = time.perf_counter() - start

    # spectrum of the teacher's trajectories (Appendix A.1)
    start = time.perf_counter()
    spectrum = _spectrum(teacher, out / "spectrum", c)
    seconds["spectrum"] = time.perf_counter() - start

    # bench: Table 1 with FID against the digits (the shipped feature network), as `opdiff bench` plans it
    start = time.perf_counter()
    bench_seeds = range(c.num + c.samples, c.num + c.samples + c.bench_num)
    setup = plan_bench(bench_config(out, c, tuple(bench_seeds)))
    result = run_bench(setup, None if progress is None else (lambda label, d, t: progress(f"bench: {label}", d, t)))
    seconds["bench"] = time.perf_counter() - start
    if result.meta["fid"] is not None:
        result.meta["fid"]["reference"] = "the digits"
    result.meta["command"] = "opdiff demo" + ("" if c == DEMO else " --quick")
    (out / "bench.json").write_text(result.to_json() + "\n")
    path = out / "report.md"
    path.write_text(_report(replace(c, precision=precision), result, spectrum, seconds, info))
    return DemoResult(out, path, seconds, result)


def _count(stage: Callable[[int, int], None] | None, total: int):
    """collect's progress reports trajectories done so far; the stage bar wants (done, total)."""
    if stage is None:
        return None
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        stage(done[0], total)

    return advance


def _spectrum(teacher, folder: Path, c: DemoConfig) -> dict[str, Any]:
    from .spectrum import (
        dense_trajectories,
        modes_for_energy,
        per_trajectory_spectrum,
        spectrum_from_per_trajectory,
        spectrum_report,
    )

    g = torch.Generator().manual_seed(10**6)
    x = torch.randn((c.spectrum_num, *teacher.image_shape), generator=g)
    with torch.inference_mode():
        traj = dense_trajectories(teacher.eps_fn, teacher.schedule, x, c.spectrum_points, "deis", 1, None, "denoised")
    result = spectrum_from_per_trajectory(per_trajectory_spectrum(traj.values, traj.dt), traj.dt, c.spectrum_points)
    spectrum_report(result, folder, 0.99, {"teacher": "digits", "what": "denoised"}, overwrite=True)
    return {
        "modes_99": modes_for_energy(result, 0.99),
        "modes_999": modes_for_energy(result, 0.999),
        "energy_2": float(result.energy_fraction[1]),
    }


def training_text(c: DemoConfig) -> str:
    """How the two samplers trained: the same trajectory draws, each at its own batch, steps and warm-up."""
    return (
        f"DSNO {c.train_steps} steps at batch {c.batch_size} (warm-up {c.warmup}, lr {c.lr:g}) and the one-step "
        f"baseline {c.baseline_train_steps} steps at batch {c.baseline_batch_size} (warm-up {c.baseline_warmup}, "
        f"lr {c.baseline_lr:g}), {c.lr_decay} decay: the same {c.train_steps * c.batch_size:,} trajectory draws"
    )


def _report(c: DemoConfig, result, spectrum: dict, seconds: dict, info: dict) -> str:
    dsno = result.row("DSNO")
    base = result.row("one-step baseline")
    lines = [
        "# opdiff demo: DSNO on the 8×8 digits",
        "",
        f"Teacher: the shipped digits `opdiff-unet` ({DIGITS_TEACHER.name}). Trajectories: {c.num} from {c.solver} "
        f"with {c.steps} steps (teacher in {c.precision}), M = {c.times} output times. {training_text(c)}, "
        f"dropout {c.dropout:g}, initialised from the teacher. Reference solution of the table: "
        f"{REFERENCE_SOLVER} with {c.reference_steps} steps.",
        "",
        "## Samples (same seeds): DSNO, 1 NFE | teacher",
        "",
        "![samples](side_by_side.png)",
        "",
        "## DSNO trajectories (t_1 … t_M, left to right; paper Figure 2)",
        "",
        "![trajectories](trajectories/trajectories.png)",
        "",
        "## Spectrum of the teacher's x̂₀ trajectories (Appendix A.1)",
        "",
        f"![spectrum](spectrum/spectrum.png)  \n{spectrum['modes_99']} modes hold 99% of the energy "
        f"({spectrum['modes_999']} hold 99.9%); DSNO keeps {c.modes}, which hold {spectrum['energy_2']:.4f}.",
        "",
        "## Table 1 on held-out seeds",
        "",
        result.report(with_verdict=False),
        "",
        "## Verdict",
        "",
    ]
    from .bench import verdict

    lines += [f"- {line}" for line in verdict(result, "DSNO")]
    lines.append(
        f"- one-step baseline (same data, steps and network, its own learning rate): RMSE {base.rmse:.4f} "
        f"(DSNO's error is {dsno.rmse / base.rmse:.2f}× the baseline's)"
        + (f", FID {base.fid:.3f} vs DSNO {dsno.fid:.3f}" if dsno.fid is not None else "")
    )
    ref = result.row("teacher reference")
    if dsno.fid is not None:
        lines.append(f"- FID: DSNO {dsno.fid:.3f}, teacher {ref.fid:.3f} (ratio {dsno.fid / ref.fid:.2f})")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
    lines += [f"| total | {sum(seconds.values()):.1f} |", ""]
    return "\n".join(lines)
