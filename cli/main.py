"""The `opdiff` command line (Typer). Commands only map flags to library calls and print results;
heavy imports happen inside the commands so that `opdiff --help` stays fast."""

from __future__ import annotations

import typer

from ._common import OneLineErrors, console, fail, one_line_warnings, print_rows

app = typer.Typer(
    cls=OneLineErrors,
    help="opdiff: one-step sampling of pretrained diffusion models by operator learning (DSNO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    """--version, handled while the flags are parsed (a group callback would first demand a command)."""
    if value:
        from operator_diffusion import __version__

        console.print(f"opdiff {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print the opdiff version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    one_line_warnings()


@app.command()
def solvers(
    schedule: str = typer.Option(
        "vp", "--schedule", help="Whose solvers: vp (every α/σ schedule: VP, EDM, VE, discrete) or psld."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the teacher ODE solvers, their orders and options (--schedule psld: the PSLD integrators)."""
    from operator_diffusion.schedules import PSLD
    from operator_diffusion.solvers import available_solvers, solver_info

    if schedule not in ("vp", "psld"):
        fail(f"unknown --schedule {schedule!r}; valid: vp, psld")
    process = PSLD() if schedule == "psld" else None
    rows = [
        {
            "name": s.name,
            "order": s.order,
            "nfe_per_step": s.nfe_per_step,
            "stochastic": s.stochastic,
            "options": s.options,
            "summary": s.summary,
        }
        for s in (solver_info(name, process) for name in available_solvers(process))
    ]
    columns = {
        "name": "name",
        "order": "global order",
        "nfe_per_step": "NFE/step",
        **({"stochastic": "SDE"} if process is not None else {}),
        "options": "options",
        "summary": "what it is",
    }
    print_rows(rows, columns, f"opdiff solvers for {schedule} (use with solve(..., method=NAME, **options))", as_json)


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the installed backbones (entry-point group `opdiff.backbones`) and where each comes from."""
    from operator_diffusion.backbones import available_backbones, backbone_origin

    rows = [{"name": name, "provided_by": backbone_origin(name)} for name in available_backbones()]
    print_rows(
        rows,
        {"name": "name", "provided_by": "provided by"},
        "opdiff backbones (use with load_backbone(NAME, ...))",
        as_json,
    )


from .inspect import inspect as _inspect  # noqa: E402

app.command("inspect")(_inspect)


from .spectrum import spectrum as _spectrum  # noqa: E402

app.command("spectrum")(_spectrum)


from .train import train as _train  # noqa: E402

app.command("train")(_train)


from .collect import collect as _collect  # noqa: E402
from .collect import data_app as _data_app  # noqa: E402

app.command("collect")(_collect)
app.add_typer(_data_app, name="data")


from .sample import sample as _sample  # noqa: E402

app.command("sample")(_sample)


from .fid import fid as _fid  # noqa: E402

app.command("fid")(_fid)


from .bench import bench as _bench  # noqa: E402

app.command("bench")(_bench)


from .push import push as _push  # noqa: E402

app.command("push")(_push)


from .teacher import teacher_app as _teacher_app  # noqa: E402

app.add_typer(_teacher_app, name="teacher")


from .demo import demo as _demo  # noqa: E402

app.command("demo")(_demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
