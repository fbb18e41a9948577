"""The repository contract: README's two commands are what CI runs; the CLI lists its commands."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks]


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    setup, tests = cmds[1].split(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{setup}\n" in ci and f"\n{tests}\n" in ci, (setup, tests, ci)


def test_code_passes_the_linter_and_the_formatter():
    """``ruff check`` and ``ruff format --check`` on the whole tree (pyproject's [tool.ruff]: line length 120)."""
    for args in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        r = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"ruff {' '.join(args)}:\n{r.stdout}{r.stderr}"


def test_top_level_layout():
    allowed = {
        "pyproject.toml",
        "operator_diffusion",
        "plugins",
        "cli",
        "tests",
        "docs",
        "README.md",
        ".ci",
        ".gitignore",
        ".git",
    }
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if tracked:  # inside a git checkout
        assert {p.split("/")[0] for p in tracked} <= allowed


def test_cli_help_and_solvers_listing():
    run = [sys.executable, "-m", "opdiff_cli.main"]
    out = subprocess.run(run + ["--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "solvers" in out.stdout
    out = subprocess.run(run + ["solvers", "--json"], capture_output=True, text=True)
    assert out.returncode == 0
    names = [row["name"] for row in __import__("json").loads(out.stdout)]
    from operator_diffusion.solvers import available_solvers

    assert names == available_solvers()
    out = subprocess.run(run + ["solvers", "--schedule", "psld", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = __import__("json").loads(out.stdout)
    from operator_diffusion.schedules import PSLD

    assert [row["name"] for row in rows] == available_solvers(PSLD())
    assert {row["name"] for row in rows if row["stochastic"]} == {"em", "sscs", "noba", "roba", "csps-s"}
    bad = subprocess.run(run + ["no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "No such command" in bad.stderr


def test_cli_lists_backbones_from_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "opdiff_cli.main", "backbones", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row["provided_by"] for row in __import__("json").loads(out.stdout)}
    assert rows["opdiff-unet"].startswith("operator-diffusion ")
    assert "operator_diffusion.backbones.unet:OpdiffUNetBackbone" in rows["opdiff-unet"]


def test_progress_outside_a_terminal_prints_plain_lines_at_intervals():
    """Under nohup or CI a rich bar shows only at its stage's end; ``progress_bar`` then prints plain lines: at the
    start, at every further 10% and at completion (and never a line twice)."""
    import io

    from rich.console import Console

    from opdiff_cli._common import PlainProgress, progress_bar

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    bar = progress_bar(console=console, plain_console=console)
    assert isinstance(bar, PlainProgress)
    with bar:
        task = bar.add_task("train", total=200, loss="-")
        for step in range(1, 201):
            bar.update(task, completed=step, loss=f"{1 / step:.3g}")
        bar.update(task, completed=200)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 0/200 (0%)")
    assert [int(line.split(": ")[1].split("/")[0]) for line in lines] == [0, *range(20, 201, 20)]
    assert lines[-1].startswith("train: 200/200 (100%), loss 0.005,")
