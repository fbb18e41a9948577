"""What the machine can hold: available memory and free disk, and the checks that bound a stage's size inputs by
them before anything is written (issue 16, item 15: ``collect --steps 1000000000`` grew to 15.6 GB in 30 s).

Each stage estimates the bytes its plan needs (a lower bound: the arrays it must hold, never the network's own
activations, which depend on the backbone) and refuses in one line, naming the flag, what it needs and what is
there. Standard library only (no psutil): ``/proc/meminfo``'s MemAvailable where there is one, else
``os.sysconf``, and never more than the process's cgroup leaves (a container's memory limit, v2 or v1);
``shutil.disk_usage`` of the nearest existing folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["available_memory", "free_disk", "check_memory", "check_disk", "format_bytes"]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None  # "max" (v2: no limit) and anything else: None


def cgroup_memory_left(root: Path | None = None) -> int | None:
    """Bytes the process's memory cgroup still allows (limit − usage), or None without a limit: cgroup v2
    (``memory.max``, ``memory.current``) or v1 (``memory/memory.limit_in_bytes``, ``memory/memory.usage_in_bytes``;
    v1 writes a huge number for "no limit", which then exceeds the machine's memory and does not bind); ``root``:
    the cgroup file system (default ``CGROUP_ROOT``)."""
    root = CGROUP_ROOT if root is None else root
    for limit_file, usage_file in (
        (root / "memory.max", root / "memory.current"),
        (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_file)
        if limit is not None:
            return max(0, limit - (_read_int(usage_file) or 0))
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: Linux MemAvailable (else free physical pages), capped by
    what the process's cgroup still allows (``cgroup_memory_left``); None when the system does not say."""
    known = [v for v in (_host_available_memory(), cgroup_memory_left()) if v is not None]
    return min(known) if known else None


def _host_available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that ``path`` (or its nearest existing parent) is on; None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def check_memory(need: float, what: str, fix: str) -> None:
    """Refuse (ValueError) when ``what`` needs more than the memory available now: '{what} needs at least N of
    memory, more than this machine has available (A); {fix}'."""
    have = available_memory()
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs at least {format_bytes(need)} of memory, more than this machine has available "
            f"({format_bytes(have)}); {fix}"
        )


def check_batch_memory(batch_size: int, values: int, copies: int, detail: str) -> None:
    """Bound a trainer's ``--batch-size`` by memory: a step holds ``copies`` float32 arrays of the batch's
    ``values`` numbers per example (a lower bound: the network's activations come on top); ``detail`` says what an
    example is, in the message."""
    check_memory(
        batch_size * values * 4 * copies,
        f"--batch-size {batch_size} ({detail})",
        "lower --batch-size (and raise --grad-accum to keep the effective batch)",
    )


def check_disk(need: float, path: str | os.PathLike, what: str, fix: str) -> None:
    """Refuse (ValueError) when ``what`` needs more than the free disk where ``path`` is written."""
    have = free_disk(path)
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs about {format_bytes(need)} of disk, more than is free at {str(path)!r} "
            f"({format_bytes(have)}); {fix}"
        )
