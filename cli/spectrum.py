"""`opdiff spectrum`: the temporal power spectrum of a teacher's ODE trajectories (DSNO Appendix A.1) and
the number of Fourier modes that hold a given share of its energy, the recommended `--modes` for training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import (
    check_seed_flag,
    console,
    err_console,
    fail,
    parse_options,
    print_rows,
    progress_bar,
    resolve_device,
)

MIN_POINTS = 16  # below this the spectrum has fewer than 9 modes: too coarse to choose --modes from
SHOWN_MODES = 8  # rows of the energy table


def _check_inputs(
    backbone: Optional[str],
    checkpoint: Optional[Path],
    backbone_options: list[str],
    oracle: Optional[str],
    points: int,
    num: int,
    batch: int,
    energy: float,
    solver: str,
    what: str,
    steps: int,
    dim: int,
) -> None:
    """Refuse bad flags with a one-line error before anything is loaded or written."""
    from operator_diffusion.solvers import available_solvers
    from operator_diffusion.spectrum import ORACLE_KINDS, WHAT

    teacher = backbone is not None or checkpoint is not None
    if teacher == (oracle is not None):
        fail("give exactly one teacher: --backbone NAME (and/or --checkpoint PATH) or --oracle gaussian|mixture")
    if oracle is not None and oracle not in ORACLE_KINDS:
        fail(f"unknown --oracle {oracle!r}; valid: {', '.join(ORACLE_KINDS)}")
    if oracle is not None and backbone_options:
        fail("--backbone-option only applies to --backbone")
    checks = [
        (points >= MIN_POINTS, f"--points must be at least {MIN_POINTS} (got {points}): the paper samples 1000 points"),
        (num >= 1, f"--num must be at least 1 (got {num})"),
        (batch >= 1, f"--batch must be at least 1 (got {batch})"),
        (0 < energy <= 1, f"--energy must be in (0, 1] (got {energy}), e.g. 0.99"),
        (steps >= 1, f"--steps-per-interval must be at least 1 (got {steps})"),
        (dim >= 1, f"--dim must be at least 1 (got {dim})"),
        (what in WHAT, f"unknown --what {what!r}; valid: {', '.join(WHAT)}"),
        (solver in available_solvers(), f"unknown --solver {solver!r}; valid: {', '.join(available_solvers())}"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    if oracle is not None:  # float64 states of --dim values
        _check_size(num, points, batch, steps, dim, 8, "--dim")
    else:  # float32 states of a size known once the backbone is built: a bound for any, until then
        _check_size(num, points, batch, steps, None, 4)


def _check_size(num: int, points: int, batch: int, steps: int, values: Optional[int], itemsize: int, flag=None):
    """``spectrum.check_spectrum_size``'s one-line refusal (exit 2)."""
    from operator_diffusion.spectrum import check_spectrum_size

    try:
        check_spectrum_size(num, points, batch, steps, values, itemsize, flag)
    except ValueError as e:
        fail(str(e))


def _load_teacher(backbone: Optional[str], checkpoint: Optional[Path], options: dict[str, Any], device: str):
    """The backbone by name (weights from --checkpoint if given) or rebuilt from the checkpoint's own config
    (``backbones.load_teacher``)."""
    from operator_diffusion.backbones import load_teacher

    try:
        model = load_teacher(backbone, checkpoint, **options)
    except (ValueError, TypeError, ImportError, OSError) as e:  # OSError: a missing path, an unloadable Hub id
        fail(f"cannot load the backbone: {e}")
    if model.state_shape != model.image_shape:
        fail(f"opdiff spectrum takes α/σ teachers; {model.name!r} is a {model.schedule.name} (phase-space) teacher")
    return model.to(device).eval()


def _per_trajectory_spectra(make_batch, num: int, batch: int) -> tuple[list, int, float]:
    """Run ``make_batch(start, size) -> Trajectories`` over all batches with a progress bar on stderr;
    returns the per-trajectory spectra, the NFE spent and Δ."""

    from operator_diffusion.spectrum import per_trajectory_spectrum

    rows, nfe, dt = [], 0, 0.0
    with progress_bar(console=err_console, transient=True) as progress:
        task = progress.add_task("trajectories", total=num)
        for start in range(0, num, batch):
            size = min(batch, num - start)
            traj = make_batch(start, size)
            rows.append(per_trajectory_spectrum(traj.values, traj.dt))
            nfe, dt = nfe + traj.nfe, traj.dt
            progress.advance(task, size)
    return rows, nfe, dt


def spectrum(
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Teacher backbone name (see `opdiff backbones`)."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Backbone weights (.safetensors); alone, the backbone is rebuilt from its metadata."
    ),
    backbone_option: list[str] = typer.Option(
        [], "--backbone-option", "-o", help="Backbone constructor option KEY=VALUE (repeatable), e.g. preset=tiny."
    ),
    oracle: Optional[str] = typer.Option(
        None, "--oracle", help="Exact teacher instead of a backbone: gaussian | mixture."
    ),
    dim: int = typer.Option(64, "--dim", help="Dimension of the --oracle data."),
    num: int = typer.Option(64, "--num", help="Number of trajectories."),
    points: int = typer.Option(
        1000, "--points", help=f"Uniform time points per trajectory (≥ {MIN_POINTS}; the paper: 1000)."
    ),
    solver: str = typer.Option("deis", "--solver", help="ODE solver of a backbone teacher (see `opdiff solvers`)."),
    steps_per_interval: int = typer.Option(
        1, "--steps-per-interval", help="Solver steps between consecutive time points."
    ),
    what: str = typer.Option(
        "state",
        "--what",
        help="Spectrum of the ODE states x(t) or of the denoised predictions x̂_0(t): state | denoised.",
    ),
    energy: float = typer.Option(0.99, "--energy", help="Share of the energy the recommended modes must hold."),
    seed: int = typer.Option(0, "--seed", help="Seed of x_T (and of the oracle's data, and of class labels)."),
    batch: int = typer.Option(16, "--batch", help="Trajectories solved at once."),
    device: str = typer.Option("auto", "--device", help="Device of a backbone teacher: auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Write spectrum.png, spectrum.csv and spectrum.json into this folder."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing spectrum files in --out."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Power spectrum of a teacher's ODE trajectories (DSNO App. A.1) and the recommended --modes."""
    _check_inputs(
        backbone, checkpoint, backbone_option, oracle, points, num, batch, energy, solver, what, steps_per_interval, dim
    )
    check_seed_flag(seed)
    options = parse_options(backbone_option, "--backbone-option")
    if out is not None and not overwrite:
        from operator_diffusion.spectrum import report_paths

        existing = [str(p) for p in report_paths(out).values() if p.exists()]
        if existing:
            fail(f"{', '.join(existing)} already exist(s); pass --overwrite or choose another --out")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {str(out)!r} is a file, not a folder")

    import torch

    from operator_diffusion import spectrum as sp

    generator = torch.Generator().manual_seed(seed)
    if oracle is not None:
        # tiny float64 tensors: intra-op threads only add synchronisation (measured on 2 loaded cores: the
        # 16-trajectory DOP853 mixture flow took 10 s on two threads, 0.8 s on one)
        torch.set_num_threads(1)
        teacher = sp.toy_oracle(oracle, dim, seed)
        x_all = sp.sample_prior(teacher, num, generator)
        source = {"teacher": f"oracle:{oracle}", "dim": dim, "schedule": teacher.schedule.config(), "solver": "exact"}

        def make_batch(start: int, size: int):
            return sp.exact_trajectories(teacher, x_all[start : start + size], points, what)
    else:
        dev = resolve_device(device)
        model = _load_teacher(backbone, checkpoint, options, dev)
        _check_size(num, points, batch, steps_per_interval, math.prod(model.image_shape), 4)
        s = model.schedule
        x_all = torch.randn((num, *model.image_shape), generator=generator) * float(
            s.sigma(torch.tensor(s.t_max, dtype=torch.float64))
        )
        labels = torch.randint(model.num_classes, (num,), generator=generator) if model.num_classes else None
        source = {"teacher": model.config(), "solver": solver, "steps_per_interval": steps_per_interval, "device": dev}

        def make_batch(start: int, size: int):
            extra = None if labels is None else {"labels": labels[start : start + size].to(dev)}
            with torch.inference_mode():
                return sp.dense_trajectories(
                    model.eps_fn,
                    s,
                    x_all[start : start + size].to(dev, model.dtype),
                    points,
                    solver,
                    steps_per_interval,
                    extra,
                    what,
                )

    try:
        rows, nfe, dt = _per_trajectory_spectra(make_batch, num, batch)
        result = sp.spectrum_from_per_trajectory(torch.cat(rows), dt, points)
    except (ValueError, FloatingPointError, RuntimeError) as e:
        fail(f"cannot compute the spectrum: {e}", code=1)
    modes = sp.modes_for_energy(result, energy)
    meta = {**source, "what": what, "seed": seed, "nfe": nfe}
    files = {}
    if out is not None:
        files = {k: str(v) for k, v in sp.spectrum_report(result, out, energy, meta, overwrite=overwrite).items()}
    _print_result(result, modes, energy, meta, files, as_json)


def _print_result(result, modes: int, energy: float, meta: dict, files: dict, as_json: bool) -> None:
    """The recommended --modes, the energy held by the first modes, and the files written."""
    from operator_diffusion.spectrum import modes_for_energy

    shown = range(1, min(SHOWN_MODES, result.num_modes) + 1)
    rows = [
        {"modes": j, "energy_fraction": float(result.energy_fraction[j - 1]), "mean_power": float(result.mean[j - 1])}
        for j in shown
    ]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "recommended_modes": modes,
                    "energy": energy,
                    "min_output_times": max(1, 2 * (modes - 1)),
                    "modes_for_energy": {str(f): modes_for_energy(result, f) for f in (0.9, 0.99, 0.999)},
                    "n_points": result.n_points,
                    "dt": result.dt,
                    "num_trajectories": result.num_trajectories,
                    "first_modes": rows,
                    "metadata": meta,
                    "files": files,
                },
                indent=2,
            )
        )
        return
    table = [
        {"modes": r["modes"], "energy": f"{r['energy_fraction']:.6f}", "power": f"{r['mean_power']:.4g}"} for r in rows
    ]
    print_rows(
        table,
        {"modes": "modes kept J", "energy": "energy fraction", "power": "S of mode J−1"},
        f"power spectrum of {result.num_trajectories} trajectories at {result.n_points} points",
        False,
    )
    for path in files.values():
        console.print(f"wrote {path}")
    console.print(
        f"recommended --modes {modes} (holds {energy:g} of the energy; M output times keep at most M//2+1 modes, "
        f"so it needs M ≥ {max(1, 2 * (modes - 1))})"
    )
