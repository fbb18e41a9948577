"""The `opdiff` command line (Typer). Commands only map flags to library calls and print results."""
import typer

app = typer.Typer(help="opdiff: one-step diffusion sampling by operator learning (DSNO).", no_args_is_help=True)


def main() -> None:
    app()
