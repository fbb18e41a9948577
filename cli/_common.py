"""Shared helpers of the `opdiff` commands: table-or-JSON listings and one-line usage errors."""

from __future__ import annotations

import json
from typing import Any, NoReturn, Sequence

import typer
from rich.console import Console
from rich.table import Table

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


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error (what is wrong and what to do) to stderr and exit with ``code`` (2: usage)."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_options(items: Sequence[str] | None, flag: str = "--backbone-option") -> dict[str, Any]:
    """``["preset=tiny", "num_classes=10"]`` → ``{"preset": "tiny", "num_classes": 10}`` (values parsed as
    JSON when they are JSON, else kept as strings); a malformed item is a usage error."""
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            fail(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} preset=tiny)")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def resolve_device(device: str) -> str:
    """``--device``: "auto" (CUDA when available, else the CPU) or a torch device that exists here (else exit 2)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        fail(f"bad --device {device!r}: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return device
