"""Provenance: what every artifact and report records about where it came from — the machine, the library
versions, and the sha256 of files and of the weights that ran."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import __version__

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = ["machine", "resolve_device", "versions", "file_sha256", "weights_sha256"]


def resolve_device(device: str) -> str:
    """A ``--device``: "auto" (CUDA when available, else the CPU) or a torch device that exists here (else
    ValueError)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but CUDA is not available here; use --device cpu")
    return device


def machine() -> str:
    """One line: CPU model, cores and torch threads, CPU capability (AVX2 / AVX512, which decides whether bf16 is
    native), the GPU, and the Python, torch and opdiff versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, opdiff {__version__}"
    )


def versions(*extra: str) -> dict[str, str]:
    """{"opdiff": …, "torch": …} and the versions of the ``extra`` packages that are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"opdiff": __version__, "torch": torch.__version__}
    for name in extra:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(backbone: "Backbone") -> str:
    """sha256 over the network's state_dict (key, dtype, shape, bytes) in key order: the weights that ran."""
    h = hashlib.sha256()
    for k, v in backbone.network.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
