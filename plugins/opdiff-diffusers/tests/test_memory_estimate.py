"""The SD 1.5 memory estimate's pipeline (operator_diffusion.benchmarks.memory) on the tests' tiny text-to-image UNet,
so that it cannot rot: the properties the estimate rests on, not its numbers."""

from __future__ import annotations

import torch
from text2image_doubles import TINY_UNET

from operator_diffusion.benchmarks.memory import Option, block_costs, estimate, measure, meta_dsno

from diffusers_doubles import one_thread  # noqa: F401  (the module's fixture)


def test_the_estimate_rests_on_linear_activations_and_checkpointing_trades_flops_for_memory():
    model = meta_dsno(dict(TINY_UNET))
    assert all(p.device.type == "meta" for p in model.parameters())
    plain = Option("full", "bf16", False, "all")
    ckpt = Option("full", "bf16", True, "all")
    frozen = Option("temporal", "bf16", False, "temporal")
    one, two, three = (measure(model, plain, b) for b in (1, 2, 3))
    # linear in B (what the fit assumes), to the byte up to a bounded per-step constant
    assert abs((three.peak_bytes - two.peak_bytes) - (two.peak_bytes - one.peak_bytes)) <= 0.02 * one.peak_bytes
    assert three.flops - two.flops == two.flops - one.flops  # FLOPs are exactly linear
    c = measure(model, ckpt, 2)
    assert c.peak_bytes < two.peak_bytes and two.flops < c.flops <= 2 * two.flops  # recomputation: at most 1 forward
    f = measure(model, frozen, 2)
    assert f.peak_bytes < two.peak_bytes and f.flops < two.flops  # no weight gradients, fewer inputs kept
    e = estimate(model, plain, memory=2**30, reserve=0)
    params = sum(p.numel() for p in model.parameters())
    assert e.trainable == params and e.persistent == 20 * params  # 4 B weights + 16 B per trainable parameter
    assert e.fixed + e.max_batch * e.per_example + e.persistent <= 2**30
    assert e.fixed + (e.max_batch + 1) * e.per_example + e.persistent > 2**30
    rows = block_costs(model)
    assert sum(r[1] for r in rows) > 0 and all(r[2] >= 0 for r in rows)
    assert {r[0] for r in rows} >= {
        "down_blocks.0",
        "mid_block",
        "up_blocks.1",
        f"temporal layers ({len(model.temporal)})",
    }
    assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()


def test_the_gpu_scripts_check_of_the_estimate_runs_on_the_cpu():
    """The GPU script's check of the estimate (benchmarks.gpu.sd_memory_rows) runs real training steps; here on the
    CPU with the tiny UNet (no peak memory without CUDA), so that it cannot rot: the steps run, and the real model's
    persistent state, counted by the estimate's rule, is the meta model's."""
    from operator_diffusion.benchmarks import gpu
    from operator_diffusion.benchmarks.memory import OPTIONS

    option = next(o for o in OPTIONS if o.precision == "bf16" and o.checkpointing and o.trainable == "temporal+norms")
    rows = gpu.sd_memory_rows("cpu", dict(TINY_UNET), options=[option], batches=(1,), at_estimate=False, steps=1)
    assert [(r["batch"], r["peak_gib"], r.get("error")) for r in rows] == [(1, None, None)]
    assert rows[0]["step_s"] > 0
    expected = estimate(meta_dsno(dict(TINY_UNET)), option).persistent / 2**30
    assert rows[0]["persistent_gib"] == expected
