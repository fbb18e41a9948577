"""Shared helpers of the `opdiff` commands: table-or-JSON listings and one-line usage errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn, Sequence

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

console = Console()
err_console = Console(stderr=True)


def print_rows(rows: Sequence[dict[str, Any]], columns: dict[str, str], title: str, as_json: bool) -> None:
    """Print ``rows`` as JSON (every key) or as a rich table of ``columns`` (row key -> column header)."""
    if as_json:
        typer.echo(json.dumps(list(rows), indent=2))
        return
    table = Table(title=title)
    for i, header in enumerate(columns.values()):
        table.add_column(header, no_wrap=i == 0, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for key in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v!r}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def print_error(message: str) -> None:
    """The one ``error:`` line on stderr."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (what is wrong and what to do) to stderr and exit with ``code`` (2: usage)."""
    print_error(message)
    raise typer.Exit(code)


INTERRUPTED = (
    "interrupted: run the same command again to resume (collect, train and teacher train go on from their last "
    "complete shard or checkpoint)"
)


class OneLineErrors(TyperGroup):
    """The command group whose command-line errors (a flag of the wrong type, a missing or unknown flag, an unknown
    command) are one ``error:`` line naming the help to read, exit code 2, like every other usage error; Click
    prints the usage, a hint and (through Typer) a framed box. Ctrl-C (SIGINT) is one ``INTERRUPTED`` line and exit
    code 130 (Typer's code, which alone says nothing)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            err_console.print(INTERRUPTED, highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        import sys

        try:  # Typer >= 0.20 runs on its own copy of Click
            from typer._click.exceptions import ClickException
        except ImportError:
            from click.exceptions import ClickException

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code, or the command's None
        except ClickException as e:
            message, ctx = " ".join(e.format_message().split()), getattr(e, "ctx", None)
            if message:  # (none when a group without its command printed its help)
                print_error(message + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
            sys.exit(e.exit_code)
        except typer.Abort:
            err_console.print("Aborted!")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def one_line_warnings() -> None:
    """Show each Python warning of this command once, as one ``warning:`` line on stderr (not Python's two lines
    with a file name and a source line): a backbone built several times in one run (the student, the teacher)
    warns once."""
    import warnings

    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if text not in seen:
            seen.add(text)
            err_console.print(f"[yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    warnings.showwarning = show


def as_text(path: Path | None) -> str | None:
    """A path flag as a config's text field (None stays None)."""
    return None if path is None else str(path)


def parse_options(items: Sequence[str] | None, flag: str = "--backbone-option") -> dict[str, Any]:
    """``["preset=tiny", "num_classes=10"]`` → ``{"preset": "tiny", "num_classes": 10}`` (``configs.parse_key_values``);
    a malformed item is a usage error."""
    from operator_diffusion.configs import parse_key_values

    try:
        return parse_key_values(items, flag)
    except ValueError as e:
        fail(str(e))


def check_seed_flag(seed: int, count: int = 1) -> None:
    """``--seed`` (the first of ``count`` consecutive seeds) in 0..2^63 − 1, else a usage error."""
    from operator_diffusion.seeds import check_seed

    try:
        check_seed(seed, count)
    except ValueError as e:
        fail(str(e))


def resolve_device(device: str) -> str:
    """``--device``: "auto" (CUDA when available, else the CPU) or a torch device that exists here (else exit 2)."""
    from operator_diffusion.provenance import resolve_device as resolve

    try:
        return resolve(device)
    except ValueError as e:
        fail(str(e))


class PlainProgress:
    """What a rich ``Progress`` bar offers the commands (``add_task``, ``update``, ``advance``, ``tasks[id]``), as
    plain lines for output that is not a terminal (nohup, CI, notebooks), where a rich bar shows only when its
    stage ends: a line when a task starts, then at every further 10% or 30 s, and when it completes."""

    EVERY_FRACTION, EVERY_SECONDS = 0.10, 30.0

    class _Task:
        def __init__(self, description: str, total: float | None, fields: dict):
            import time

            self.description, self.total, self.completed, self.fields = description, total, 0.0, dict(fields)
            self.start = self.last_time = time.monotonic()
            self.last_step, self.finished = -1, False  # last reported multiple of EVERY_FRACTION
            self.speed = None  # rich's steps/s column is a terminal nicety

    def __init__(self, console: Console):
        self.console = console
        self.tasks: list[PlainProgress._Task] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self.tasks.append(self._Task(description, total, fields))
        self._report(len(self.tasks) - 1, force=True)
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, completed: float | None = None, advance: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if completed is not None:
            t.completed = completed
        if advance is not None:
            t.completed += advance
        t.fields.update({k: v for k, v in fields.items() if k not in ("total", "description")})
        self._report(task)

    def _report(self, task: int, force: bool = False) -> None:
        import time

        t, now = self.tasks[task], time.monotonic()
        fraction = t.completed / t.total if t.total else 0.0
        step = int(fraction / self.EVERY_FRACTION + 1e-9)  # multiples of 10% reached
        done = bool(t.total) and t.completed >= t.total
        due = step > t.last_step or now - t.last_time >= self.EVERY_SECONDS
        if t.finished or not (force or due or done):
            return
        t.last_step, t.last_time, t.finished = step, now, done
        total = f"/{t.total:g} ({100 * fraction:.0f}%)" if t.total else ""
        extra = "".join(f", {k} {v}" for k, v in t.fields.items() if v not in (None, "-"))
        self.console.print(f"{t.description}: {t.completed:g}{total}{extra}, {now - t.start:.0f} s", highlight=False)


def progress_bar(*columns, console: Console, transient: bool = False, plain_console: Console | None = None):
    """A rich ``Progress`` with ``columns`` on ``console`` when it is a terminal, else ``PlainProgress`` lines on
    ``plain_console`` (default: the same console)."""
    if console.is_terminal:
        from rich.progress import Progress

        return Progress(*columns, console=console, transient=transient)
    return PlainProgress(plain_console or console)


def stage_progress(bar):
    """A ``progress(label, done, total)`` callback of the library's stages on ``bar`` (``progress_bar``): one task
    per label, added on its first report."""
    tasks: dict[str, int] = {}

    def progress(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return progress


def run_with_training_bar(label: str, total: int, loss_key: str, run, console: Console):
    """``run(progress)`` under a bar of optimizer steps with the loss (``metrics[loss_key]``), steps/s and ETA:
    the bar of `opdiff train` and `opdiff teacher train`. Returns what ``run`` returns."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} it/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with progress_bar(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total, loss="-", rate="-")

        def progress(step: int, total: int, metrics: dict) -> None:
            speed = bar.tasks[task].speed
            bar.update(task, completed=step, loss=f"{metrics[loss_key]:.4g}", rate=f"{speed:.2f}" if speed else "-")

        return run(progress)


def read_prompts(path: Path | None, column: str | None) -> tuple[str, ...] | None:
    """The prompts of ``--prompts FILE`` (``prompts.read_prompt_file``), or None without the flag."""
    from operator_diffusion.prompts import read_prompt_file

    if path is None:
        if column is not None:
            fail("--prompt-column needs --prompts FILE")
        return None
    try:
        return read_prompt_file(path, column)
    except (OSError, ValueError) as e:
        fail(str(e))
