"""`opdiff bench`: the paper's Table 1 for the user's own teacher — DSNO at 1 NFE, the one-step baseline and
the training-free solvers at k NFE against the teacher's reference solution on held-out seeds."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from ._common import console, err_console, fail, progress_bar, read_prompts, resolve_device
from .sample import load_run_or_fail, resolve_seeds

DEFAULT_NUM = 1000


def _int_list(spec: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        fail(f"bad {flag} {spec!r}: give comma-separated integers, e.g. 1,2,3,5,10,20")
    if not values or min(values) < 1:
        fail(f"{flag} needs positive integers, got {spec!r}")
    return sorted(set(values))


def parse_solver_grids(items: list[str], solvers: list[str], kinds) -> dict[str, str]:
    """``["unipc=logsnr"]`` → ``{"unipc": "logsnr"}``; unknown solvers or grids are usage errors."""
    out = {}
    for item in items:
        name, sep, g = item.partition("=")
        if not sep or name.strip() not in solvers or g.strip() not in kinds:
            fail(
                f"bad --solver-grid {item!r}: give SOLVER=GRID with SOLVER among --solvers ({', '.join(solvers)}) "
                f"and GRID among {', '.join(kinds)}"
            )
        out[name.strip()] = g.strip()
    return out


def parse_solver_options(items: list[str], solvers: list[str]) -> dict[str, dict]:
    """``["unipc:order=2,variant=bh1"]`` → ``{"unipc": {"order": 2, "variant": "bh1"}}`` (values parsed as JSON)."""
    from ._common import parse_options

    out: dict[str, dict] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or name.strip() not in solvers:
            fail(
                f"bad --solver-options {item!r}: give SOLVER:KEY=VALUE[,KEY=VALUE] with SOLVER among --solvers "
                f"({', '.join(solvers)}), e.g. unipc:order=2"
            )
        out.setdefault(name.strip(), {}).update(parse_options(rest.split(","), "--solver-options"))
    return out


def bench(
    run: Path = typer.Argument(..., help="The `opdiff train` run folder of the DSNO model."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="A run trained with `--baseline one-step` on the same data."
    ),
    num: Optional[int] = typer.Option(
        None, "--num", "-n", help=f"Held-out samples per method (default {DEFAULT_NUM}, or the number of --seeds)."
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
    nfe: str = typer.Option("1,2,3,5,10,20", "--nfe", help="NFE budgets of the solvers."),
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
        False,
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
        "inception", "--feature-extractor", help="FID features: inception | digits | PATH to a FeatureNet."
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
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per batch (does not change the results)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write bench.md and bench.json into this folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace bench.md/bench.json in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
) -> None:
    """DSNO at 1 NFE vs the baseline and the solvers at k NFE: teacher-match error, FID, wall time."""
    nfes = _int_list(nfe, "--nfe")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1 (got {batch_size})")
    if reference_steps is not None and reference_steps < 1:
        fail(f"--reference-steps must be at least 1 (got {reference_steps})")
    if ref is None and (ref_num is not None or inception_path is not None or cache_dir is not None):
        fail("--ref-num/--inception-path/--cache-dir only apply with --ref")
    if out is not None:
        existing = [str(out / f) for f in ("bench.md", "bench.json") if (out / f).exists()]
        if out.exists() and not out.is_dir():
            fail(f"--out {str(out)!r} is a file, not a folder")
        if existing and not overwrite:
            fail(f"{', '.join(existing)} already exist(s); pass --overwrite or choose another --out")
    dev = resolve_device(device)

    from operator_diffusion import sampling as sp
    from operator_diffusion.bench import BenchSetup, default_solvers, run_bench
    from operator_diffusion.schedules import GRID_KINDS

    if grid is not None and grid not in GRID_KINDS:
        fail(f"unknown --grid {grid!r}; valid: {', '.join(GRID_KINDS)}")
    model, info = load_run_or_fail(run, dev, "the DSNO run")
    if not info:
        fail(f"{str(run)!r} is a bare checkpoint; bench needs the run folder (it records the teacher and its data)")
    models = {"DSNO": model} if not model.baseline else {"one-step baseline": model}
    if baseline is not None:
        base, binfo = load_run_or_fail(baseline, dev, "the baseline run")
        if tuple(base.backbone.image_shape) != tuple(model.backbone.image_shape):
            fail(
                f"the baseline makes images of shape {base.backbone.image_shape}, the DSNO run "
                f"{model.backbone.image_shape}"
            )
        if binfo.get("data_content_sha256") != info.get("data_content_sha256"):
            err_console.print("[yellow]warning:[/] the baseline was trained on other data than the DSNO run")
        models["one-step baseline" if base.baseline else "second model"] = base
    infos = (info,) if baseline is None else (info, binfo)
    seed_list = resolve_seeds(seeds, num if num is not None or seeds is not None else DEFAULT_NUM, info, infos)
    if tune_seeds is not None and not tune:
        fail("--tune-seeds only applies with --tune")
    from operator_diffusion.bench import check_tune_seeds, default_tune_seeds, training_seeds

    tune_list = None
    if tune:
        try:
            tune_list = sp.parse_seeds(tune_seeds) if tune_seeds is not None else default_tune_seeds(seed_list)
            check_tune_seeds(tune_list, seed_list, [training_seeds(i) for i in infos])
        except ValueError as e:
            fail(str(e))
    try:
        label_mode = sp.parse_labels(labels, model.backbone.num_classes)
        reference = sp.run_solver(info, reference_solver, reference_steps)
        teacher = sp.run_teacher(info, teacher_checkpoint)
        reference.nfe(teacher.schedule)
        negative = (info["collection"].get("prompts") or {}).get("negative_prompt", "")
        prompt_table = sp.sample_prompts(teacher, [*prompt, *(read_prompts(prompts, None) or ())], negative)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        fail(f"cannot set up the teacher: {e}")
    from operator_diffusion.solvers import available_solvers

    solver_list = (
        list(default_solvers(teacher.schedule))
        if solvers is None
        else [s.strip() for s in solvers.split(",") if s.strip()]
    )
    valid = available_solvers(teacher.schedule)  # a PSLD teacher has its own solvers
    unknown = [s for s in solver_list if s not in valid]
    if unknown:
        fail(
            f"unknown --solvers {', '.join(unknown)} for the {teacher.schedule.name} teacher; valid: {', '.join(valid)}"
        )
    grids = parse_solver_grids(solver_grid, solver_list, GRID_KINDS)
    options = parse_solver_options(solver_options, solver_list)
    from operator_diffusion.bench import solver_choice

    try:
        for name in solver_list:  # deterministic, on a grid the schedule takes (PSLD: uniform or quadratic)
            choice = solver_choice(
                name, teacher.schedule, grid or grids.get(name), options.get(name), info["collection"]["grid"]
            )
            sp.TeacherSolver(name, 1, choice.grid, reference.t_end, "state", choice.options).nfe(teacher.schedule)
    except (ValueError, TypeError) as e:
        fail(f"bad --solvers/--grid/--solver-grid/--solver-options: {e}")

    fid_fn, fid_meta = None, None
    if ref is not None:
        from operator_diffusion import fid as F

        try:
            extractor = F.load_extractor(feature_extractor, inception_path, dev)
            ref_stats = F.reference_stats(ref, extractor, ref_num, cache_dir=cache_dir, device=dev)
        except (ValueError, FileNotFoundError) as e:
            fail(f"cannot set up FID: {e}")
        warn = F.small_sample_warning(ref_stats, "the reference")
        if warn:
            err_console.print(f"[yellow]warning:[/] {warn}")
        fid_meta = {"reference": ref, "extractor": extractor.id, "n_reference": ref_stats.n}

        def fid_fn(pixels):
            try:
                return F.fid_of_pixels(pixels, ref_stats, extractor, device=dev)
            except ValueError as e:
                fail(f"cannot compute FID: {e}")

    setup = BenchSetup(
        teacher,
        reference,
        seed_list,
        label_mode,
        solver_list,
        nfes,
        grid,
        models,
        fid_fn,
        batch_size,
        dev,
        info["collection"].get("guidance"),
        grids,
        options,
        tune_list,
        tuple(training_seeds(i) for i in infos),
        info["collection"]["grid"],
        prompts=prompt_table,
    )

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn

    with progress_bar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=err_console, transient=True
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done)

        try:
            result = run_bench(setup, progress)
        except (ValueError, RuntimeError) as e:
            fail(f"bench failed: {e}", code=1)

    from operator_diffusion.provenance import machine

    command = (
        "opdiff " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "opdiff" in sys.argv[0] else None
    )
    result.meta.update(
        {
            "run": str(run),
            "seeds": f"{seed_list[0]}-{seed_list[-1]}" if seeds is None else seeds,
            "machine": machine(),
            "command": command,
            "fid": fid_meta,
            "baseline": None if baseline is None else str(baseline),
        }
    )
    text = result.report()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(text + "\n")
        (out / "bench.json").write_text(result.to_json() + "\n")
    if as_json:
        typer.echo(result.to_json())
        return
    typer.echo(text)  # raw markdown: a terminal-wide rich wrap would break the table rows
    if out is not None:
        console.print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
