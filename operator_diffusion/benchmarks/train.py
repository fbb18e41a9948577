"""Training throughput (``python -m operator_diffusion.benchmarks train``): the data loader against the step.

A digits-shaped collection (untrained teacher: throughput does not depend on the weights) is converted to
the training cache; then, in one run, the time to draw shuffled batches from the loader ``train`` uses and
the time of full training steps of DSNO and of the one-step baseline on the same batches.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import torch


def _step_seconds(config, steps: int) -> float:
    """Median seconds per optimizer step of ``train`` (the first steps, with set-up, excluded)."""
    from ..training import reset_accelerate_state, train

    stamps: list[float] = []
    train(config, progress=lambda step, total, m: stamps.append(time.perf_counter()))
    reset_accelerate_state()
    gaps = sorted(b - a for a, b in zip(stamps[2:], stamps[3:]))
    return gaps[len(gaps) // 2]


def benchmark_training(batch: int = 64, num: int = 1024, steps: int = 20) -> dict:
    from ..backbones import load_backbone
    from ..collection import collect
    from ..collection_plan import CollectConfig
    from ..runs import Indices
    from ..training import GatherBatch, TrainConfig
    from ..trajectory_cache import TrajectoryCache

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp(prefix="opdiff-bench-train-"))
    teacher = load_backbone("opdiff-unet", preset="digits")
    collect(teacher, root / "data", CollectConfig(num=num, steps=16, solver="ddim", shard_size=512, batch_size=256))
    cache = TrajectoryCache.build(root / "data")
    loader = torch.utils.data.DataLoader(
        Indices(len(cache)), batch_size=batch, shuffle=True, drop_last=True, collate_fn=GatherBatch(cache, False)
    )
    t0 = time.perf_counter()
    n = 0
    for _ in range(4):
        for _b in loader:
            n += 1
    loader_s = (time.perf_counter() - t0) / n
    common = dict(
        data=str(root / "data"),
        backbone_options={},
        batch_size=batch,
        max_steps=steps,
        save_every=10**6,
        log_every=10**6,
        warmup=0,
    )
    dsno = _step_seconds(TrainConfig(out=str(root / "dsno"), **common), steps)
    base = _step_seconds(TrainConfig(out=str(root / "base"), baseline=True, **common), steps)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "batch": batch,
        "num": num,
        "loader_s": loader_s,
        "dsno_step_s": dsno,
        "baseline_step_s": base,
        "peak_rss_mib": peak_mib,
        "peak_gpu_mib": gpu_mib,
        "times": cache.times.tolist(),
    }
