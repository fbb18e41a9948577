"""The expected memory and step time of DSNO training on the SD 1.5 UNet at 512² (latents 4 × 64 × 64) on one 80 GB
GPU, worked out from costs measured on the ``meta`` device (``operator_diffusion.memory``): no GPU, no weights, a few
seconds of CPU per measurement (``python -m operator_diffusion.benchmarks sd-memory``).

For each option (precision, gradient checkpointing, which parameters train) a training step on B trajectories of
M = 4 frames, B·M UNet items, is measured at B = 1 and B = 2: the peak of the bytes alive beyond the weights
(activations, temporaries, autocast's bf16 weight copies) and the FLOPs. Memory is linear in B (fixed + B·slope), and
the persistent state is counted on paper: float32 weights of every parameter, and for each trainable one a float32
gradient, Adam's two moments and the EMA copy (opdiff keeps it on the device), 16 bytes. The largest B that fits is
(budget − persistent − fixed) / slope; the step time is the step's FLOPs over an assumed fraction (MFU) of the GPU's
dense peak."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..memory import emulated_autocast, step_cost

GIB = 2**30
GPU_MEMORY = 80 * GIB  # an 80 GB H100/A100 (80 GiB of HBM)
RESERVE = 4 * GIB  # CUDA context, cuDNN workspaces, allocator fragmentation (an assumption)
PEAK_FLOPS = {"bf16": 989e12, "fp32": 495e12}  # H100 SXM dense: bf16 tensor cores; TF32 for float32 convs/matmuls
MFU = 0.40  # assumed achieved fraction of the peak (U-Net training typically reaches 30–50%)
FRAMES = 4
TIMES = (0.75, 0.5, 0.25, 1e-3)  # any M = 4 decreasing times: the cost does not depend on their values
PERSISTENT_PER_TRAINABLE = 16  # bytes: float32 gradient, Adam's two moments, EMA copy
WEIGHT_BYTES = 4  # float32 master weights (Accelerate's mixed precision keeps them)


@dataclass(frozen=True)
class Option:
    label: str
    precision: str  # "fp32" or "bf16" (autocast)
    checkpointing: bool
    trainable: str  # finetune.select_trainable spec


OPTIONS = (
    Option("full fine-tune", "fp32", False, "all"),
    Option("full fine-tune", "bf16", False, "all"),
    Option("full fine-tune", "bf16", True, "all"),
    Option("temporal layers + norms", "bf16", False, "temporal+norms"),
    Option("temporal layers + norms", "bf16", True, "temporal+norms"),
    Option("temporal layers only", "bf16", True, "temporal"),
)


def meta_dsno(unet_config: Any = "sd1.5"):
    """DSNO on the ``diffusers-text2image`` UNet of ``unet_config`` (default SD 1.5) with every tensor on the meta
    device (``accelerate.init_empty_weights``: nothing is allocated or initialised)."""
    from accelerate import init_empty_weights

    from ..adapter import DSNO
    from ..backbones import load_backbone

    with init_empty_weights():
        bb = load_backbone("diffusers-text2image", unet_config=unet_config)
        model = DSNO(bb, TIMES)
    return model.to("meta").train()


def measure(model, option: Option, batch: int):
    """``step_cost`` of one training step of ``model`` (a meta DSNO) on ``batch`` trajectories under ``option``."""
    from ..finetune import freeze

    bb = model.backbone
    freeze(model, option.trainable)
    if option.checkpointing:
        model.enable_gradient_checkpointing()
    else:
        model.network.disable_gradient_checkpointing()
    x = torch.empty(batch, *bb.state_shape, device="meta")
    cond = {k: torch.empty(batch, *s, device="meta") for k, s in bb.conditioning_shapes.items()}
    cast = emulated_autocast(model.network) if option.precision == "bf16" else contextlib.nullcontext()
    with cast:
        return step_cost(model, lambda: model(x, **cond).float().abs().mean(), [x, *cond.values()])


@dataclass(frozen=True)
class Estimate:
    option: Option
    parameters: int
    trainable: int
    persistent: int  # bytes
    fixed: int  # activation bytes independent of B
    per_example: int  # activation bytes per trajectory (M items)
    flops_per_example: float
    max_batch: int
    step_seconds: float  # at max_batch


def persistent_bytes(model, trainable: int) -> int:
    """The state a training run keeps on the device whatever B is, counted on paper: ``WEIGHT_BYTES`` per parameter
    and ``PERSISTENT_PER_TRAINABLE`` more per trainable one (``trainable`` values)."""
    return WEIGHT_BYTES * sum(p.numel() for p in model.parameters()) + PERSISTENT_PER_TRAINABLE * trainable


def estimate(model, option: Option, memory: int = GPU_MEMORY, reserve: int = RESERVE) -> Estimate:
    from ..finetune import freeze

    one, two = measure(model, option, 1), measure(model, option, 2)
    slope = two.peak_bytes - one.peak_bytes
    fixed = one.peak_bytes - slope
    params = sum(p.numel() for p in model.parameters())
    trainable = freeze(model, option.trainable)
    persistent = persistent_bytes(model, trainable)
    max_batch = max(0, math.floor((memory - reserve - persistent - fixed) / slope))
    flops = (two.flops - one.flops) or one.flops
    seconds = max_batch * flops / (PEAK_FLOPS[option.precision] * MFU)
    return Estimate(option, params, trainable, persistent, fixed, slope, flops, max_batch, seconds)


def block_costs(model, batch: int = 1) -> list[tuple[str, int, float]]:
    """(block, bf16-autocast activation bytes saved for the backward pass, forward FLOPs) per top-level block of the
    UNet (its temporal layers apart) and for the temporal layers together, for ``batch`` trajectories, no
    checkpointing, all parameters trainable."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..finetune import freeze
    from ..memory import fused_attention, saved_tensor_bytes

    freeze(model, "all")
    model.network.disable_gradient_checkpointing()
    bb = model.backbone
    net = model.network
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(net.down_blocks)}
    blocks |= {"mid_block": net.mid_block} | {f"up_blocks.{i}": b for i, b in enumerate(net.up_blocks)}
    blocks |= {f"temporal.{k}": m for k, m in model.temporal.items()}
    x = torch.empty(batch, *bb.state_shape, device="meta")
    cond = {k: torch.empty(batch, *s, device="meta") for k, s in bb.conditioning_shapes.items()}
    counter = FlopCounterMode(display=False, depth=None)
    with emulated_autocast(net), fused_attention():
        saved = saved_tensor_bytes(lambda: model(x, **cond), list(model.parameters()), blocks)
        with counter, torch.no_grad():  # forward FLOPs: the module tracker attributes the backward pass less reliably
            model(x, **cond)
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__

    def block_flops(name: str) -> float:
        prefix = "" if name.startswith("temporal.") else "network."
        return float(flops.get(f"{root}.{prefix}{name}", 0))

    rows = []
    temporal_bytes = sum(v for k, v in saved.items() if k.startswith("temporal."))
    for name in blocks:
        if name.startswith("temporal."):
            continue
        # the temporal layers run inside the blocks (hooks on their ResNets): their FLOPs go to their own row
        inside = [k for k in model.temporal if k == name or k.startswith(name.replace(".", "__") + "__")]
        own = block_flops(name) - sum(block_flops(f"temporal.{k}") for k in inside)
        rows.append((name, saved.get(name, 0), own))
    rows.append(
        (
            f"temporal layers ({len(model.temporal)})",
            temporal_bytes,
            sum(block_flops(f"temporal.{k}") for k in model.temporal),
        )
    )
    rest = float(flops.get(root, 0)) - sum(r[2] for r in rows)
    rows.append(("rest (conv_in, time embedding, conv_out)", saved.get("other", 0), rest))
    return rows


def sd_memory_section() -> str:
    from ..provenance import machine

    model = meta_dsno()
    rows = block_costs(model)
    total_bytes = sum(r[1] for r in rows)
    lines = [
        "## Memory and step time of DSNO on SD 1.5 at 512² (an estimate)",
        "",
        "Command: `python -m operator_diffusion.benchmarks sd-memory` (about 2 minutes of CPU; no GPU, no weights)  ",
        f"Machine: {machine()}",
        "",
        "DSNO on the SD 1.5 UNet (diffusers' `UNet2DConditionModel` class defaults with `cross_attention_dim` 768: "
        "859.5M parameters, 82.3M more in 21 temporal layers), latents 4 × 64 × 64, M = 4 output frames, prompt "
        "embeddings 77 × 768. Every cost is **measured** on the `meta` device (shapes, no data; "
        "`operator_diffusion.memory`): the bytes alive during a forward and backward pass, and the FLOPs "
        "(`FlopCounterMode`). GPU behaviour is emulated where the CPU path differs: attention runs the fused kernels "
        "(flash attention in bf16, memory-efficient attention in fp32: no L × L matrix is kept), and bf16 is CUDA "
        "autocast's policy (convolutions and linear layers on bf16 copies of their inputs and weights, norms in "
        "fp32). The rest is **arithmetic**, and the result is an estimate, not a GPU measurement.",
        "",
        "### Per block (B = 1 trajectory, 4 UNet items, bf16 autocast, no checkpointing)",
        "",
        "| block | activations saved for backward | forward FLOPs |",
        "|---|---:|---:|",
    ]
    for name, nbytes, flops in rows:
        lines.append(f"| {name} | {nbytes / GIB:.3f} GiB | {flops / 1e12:.3f} T |")
    lines += [
        f"| **total** | **{total_bytes / GIB:.2f} GiB** | **{sum(r[2] for r in rows) / 1e12:.2f} T** |",
        "",
        "### The largest batch on one 80 GB GPU",
        "",
        f"Assumptions: {GPU_MEMORY // GIB} GiB of memory less {RESERVE // GIB} GiB for the CUDA context, cuDNN "
        f"workspaces and fragmentation; float32 master weights (4 B per parameter); per trainable parameter a float32 "
        f"gradient, Adam's two moments and the EMA copy ({PERSISTENT_PER_TRAINABLE} B); activation memory linear in "
        f"B, fitted to measurements at B = 1 and 2 (it includes autocast's bf16 weight copies and, during the "
        f"backward pass, the gradients in flight; each complete gradient is counted in the persistent state). Step "
        f"time: FLOPs over {int(MFU * 100)}% (assumed MFU) of an H100 SXM's dense peak, "
        f"{PEAK_FLOPS['bf16'] / 1e12:.0f} TFLOP/s in bf16 and {PEAK_FLOPS['fp32'] / 1e12:.0f} TFLOP/s TF32 for fp32. "
        "The optimizer step's own temporaries and the data loading are not counted.",
        "",
        "| trains | precision | gradient checkpointing | trainable parameters | persistent state | activations: "
        "fixed + per trajectory | largest B (B·M items) | FLOPs per trajectory | step time at that B |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for option in OPTIONS:
        e = estimate(model, option)
        lines.append(
            f"| {option.label} | {option.precision} | {'yes' if option.checkpointing else 'no'} | "
            f"{e.trainable / 1e6:.1f}M | {e.persistent / GIB:.1f} GiB | "
            f"{e.fixed / GIB:.2f} + {e.per_example / GIB:.2f}·B GiB | {e.max_batch} ({e.max_batch * FRAMES}) | "
            f"{e.flops_per_example / 1e12:.1f} T | {e.step_seconds:.2f} s |"
        )
    lines += [
        "",
        "- **Reading it.** Gradient checkpointing (diffusers checkpoints each ResNet and each transformer block) "
        "costs the recomputed forward passes (about a quarter more FLOPs) and cuts the activations by about 40%. "
        "Freezing the UNet frees 13 GiB of gradients, optimizer and EMA state, and saves the weight-gradient FLOPs "
        "and the inputs the frozen layers no longer keep.",
        "- **What it is not.** A GPU run would differ by the allocator's fragmentation, kernels' workspaces and the "
        "achieved MFU. It should be checked with `torch.cuda.max_memory_allocated()` on a GPU (issue 17 asks for "
        "that whenever one is available).",
    ]
    return "\n".join(lines)
