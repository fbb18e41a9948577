"""`opdiff bench`: the paper's Table 1 for the user's own teacher — DSNO at 1 NFE, the one-step baseline and
the training-free solvers at k NFE against the teacher's reference solution on held-out seeds. The flags map to a
``BenchConfig``; ``bench.plan_bench`` checks and resolves it, ``bench.run_bench`` runs it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from operator_diffusion.configs import BENCH_NUM, BenchConfig, field_default

from ._common import as_text, console, err_console, fail, progress_bar, read_prompts, stage_progress


def _default(name: str):
    return field_default(BenchConfig, name)


def bench(
    run: Path = typer.Argument(..., help="The `opdiff train` run folder of the DSNO model."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="A run trained with `--baseline one-step` on the same data."
    ),
    num: Optional[int] = typer.Option(
        None, "--num", "-n", help=f"Held-out samples per method (default {BENCH_NUM}, or the number of --seeds)."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Seeds (default: --num seeds right after the training seeds)."
    ),
    solvers: Optional[str] = typer.Option(
        None,
        "--solvers",
        help="Training-free solvers to compare (see `opdiff solvers`); default ddim,deis,dpmpp-2m,unipc (PSLD "
        "teachers: euler,lambda-ddim,rse,csps-d; `opdiff solvers --schedule psld`).",
    ),
    nfe: str = typer.Option(",".join(map(str, _default("nfes"))), "--nfe", help="NFE budgets of the solvers."),
    grid: Optional[str] = typer.Option(
        None,
        "--grid",
        help="One time grid for every solver (default: each solver's own, docs/bench.md; PSLD teachers: the "
        "collection's).",
    ),
    solver_grid: list[str] = typer.Option(
        [], "--solver-grid", help="A solver's grid, SOLVER=GRID (e.g. unipc=logsnr); repeatable."
    ),
    solver_options: list[str] = typer.Option(
        [],
        "--solver-options",
        help="A solver's options, SOLVER:KEY=VALUE[,KEY=VALUE] (e.g. unipc:order=2,variant=bh1); repeatable.",
    ),
    tune: bool = typer.Option(
        _default("tune"),
        "--tune",
        help="Pick each solver's grid and options per NFE by RMSE on tuning seeds disjoint from the reported ones.",
    ),
    tune_seeds: Optional[str] = typer.Option(
        None, "--tune-seeds", help="The tuning seeds of --tune (default: 128 seeds after the reported ones)."
    ),
    reference_solver: Optional[str] = typer.Option(
        None, "--reference-solver", help="Solver of the teacher's reference solution (default: the collection's)."
    ),
    reference_steps: Optional[int] = typer.Option(
        None, "--reference-steps", help="Its steps (default: the collection's)."
    ),
    teacher_checkpoint: Optional[Path] = typer.Option(
        None, "--teacher-checkpoint", help="The teacher's weights (default: the run's --init-from file)."
    ),
    labels: Optional[str] = typer.Option(
        None, "--labels", help="Class-conditional teachers: random (default), one class or a list."
    ),
    prompt: list[str] = typer.Option(
        [], "--prompt", help="Text-conditioned teachers: a prompt (repeatable; seed s gets prompt s mod their number)."
    ),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Text-conditioned teachers: a file of prompts, one per line (after any --prompt)."
    ),
    ref: Optional[str] = typer.Option(
        None,
        "--ref",
        help="FID reference (image folder, digits, .npz, statistics .npz, datasets id, cleanfid:NAME/RES/SPLIT); adds "
        "an FID column.",
    ),
    feature_extractor: str = typer.Option(
        _default("feature_extractor"),
        "--feature-extractor",
        help="FID features: inception | digits | PATH to a FeatureNet.",
    ),
    inception_path: Optional[Path] = typer.Option(
        None, "--inception-path", help="Local InceptionV3 torchscript weights."
    ),
    ref_num: Optional[int] = typer.Option(None, "--ref-num", help="Use the first N reference images."),
    cache_dir: Optional[Path] = typer.Option(
        None,
        "--cache-dir",
        help="Where reference statistics are cached (default fid/ under $OPDIFF_CACHE, else ~/.cache/opdiff/fid).",
    ),
    offline: bool = typer.Option(
        _default("offline"),
        "--offline",
        help="Download nothing for the run or the FID: the Inception weights are never downloaded, and a Hub RUN or "
        "--baseline is read from the Hub cache only (HF_HUB_OFFLINE=1 does this and more).",
    ),
    batch_size: int = typer.Option(
        _default("batch_size"), "--batch-size", help="Samples per batch (does not change the results)."
    ),
    device: str = typer.Option(_default("device"), "--device", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write bench.md and bench.json into this folder."),
    overwrite: bool = typer.Option(_default("overwrite"), "--overwrite", help="Replace bench.md/bench.json in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """DSNO at 1 NFE vs the baseline and the solvers at k NFE: teacher-match error, FID, wall time."""
    from operator_diffusion import configs as C

    try:
        config = BenchConfig(
            run=str(run),
            baseline=as_text(baseline),
            num=num,
            seeds=seeds,
            solvers=None if solvers is None else C.split_items([solvers]),
            nfes=C.parse_int_list(nfe, "--nfe"),
            grid=grid,
            solver_grids=C.parse_solver_grids(solver_grid),
            solver_options=C.parse_solver_options(solver_options),
            tune=tune,
            tune_seeds=tune_seeds,
            reference_solver=reference_solver,
            reference_steps=reference_steps,
            teacher_checkpoint=as_text(teacher_checkpoint),
            labels=labels,
            prompts=(*prompt, *(read_prompts(prompts, None) or ())),
            ref=ref,
            feature_extractor=feature_extractor,
            inception_path=as_text(inception_path),
            ref_num=ref_num,
            cache_dir=as_text(cache_dir),
            offline=offline,
            batch_size=batch_size,
            device=device,
            out=as_text(out),
            overwrite=overwrite,
        )
        from operator_diffusion.bench import FIDComputeError, plan_bench, run_bench

        setup = plan_bench(config)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    for warning in setup.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}")

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err_console, transient=True
    ) as bar:
        try:
            result = run_bench(setup, stage_progress(bar))
        except FIDComputeError as e:
            fail(str(e))
        except (ValueError, RuntimeError) as e:
            fail(f"bench failed: {e}", code=1)

    if sys.argv and "opdiff" in sys.argv[0]:
        result.meta["command"] = "opdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if out is not None:
        result.save(out)
    if as_json:
        typer.echo(result.to_json())
        return
    typer.echo(result.report())  # raw markdown: a terminal-wide rich wrap would break the table rows
    if out is not None:
        console.print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
