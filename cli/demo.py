"""`opdiff demo`: the whole DSNO pipeline on the embedded digits and the shipped teacher, with a report."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import console, err_console, fail, progress_bar


def demo(
    out: Path = typer.Option(
        Path("opdiff-demo"), "--out", "-o", help="Folder for the data, runs, images and report.md."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A smaller run (≤ 2 minutes on 2 CPU cores) that checks the pipeline."
    ),
) -> None:
    """Collect → train DSNO and the one-step baseline → sample → spectrum → bench on the 8×8 digits (≤ 10 min, CPU)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from operator_diffusion.demo import DEMO, QUICK, check_demo_out, run_demo

    if out.exists():
        try:
            check_demo_out(out)
        except ValueError as e:
            fail(f"{e}; choose a new or empty --out")

    config = QUICK if quick else DEMO
    with progress_bar(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        try:
            result = run_demo(out, config, progress)
        except FileNotFoundError as e:
            fail(str(e), code=1)
        except ValueError as e:  # e.g. --out holds a demo of another configuration
            fail(f"{e}; choose another --out", code=2)
    dsno = result.bench.row("DSNO")
    console.print(
        f"DSNO, 1 NFE: RMSE {dsno.rmse:.4f} to the teacher" + (f", FID {dsno.fid:.3f}" if dsno.fid is not None else "")
    )
    console.print(f"report: {result.report}  ({sum(result.seconds.values()):.0f} s)")
