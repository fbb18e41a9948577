"""Cost of DSNO's one forward pass against the teacher network (``python -m operator_diffusion.benchmarks adapter``).

Timings per (backbone, batch B), interleaved in one run so that their ratios hold on a shared machine: the
teacher network on B items (one NFE of a solver), the same network on B·M items (what DSNO trains on), and per
placement preset DSNO's sample (the frame t_M, frame-pruned after the last temporal layer: what one-step
sampling costs) and its whole trajectory (all M frames); forward only, and forward+backward for training.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..adapter import DSNO
from ..backbones import load_backbone

# (preset, batch, time training too): the 58M-parameter cifar10 preset costs ~8 s per forward pass of
# 4 images on 2 CPU cores, so on CPU it is timed forward-only at batch 1.
CASES = (("digits", 1, True), ("digits", 256, True), ("cifar10", 1, False))
PLACEMENTS = ("full", "through-up1", "through-mid")


@dataclass
class AdapterTiming:
    preset: str
    batch: int
    num_times: int
    placement: str
    cut_point: str | None  # where the sample continues on one frame
    overhead_params: float
    teacher: float  # seconds, network on B items
    teacher_bm: float  # network on B·M items
    dsno: float  # DSNO forward on B examples, all M frames
    sample: float  # DSNO forward on B examples, the last frame only (frame-pruned)
    teacher_bm_train: float | None  # forward+backward, network on B·M items
    dsno_train: float | None  # forward+backward, DSNO


def interleaved_medians(
    fns: dict, repeats: int, warmups: int = 1, sync: Callable[[], None] | None = None
) -> dict[str, float]:
    """Median wall time of each function, calling them in turn ``repeats`` times after ``warmups`` calls each;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs around every timed call so that device work is counted."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmups):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def device_medians(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """``interleaved_medians`` after two warm-ups (compilation and CUDA graph capture happen in them), synchronising
    a CUDA device around every timed call."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return interleaved_medians(fns, repeats, warmups=2, sync=sync)


def precision_autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` for ``"bf16"``, nothing for ``"fp32"``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_adapter(
    preset: str,
    batch: int,
    with_training: bool = True,
    num_times: int = 4,
    repeats: int = 5,
    placements: tuple[str, ...] = PLACEMENTS,
) -> list[AdapterTiming]:
    """One row per placement; every timing of the backbone and batch is interleaved with every other."""
    torch.manual_seed(0)
    bb = load_backbone("opdiff-unet", preset=preset)
    s = bb.schedule
    times = torch.linspace(s.t_max, s.t_min, num_times + 1, dtype=torch.float64)[1:]
    models = {p: DSNO(bb, times, modes=2, init="small", placement=p) for p in placements}
    x = torch.randn(batch, *bb.image_shape)
    x_bm = x.repeat_interleave(num_times, 0)
    t_b, t_bm = torch.full((batch,), 0.5), times.repeat(batch)

    def fwd(f):
        def run():
            with torch.no_grad():
                f()

        return run

    def train(f):
        def run():
            bb.network.zero_grad(set_to_none=True)
            f().square().mean().backward()

        return run

    bb.network.eval()  # dropout off in every call: the same arithmetic
    fns = {"teacher": fwd(lambda: bb(x, t_b)), "teacher_bm": fwd(lambda: bb(x_bm, t_bm))}
    for p, model in models.items():
        model.eval()
        fns[f"dsno {p}"] = fwd(lambda model=model: model(x))
        fns[f"sample {p}"] = fwd(lambda model=model: model(x, frames=[-1]))
    if with_training:
        fns["teacher_bm_train"] = train(lambda: bb(x_bm, t_bm))
        for p, model in models.items():
            fns[f"train {p}"] = train(lambda model=model: model(x))
    m = interleaved_medians(fns, repeats)
    return [
        AdapterTiming(
            preset,
            batch,
            num_times,
            p,
            model.cut_point,
            model.parameter_report()["overhead"],
            m["teacher"],
            m["teacher_bm"],
            m[f"dsno {p}"],
            m[f"sample {p}"],
            m.get("teacher_bm_train"),
            m.get(f"train {p}"),
        )
        for p, model in models.items()
    ]


def adapter_rows(cases=CASES) -> list[AdapterTiming]:
    return [row for p, b, train in cases for row in time_adapter(p, b, train)]
