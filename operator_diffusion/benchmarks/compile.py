"""``torch.compile`` and channels_last on the CPU (``python -m operator_diffusion.benchmarks compile``, issue 18).

Side by side in one process, eager against compiled (inductor, ``compilation.Compiled``) and contiguous against
channels_last, for the three calls that dominate opdiff's jobs on the digits backbone: the teacher's evaluation at
the demo's collection batch, DSNO's frame-pruned sample (M = 4, full placement) at batch 256, and the DSNO training
step at batch 64 (forward, L1 loss, backward, Adam). Compile seconds are the first call's, from an empty inductor
cache (``TORCHINDUCTOR_CACHE_DIR`` is a fresh folder): what a user's first run pays. Then, in a process of its own
with its own empty cache, a whole collection (``collect``, deis-15) with and without ``CollectConfig.compile``, its
cold compile included.

``run_kind(kind)`` runs both parts in subprocesses: ``native`` as the machine is, ``avx2`` with the AVX2-only code
paths of torch, oneDNN and inductor (DESIGN.md), so one run measures both kinds of CPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OPDIFF_INDUCTOR_SIMDLEN": "256"}
TEACHER_BATCH, SAMPLE_BATCH, TRAIN_BATCH, COLLECT_NUM = 512, 256, 64, 16384


def _first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _digits():
    from ..backbones import load_backbone

    torch.manual_seed(0)
    return load_backbone("opdiff-unet", preset="digits", dropout=0.0).eval()


def measure_calls(repeats: int = 7, train: bool = True) -> dict:
    """The calls' figures on this process's code paths: medians of ``repeats`` interleaved calls."""
    from ..adapter import DSNO
    from ..compilation import Compiled
    from ..teacher_solve import EpsFunction
    from .adapter import interleaved_medians

    bb = _digits()
    s = bb.schedule
    times = torch.linspace(s.t_max, s.t_min, 5, dtype=torch.float64)[1:]
    model = DSNO(bb, times, modes=2, init="small", placement="full").eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def inference(f):
        def run():
            with torch.inference_mode():
                f()

        return run

    out: dict = {}
    xt, tt = torch.randn(TEACHER_BATCH, *bb.image_shape), torch.full((TEACHER_BATCH,), 0.5)
    xs = torch.randn(SAMPLE_BATCH, *bb.image_shape)
    ts = torch.full((SAMPLE_BATCH,), 0.5)
    eps = EpsFunction.from_backbone(bb, None, "cpu").eps_fn
    eps_c = Compiled(eps, "the teacher")
    sample_c = Compiled(lambda: model(xs, frames=[-1]), "DSNO")
    eps_s = Compiled(bb.eps_fn, "the teacher at the sample batch")
    out["compile_s"] = {
        "teacher": _first_call(inference(lambda: eps_c(xt, tt))),
        "sample": _first_call(inference(sample_c)),
        "teacher at the sample batch": _first_call(inference(lambda: eps_s(xs, ts))),
    }
    xt_cl, xs_cl = (x.contiguous(memory_format=torch.channels_last) for x in (xt, xs))
    calls = {
        "teacher": inference(lambda: eps(xt, tt)),
        "teacher compiled": inference(lambda: eps_c(xt, tt)),
        "teacher channels_last": inference(lambda: model_cl.backbone.eps_fn(xt_cl, tt)),
        "1 NFE at the sample batch": inference(lambda: bb.eps_fn(xs, ts)),
        "1 NFE at the sample batch, compiled": inference(lambda: eps_s(xs, ts)),
        "sample": inference(lambda: model(xs, frames=[-1])),
        "sample compiled": inference(sample_c),
        "sample channels_last": inference(lambda: model_cl(xs_cl, frames=[-1])),
    }
    compiled = [eps_c, sample_c, eps_s]
    out["inference"] = interleaved_medians(calls, repeats)

    if train:
        model.train()
        x = torch.randn(TRAIN_BATCH, *bb.image_shape)
        target = torch.randn(TRAIN_BATCH, len(times), *bb.image_shape)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        step_c = Compiled(model, "the DSNO training step")
        compiled.append(step_c)

        def step(f):
            def run():
                opt.zero_grad(set_to_none=True)
                (f(x) - target).abs().mean().backward()
                opt.step()

            return run

        out["compile_s"]["training step"] = _first_call(step(step_c))
        out["training"] = interleaved_medians({"step": step(model), "step compiled": step(step_c)}, repeats)
        model.eval()
    out["fallbacks"] = [c.what for c in compiled if c.fallback is not None]
    return out


def measure_collection(num: int = COLLECT_NUM) -> dict:
    """Wall seconds of ``collect`` (deis-15, batch ``TEACHER_BATCH``) of ``num`` trajectories, eager and then
    compiled (its first, cold compile included: run it in a process with an empty inductor cache)."""
    from ..collection import collect
    from ..collection_plan import CollectConfig

    bb = _digits()
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flag in (("eager", False), ("compiled", True)):
            config = CollectConfig(
                num=num, solver="deis", steps=15, batch_size=TEACHER_BATCH, shard_size=4096, compile=flag
            )
            start = time.perf_counter()
            collect(bb, Path(tmp) / name, config)
            seconds[name] = time.perf_counter() - start
    return {"collect_s": seconds, "collect_num": num}


PARTS = {"calls": measure_calls, "collection": measure_collection}


def run_kind(kind: str, parts: dict[str, dict] | None = None) -> dict:
    """Each part (``PARTS`` name → its keyword arguments; default all) in a fresh process with a fresh, empty
    inductor cache, on ``kind`` "native" or "avx2" code paths; their results merged."""
    out: dict = {}
    for part, kwargs in (parts or {p: {} for p in PARTS}).items():
        env = {**os.environ, **(AVX2_ENV if kind == "avx2" else {})}
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as tmp:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "operator_diffusion.benchmarks.compile", part, str(result), json.dumps(kwargs)]
            subprocess.run(cmd, env=env, check=True)
            out.update(json.loads(result.read_text()))
    return out


def _child(part: str, result: str, kwargs: str) -> None:
    from ..provenance import machine

    simdlen = os.environ.get("OPDIFF_INDUCTOR_SIMDLEN")
    if simdlen:  # inductor picks its vector width from the CPU, not from ATEN_CPU_CAPABILITY
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = int(simdlen)
    figures = PARTS[part](**json.loads(kwargs))
    figures.update(machine=machine(), capability=torch.backends.cpu.get_cpu_capability())
    Path(result).write_text(json.dumps(figures))


if __name__ == "__main__":
    _child(*sys.argv[1:4])
