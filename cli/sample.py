"""`opdiff sample`: one-NFE samples of a trained DSNO run (and, with --teacher, the teacher's samples for the
same seeds), written as a PNG folder, an .npz and grid images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ._common import console, err_console, fail, progress_bar, read_prompts, resolve_device

DEFAULT_NUM = 64


def parse_formats(items: list[str]) -> list[str]:
    """``["png,npz", "grid"]`` → ``["png", "npz", "grid"]``; unknown names are a usage error."""
    from operator_diffusion.sampling import FORMATS

    formats = [f.strip() for item in items for f in item.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        fail(
            f"unknown --format {', '.join(bad) or '(empty)'}; valid: {', '.join(FORMATS)} (repeatable or "
            "comma-separated)"
        )
    return list(dict.fromkeys(formats))


def parse_time_list(spec: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        fail(f"bad {flag} {spec!r}: give comma-separated times, e.g. 0.5,0.25,0.001")
    if not values:
        fail(f"{flag} is empty")
    return values


def select_times(spec: str, times: list[float]) -> list[int]:
    """Indices of the frames to keep: ``final`` (the sample), ``all``, or a list of times among ``times``."""
    if spec == "final":
        return [len(times) - 1]
    if spec == "all":
        return list(range(len(times)))
    wanted = parse_time_list(spec, "--times")
    idx = []
    for w in wanted:
        hits = [i for i, t in enumerate(times) if abs(t - w) <= 1e-6 * max(1.0, abs(t))]
        if not hits:
            fail(
                f"--times {w:g} is not an output time of this model; its times are "
                f"{', '.join(f'{t:.6g}' for t in times)}"
            )
        idx.append(hits[0])
    return sorted(set(idx))


def resolve_seeds(
    seeds: Optional[str], num: Optional[int], info: dict, held_out_of: tuple[dict, ...] = ()
) -> list[int]:
    """Explicit --seeds, else --num seeds held out from training: starting after the collection's seeds. Explicit
    seeds that overlap the training seeds of any run in ``held_out_of`` (those whose numbers are reported) are a
    usage error."""
    from operator_diffusion.seeds import check_held_out, held_out_seeds, parse_seeds, training_seeds

    if num is not None and num < 1:
        fail(f"--num must be at least 1 (got {num})")
    if seeds is not None:
        try:
            out = parse_seeds(seeds)
        except ValueError as e:
            fail(str(e))
        if num is not None and num != len(out):
            fail(f"--num {num} but --seeds lists {len(out)} seeds; give one of them or make them agree")
        try:
            check_held_out(out, [training_seeds(i) for i in held_out_of], "--seeds")
        except ValueError as e:
            fail(str(e))
        return out
    return held_out_seeds(num or DEFAULT_NUM, (info, *held_out_of))


def load_run_or_fail(path, dev: str, what: str = "the run"):
    """(DSNO, info) of a run folder or DSNO checkpoint; anything unloadable is a one-line usage error."""
    from operator_diffusion.sampling import load_model

    try:
        return load_model(path, device=dev)
    except FileNotFoundError as e:
        fail(f"{what}: {e}")
    except (ValueError, RuntimeError) as e:
        fail(f"cannot load {what} {str(path)!r}: {e}")


def _progress_loop(batches, total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    with progress_bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        for batch in batches:
            yield batch
            progress.advance(task, len(batch.seeds))


def sample(
    run: Path = typer.Argument(..., help="An `opdiff train` run folder (or a DSNO .safetensors checkpoint)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the samples into."),
    num: Optional[int] = typer.Option(
        None, "--num", "-n", help=f"Number of samples (default {DEFAULT_NUM}, or the number of --seeds)."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="Seeds, e.g. 0-49999 or 0,5,9 (default: --num seeds right after the training seeds)."
    ),
    formats: list[str] = typer.Option(
        ["png", "grid"], "--format", help="png (images/ folder for FID), npz, grid; repeatable or comma-separated."
    ),
    times: str = typer.Option(
        "final",
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
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per forward pass (does not change the images)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    teacher: bool = typer.Option(
        False,
        "--teacher",
        help="Also sample the same seeds with the teacher (into OUT/teacher) for side-by-side output.",
    ),
    teacher_checkpoint: Optional[Path] = typer.Option(
        None, "--teacher-checkpoint", help="The teacher's weights (default: the run's --init-from file)."
    ),
    solver: Optional[str] = typer.Option(None, "--solver", help="Teacher solver (default: the collection's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Teacher solver steps (default: the collection's)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Teacher time grid kind (default: the collection's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the sample files already in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
) -> None:
    """One-NFE samples of a trained DSNO (one forward pass per batch); --teacher adds the teacher's samples."""
    fmts = parse_formats(formats)
    if batch_size < 1:
        fail(f"--batch-size must be at least 1 (got {batch_size})")
    if not teacher and (teacher_checkpoint or solver or steps or grid):
        fail("--teacher-checkpoint/--solver/--steps/--grid only apply with --teacher")
    if teacher and query_times:
        fail("--teacher samples the final time only; drop --query-times (or run twice)")
    if steps is not None and steps < 1:
        fail(f"--steps must be at least 1 (got {steps})")
    dev = resolve_device(device)

    from operator_diffusion import sampling as sp

    model, info = load_run_or_fail(run, dev)
    bb = model.backbone
    seed_list = resolve_seeds(seeds, num, info)
    prompt_list = [*prompt, *(read_prompts(prompts, None) or ())]
    coll_prompts = info.get("collection", {}).get("prompts") or {}
    try:
        label_mode = sp.parse_labels(labels, bb.num_classes)
        table = sp.sample_prompts(bb, prompt_list, coll_prompts.get("negative_prompt", ""))
    except ValueError as e:
        fail(str(e))
    query = None
    if query_times is not None:
        query = parse_time_list(query_times, "--query-times")
        try:
            model.query_times(query)
        except ValueError as e:
            fail(f"bad --query-times: {e}")
    out_times = [float(t) for t in (model.times if query is None else query)]
    keep = select_times(times, out_times)

    teacher_solver = teacher_model = teacher_nfe = None
    guidance = info.get("collection", {}).get("guidance") if table is not None else None  # the teacher's W
    if teacher:
        if not info:
            fail("--teacher needs a run folder (a bare checkpoint does not record its teacher)")
        try:
            teacher_solver = sp.run_solver(info, solver, steps, grid)
            teacher_model = sp.run_teacher(info, teacher_checkpoint)
            teacher_nfe = teacher_solver.nfe(teacher_model.schedule)  # also validates solver and grid
        except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
            fail(f"cannot set up the teacher: {e}")

    meta = {
        "source": "dsno",
        "run": str(run),
        "seeds": seeds or f"{seed_list[0]}-{seed_list[-1]}",
        "labels": label_mode,
        "query_times": query,
        **({"prompts": prompt_list} if table is not None else {}),
        **sp.summary(model, info),
    }
    writer = sp.SampleWriter(out, fmts, meta, overwrite)
    teacher_writer = None
    if teacher:
        tmeta = {
            "source": "teacher",
            "run": str(run),
            "seeds": meta["seeds"],
            "labels": label_mode,
            "solver": teacher_solver.describe(),
            "nfe": teacher_nfe,
            **(
                {"prompts": prompt_list, "guidance": guidance, "negative_prompt": table.negative_prompt}
                if table
                else {}
            ),
        }
        teacher_writer = sp.SampleWriter(out / "teacher", fmts, tmeta, overwrite)
    try:
        writer.check(len(keep) > 1)
        if teacher_writer is not None:
            teacher_writer.check(False)
    except FileExistsError as e:
        fail(str(e))

    import torch

    try:
        # only the frames asked for: the blocks after the last temporal layer run on them alone (frame pruning)
        batches = sp.dsno_batches(model, seed_list, label_mode, query, batch_size, dev, frames=keep, prompts=table)
        for batch in _progress_loop(batches, len(seed_list), "DSNO (1 NFE)"):
            if not torch.isfinite(batch.outputs).all():
                fail(f"DSNO produced NaN/Inf for seeds among {batch.seeds[:5]}…; the checkpoint is broken", code=1)
            writer.add(batch)
        files = writer.close()
        if teacher_writer is not None:
            tb = sp.teacher_batches(
                teacher_model, seed_list, teacher_solver, label_mode, batch_size, dev, guidance, prompts=table
            )
            for batch in _progress_loop(tb, len(seed_list), f"teacher {teacher_solver.describe()}"):
                teacher_writer.add(batch)
            tfiles = teacher_writer.close()
            files.update({f"teacher_{k}": v for k, v in tfiles.items()})
            if "grid" in fmts:
                sp.side_by_side(files["grid"], tfiles["grid"], out / "side_by_side.png")
                files["side_by_side"] = str(out / "side_by_side.png")
    except (ValueError, RuntimeError) as e:
        fail(f"sampling failed: {e}", code=1)

    if as_json:
        typer.echo(
            json.dumps(
                {"num": len(seed_list), "seeds": meta["seeds"], "times": [out_times[i] for i in keep], "files": files},
                indent=2,
            )
        )
        return
    console.print(
        f"{len(seed_list)} samples (seeds {meta['seeds']}) at t = {', '.join(f'{out_times[i]:.4g}' for i in keep)}"
    )
    for what, path in files.items():
        console.print(f"  {what}: {path}")
