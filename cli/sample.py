"""`opdiff sample`: one-NFE samples of a trained DSNO run (and, with --teacher, the teacher's samples for the
same seeds), written as a PNG folder, an .npz and grid images. The flags map to a ``SampleConfig``;
``sampling.plan_sample`` checks it against the run, ``sampling.run_sample`` draws and writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from operator_diffusion.configs import SAMPLE_NUM, SampleConfig, field_default

from ._common import as_text, console, err_console, fail, progress_bar, read_prompts, stage_progress


def _default(name: str):
    return field_default(SampleConfig, name)


def sample(
    run: Path = typer.Argument(..., help="An `opdiff train` run folder (or a DSNO .safetensors checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the samples into."),
    num: Optional[int] = typer.Option(
        None, "--num", "-n", help=f"Number of samples (default {SAMPLE_NUM}, or the number of --seeds)."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Seeds, e.g. 0-49999 or 0,5,9 (default: --num seeds right after the training seeds)."
    ),
    formats: list[str] = typer.Option(
        list(_default("formats")),
        "--format",
        help="png (images/ folder for FID), npz, grid; repeatable or comma-separated.",
    ),
    times: str = typer.Option(
        _default("times"),
        "--times",
        help="Outputs to keep: final (the sample), all (the trajectory, paper Fig. 2) or a list of output times.",
    ),
    query_times: Optional[str] = typer.Option(
        None,
        "--query-times",
        help="Evaluate the operator at these times instead of its training times (App. A.3), e.g. "
        "0.8,0.6,0.4,0.2,0.05,0.001.",
    ),
    labels: Optional[str] = typer.Option(
        None,
        "--labels",
        help="Class-conditional models: random (default), one class, or a list (seed s gets list[s mod len]).",
    ),
    prompt: list[str] = typer.Option(
        [], "--prompt", help="Text-conditioned models: a prompt (repeatable; seed s gets prompt s mod their number)."
    ),
    prompts: Optional[Path] = typer.Option(
        None, "--prompts", help="Text-conditioned models: a file of prompts, one per line (after any --prompt)."
    ),
    batch_size: int = typer.Option(
        _default("batch_size"), "--batch-size", help="Samples per forward pass (does not change the images)."
    ),
    device: str = typer.Option(_default("device"), "--device", help="auto | cpu | cuda | cuda:N."),
    compile: bool = typer.Option(
        _default("compile"),
        "--compile",
        help="Run DSNO (and --teacher) under torch.compile: 1.1-1.3x faster on CPU after a one-off compile of "
        "about a minute per batch shape, for many samples (changes only float round-off; falls back to eager with "
        "a warning where compiling fails).",
    ),
    teacher: bool = typer.Option(
        _default("teacher"),
        "--teacher",
        help="Also sample the same seeds with the teacher (into OUT/teacher) for side-by-side output.",
    ),
    teacher_checkpoint: Optional[Path] = typer.Option(
        None, "--teacher-checkpoint", help="The teacher's weights (default: the run's --init-from file)."
    ),
    solver: Optional[str] = typer.Option(None, "--solver", help="Teacher solver (default: the collection's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Teacher solver steps (default: the collection's)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Teacher time grid kind (default: the collection's)."),
    overwrite: bool = typer.Option(
        _default("overwrite"), "--overwrite", help="Replace the sample files already in --out."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """One-NFE samples of a trained DSNO (one forward pass per batch); --teacher adds the teacher's samples."""
    from operator_diffusion import configs as C

    try:
        config = SampleConfig(
            run=str(run),
            out=str(out),
            num=num,
            seeds=seeds,
            formats=C.split_items(formats),
            times=times,
            query_times=None if query_times is None else C.parse_time_list(query_times, "--query-times"),
            labels=labels,
            prompts=(*prompt, *(read_prompts(prompts, None) or ())),
            batch_size=batch_size,
            device=device,
            compile=compile,
            teacher=teacher,
            teacher_checkpoint=as_text(teacher_checkpoint),
            solver=solver,
            steps=steps,
            grid=grid,
            overwrite=overwrite,
        )
        from operator_diffusion import sampling as sp

        plan = sp.plan_sample(config)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # FileExistsError: an occupied --out
        fail(str(e))

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with progress_bar(*columns, console=err_console, transient=True) as bar:
        try:
            files = sp.run_sample(plan, stage_progress(bar))
        except sp.NonFiniteSamples as e:
            fail(str(e), code=1)
        except (ValueError, RuntimeError) as e:
            fail(f"sampling failed: {e}", code=1)

    kept = [plan.out_times[i] for i in plan.keep]
    seeds_text = plan.meta["seeds"]
    if as_json:
        typer.echo(json.dumps({"num": len(plan.seeds), "seeds": seeds_text, "times": kept, "files": files}, indent=2))
        return
    console.print(f"{len(plan.seeds)} samples (seeds {seeds_text}) at t = {', '.join(f'{t:.4g}' for t in kept)}")
    for what, path in files.items():
        console.print(f"  {what}: {path}")
