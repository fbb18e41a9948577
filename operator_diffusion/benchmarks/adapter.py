"""Cost of DSNO's one forward pass against the teacher network (``python -m operator_diffusion.benchmarks adapter``).

Three timings per (backbone, batch B), interleaved in one run so that their ratios hold on a shared machine:
the teacher network on B items (one NFE of a solver), the same network on B·M items (what DSNO runs), and
DSNO on B examples (B·M items plus the temporal layers); forward only, and forward+backward for training.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from ..adapter import DSNO
from ..backbones import load_backbone

# (preset, batch, time training too): the 58M-parameter cifar10 preset costs ~8 s per forward pass of
# 4 images on 2 CPU cores, so on CPU it is timed forward-only at batch 1.
CASES = (("digits", 1, True), ("digits", 256, True), ("cifar10", 1, False))


@dataclass
class AdapterTiming:
    preset: str
    batch: int
    num_times: int
    overhead_params: float
    teacher: float  # seconds, network on B items
    teacher_bm: float  # network on B·M items
    dsno: float  # DSNO forward on B examples
    teacher_bm_train: float | None  # forward+backward, network on B·M items
    dsno_train: float | None  # forward+backward, DSNO


def _interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, calling them in turn ``repeats`` times (after one warm-up each)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def time_adapter(
    preset: str, batch: int, with_training: bool = True, num_times: int = 4, repeats: int = 5
) -> AdapterTiming:
    torch.manual_seed(0)
    bb = load_backbone("opdiff-unet", preset=preset)
    s = bb.schedule
    times = torch.linspace(s.t_max, s.t_min, num_times + 1, dtype=torch.float64)[1:]
    model = DSNO(bb, times, modes=2, init="small")
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
            model.zero_grad(set_to_none=True)
            f().square().mean().backward()

        return run

    model.eval()  # dropout off in both: the same arithmetic
    fns = {"teacher": fwd(lambda: bb(x, t_b)), "teacher_bm": fwd(lambda: bb(x_bm, t_bm)), "dsno": fwd(lambda: model(x))}
    if with_training:
        fns |= {"teacher_bm_train": train(lambda: bb(x_bm, t_bm)), "dsno_train": train(lambda: model(x))}
    m = {"teacher_bm_train": None, "dsno_train": None, **_interleaved_medians(fns, repeats)}
    return AdapterTiming(preset, batch, num_times, model.parameter_report()["overhead"], **m)


def adapter_rows(cases=CASES) -> list[AdapterTiming]:
    return [time_adapter(p, b, train) for p, b, train in cases]
