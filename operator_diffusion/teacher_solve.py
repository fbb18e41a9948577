"""The teacher at work: its ε on a device (``EpsFunction``: classifier-free guidance, bf16 autocast), its
probability-flow ODE solve recorded at the output times (``record_trajectories``), and the measurement behind
precision "auto" (``choose_precision``, timed by ``time_calls``). Collection, sampling and bench run the teacher
through these. (Training a teacher is ``operator_diffusion.teacher``.)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from .schedules import DiffusionProcess
from .seeds import example_inputs
from .solvers import solve

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = [
    "EpsFunction",
    "choose_precision",
    "default_device",
    "record_trajectories",
    "time_calls",
]

TARGETS = ("denoised", "state")
PRECISIONS = ("fp32", "bf16")  # the teacher network's arithmetic during collection (what the identity records)
BF16_MARGIN = 0.10  # "auto" takes bf16 only when it needs at most (1 - margin) of fp32's time per evaluation

Target = Literal["denoised", "state"]


def record_trajectories(
    eps_fn,
    x: Tensor,
    schedule: DiffusionProcess,
    ts: Tensor,
    indices: Sequence[int],
    solver: str,
    target: Target = "denoised",
    extra_args: dict | None = None,
    **options,
) -> Tensor:
    """(B, M, ...) teacher outputs at grid ``indices``: x̂_0(x(t_i), t_i) (``denoised``; at the last grid
    index this is denoise_to_zero's sample) or the states x(t_i) (``state``), from one ``solve``.
    PSLD: the data's C channels either way — x̂_0, or the x half of the states z(t_i)."""
    out = solve(
        eps_fn,
        x,
        schedule,
        ts,
        solver,
        extra_args=extra_args,
        record=list(indices),
        record_denoised=target == "denoised",
        check_finite=True,
        **options,
    )
    if target == "denoised":
        return out.denoised
    return schedule.data_part(out.states, dim=2)  # (B, M, state channels, ...) -> the data's (B, M, C, ...)


@dataclass(frozen=True)
class EpsFunction:
    """The teacher's ε on a device, with classifier-free guidance applied when asked for."""

    eps_fn: Callable[..., Tensor]
    schedule: DiffusionProcess
    device: torch.device

    @classmethod
    def from_backbone(
        cls,
        backbone: "Backbone",
        guidance: float | None,
        device,
        precision: str = "fp32",
        null_inputs: dict[str, Tensor] | None = None,
        compile: bool = False,
    ) -> "EpsFunction":
        """The backbone's ε on ``device``, guided at scale ``guidance`` (None: unguided) against its null label
        and the null branch's conditioning inputs ``null_inputs`` (a text backbone: the negative prompt's
        embedding, one item's tensor per input); under ``torch.compile`` when ``compile`` (``compilation``)."""
        from .compilation import compiled
        from .prediction import autocast_eps, classifier_free_guidance

        backbone.to(device).eval()
        device = torch.device(device)
        eps_fn = backbone.eps_fn
        if precision == "bf16":
            eps_fn = autocast_eps(eps_fn, device.type, torch.bfloat16)
        if guidance is not None:
            nulls = {k: v.to(device) for k, v in (null_inputs or {}).items()}
            eps_fn = classifier_free_guidance(eps_fn, float(guidance), backbone.null_label, nulls)
        return cls(compiled(eps_fn, compile, "the teacher network"), backbone.schedule, device)


def default_device() -> torch.device:
    """CUDA when available, else the CPU: where the teacher runs unless told otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_calls(
    calls: dict[str, Callable[[], Any]],
    repeats: int = 3,
    sync: Callable[[], Any] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    settled: Callable[[dict[str, float]], bool] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each of ``calls``: one warm-up call each, then up to ``repeats`` rounds that
    call each once in turn (interleaved, so that load from other work falls on all alike), fewer when
    ``settled(medians so far)`` says so after a round; ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before each clock reading."""
    sync = sync or (lambda: None)
    for fn in calls.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync()
            start = timer()
            fn()
            sync()
            samples[name].append(timer() - start)
        medians = {name: statistics.median(v) for name, v in samples.items()}
        if settled is not None and settled(medians):
            break
    return medians


def choose_precision(
    backbone: "Backbone",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    *,
    guidance: float | None = None,
    repeats: int = 3,
    margin: float = BF16_MARGIN,
    measure: Callable[[dict[str, Callable[[], Any]]], dict[str, float]] | None = None,
) -> tuple[str, dict]:
    """Time the teacher's ε (as collection runs it: ``EpsFunction.from_backbone``, guidance included) on one batch
    of the collection's shape in fp32 and under bf16 autocast, on ``device`` (default: ``default_device()``),
    and pick "bf16" only when it takes at most (1 − ``margin``) of fp32's time per evaluation: bf16 can be
    ~1.6× faster on CPUs with AVX-512 BF16 and on GPUs (not always: docs/collect.md) and is ~10× slower on
    AVX2-only CPUs, so measure, never assume.
    ``measure`` (default ``time_calls`` with ``repeats``) maps the two zero-argument calls to seconds each;
    the default stops after the first round when bf16 takes twice fp32's time (AVX2 CPUs: no need to time
    a 10× slower call again), so it costs 2 warm-up calls and 2–6 timed ones.
    Returns (precision, record): the record holds the choice, the seconds per evaluation of each precision,
    the batch size, device, CPU capability and margin (what the collection's info keeps)."""
    device = torch.device(device) if device is not None else default_device()
    labels = "random" if backbone.num_classes else None
    x, y = example_inputs(range(batch_size), backbone.image_shape, labels, backbone.num_classes, backbone.schedule)
    x = x.to(device)
    t = torch.full((batch_size,), 0.5 * (backbone.schedule.t_min + backbone.schedule.t_max), device=device)
    extra = {} if y is None else {"labels": y.to(device)}
    # conditioning inputs beyond labels: zeros of their shapes (the time per evaluation does not depend on values)
    cond = {k: torch.zeros(batch_size, *s, device=device) for k, s in backbone.conditioning_shapes.items()}
    extra.update(cond)
    nulls = {k: v[0] for k, v in cond.items()}
    eps = {p: EpsFunction.from_backbone(backbone, guidance, device, p, nulls).eps_fn for p in PRECISIONS}
    calls = {p: (lambda f=f: f(x, t, **extra)) for p, f in eps.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with torch.inference_mode():
        seconds = (
            measure(calls)
            if measure is not None
            else time_calls(calls, repeats, sync, settled=lambda m: m["bf16"] >= 2 * m["fp32"])
        )
    seconds = {p: float(seconds[p]) for p in PRECISIONS}
    chosen = "bf16" if seconds["bf16"] <= (1 - margin) * seconds["fp32"] else "fp32"
    record = {
        "precision": chosen,
        "source": "measured",
        "seconds_per_eval": seconds,
        "batch_size": batch_size,
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "margin": margin,
    }
    if device.type == "cuda":
        record["cuda_device"] = torch.cuda.get_device_name(device)
    return chosen, record
