"""The `opdiff` command line (Typer). Commands only map flags to library calls and print results;
heavy imports happen inside the commands so that `opdiff --help` stays fast."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="opdiff: one-step sampling of pretrained diffusion models by operator learning (DSNO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the opdiff version and exit.", is_eager=True),
) -> None:
    if version:
        from operator_diffusion import __version__

        console.print(f"opdiff {__version__}")
        raise typer.Exit()


@app.command()
def solvers(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the teacher ODE solvers, their orders and options."""
    from operator_diffusion.solvers import available_solvers, solver_info

    specs = [solver_info(name) for name in available_solvers()]
    if as_json:
        rows = [
            {"name": s.name, "order": s.order, "nfe_per_step": s.nfe_per_step, "options": s.options, "summary": s.summary}
            for s in specs
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="opdiff solvers (use with solve(..., method=NAME, **options))")
    table.add_column("name", no_wrap=True)
    for col in ("global order", "NFE/step", "options", "what it is"):
        table.add_column(col, overflow="fold")
    for s in specs:
        opts = ", ".join(f"{k}={v!r}" for k, v in s.options.items()) or "-"
        table.add_row(s.name, s.order, str(s.nfe_per_step), opts, s.summary)
    console.print(table)


@app.command()
def backbones(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the installed backbones (entry-point group `opdiff.backbones`) and where each comes from."""
    from operator_diffusion.backbones import available_backbones, backbone_origin

    rows = [{"name": name, "provided_by": backbone_origin(name)} for name in available_backbones()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="opdiff backbones (use with load_backbone(NAME, ...))")
    table.add_column("name", no_wrap=True)
    table.add_column("provided by", overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["provided_by"])
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
