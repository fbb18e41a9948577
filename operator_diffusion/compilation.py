"""``--compile``: the network calls of long jobs (the teacher in ``opdiff collect``, DSNO and the teacher in ``opdiff
sample``) under ``torch.compile``, with a fallback to the eager call wherever compiling fails.

Measured on the CPU (docs/benchmarks.md, compile): inductor makes the digits teacher's evaluation 1.26× (AVX-512)
to 1.49× (AVX2) faster and DSNO's frame-pruned sample 1.09× to 1.34×, after a cold compile of about a minute per
batch shape; the training step gains nothing (0.97–1.01×, after a two-minute compile), so ``opdiff train`` does
not offer it. Compiling changes float round-off only (fused kernels sum in another order), like the batch size: it
is not part of a collection's identity.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

__all__ = ["BACKEND", "Compiled", "compiled", "runs_compiled"]

BACKEND = "inductor"  # torch.compile's default: C++/OpenMP kernels on CPU, Triton on GPU


def _reason(error: BaseException) -> str:
    """The first line of the error at the root of ``error``'s causes, as ``Type: message``: torch wraps a
    backend's failure (``BackendCompilerFailed``) around the compiler's own error, which runs to pages."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = error.__cause__ or error.inner_exception
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


class Compiled:
    """``fn`` under ``torch.compile`` (``backend``, static shapes: each new batch shape compiles once).

    Where the compiled call fails — no C++ compiler, a platform or operator the backend does not support — the call
    is repeated eagerly: if ``fn`` itself succeeds, one warning names ``what`` and the reason, and every later call
    runs eagerly; if ``fn`` fails too, its own error propagates, unchanged. ``fallback`` holds the reason (None while
    compiled calls succeed)."""

    def __init__(self, fn: Callable[..., Any], what: str, backend: str | Callable[..., Any] = BACKEND) -> None:
        self.fn, self.what = fn, what
        self.fallback: str | None = None
        self._compiled = torch.compile(fn, backend=backend, dynamic=False)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fallback is not None:
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as e:  # the compiler's failure, or fn's own error (told apart by the eager call)
            out = self.fn(*args, **kwargs)
            self.fallback = _reason(e)
            warnings.warn(f"--compile: compiling {self.what} failed ({self.fallback}); it runs eagerly", stacklevel=2)
            return out


def compiled(fn: Callable[..., Any], enabled: bool, what: str) -> Callable[..., Any]:
    """``Compiled(fn, what, BACKEND)`` when ``enabled``, else ``fn`` itself."""
    return Compiled(fn, what, BACKEND) if enabled else fn


def runs_compiled(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is a ``Compiled`` call that has not fallen back to eager."""
    return isinstance(fn, Compiled) and fn.fallback is None
