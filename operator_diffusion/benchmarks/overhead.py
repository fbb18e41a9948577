"""What the temporal layers add to a DSNO training step (``python -m operator_diffusion.benchmarks overhead``).

Issue 18 asks for a temporal overhead of at most 10% on the training step, on the same B·M items. This benchmark
takes that overhead apart on the digits backbone: DSNO's forward+backward with its temporal layers swapped for
stand-ins of decreasing cost, each against the plain network on the same B·M items, interleaved in one run:

* *hooks only*: every layer returns its input (the hooks, the reshapes, nothing computed);
* *one pass*: every layer is one elementwise pass over its features (``u * 1``), the cheapest layer that computes;
* *shipped*: the temporal layers as they are (``TemporalBlock``: real DFT rows, a block 1×1 convolution, synthesis);
* *time-domain kernel*: the same T u with K written as one (M·C)×(M·C) block-circulant 1×1 convolution
  (``time_domain_kernel``): one GEMM instead of three matmuls, for (M/R)² times the mixing multiplies.

A second table times one layer alone, shipped against the time-domain kernel, at the digits' and cifar10's layer
shapes: whether the fused form pays depends on the size.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..operators import TemporalBlock
from .adapter import device_medians, interleaved_medians, precision_autocast

STAND_INS = ("hooks only", "one pass", "shipped", "time-domain kernel")  # the step table's columns, in order
BATCHES = (32, 256)  # DSNO's demo training batch, and the adapter section's large batch
LAYER_CASES = (  # (who, channels, height = width, batch)
    ("digits", 16, 8, 32),
    ("digits", 16, 8, 256),
    ("digits", 32, 4, 32),
    ("digits", 32, 4, 256),
    ("cifar10", 256, 16, 8),
    ("cifar10", 256, 8, 32),
)


@functools.lru_cache(maxsize=16)
def circulant_basis(m: int, n_modes: int) -> torch.Tensor:
    """(J, 2, M, M) float64: [j, 0, a, b] = c_j cos(2πj(a−b)/M)/M and [j, 1, a, b] = −c_j sin(2πj(a−b)/M)/M, with
    c_j = 1 for the DC and Nyquist modes and 2 otherwise: the rfft → R_j → irfft chain (norm="forward") written in
    the time domain, (K u)[a] = Σ_b Σ_j c_j/M Re(R_j e^{2πij(a−b)/M}) u[b]."""
    d = torch.arange(m, dtype=torch.float64)
    d = d[:, None] - d[None, :]
    out = torch.empty(n_modes, 2, m, m, dtype=torch.float64)
    for j in range(n_modes):
        c = 1.0 if j == 0 or 2 * j == m else 2.0
        out[j, 0] = c * torch.cos(2 * torch.pi * j * d / m) / m
        out[j, 1] = -c * torch.sin(2 * torch.pi * j * d / m) / m
    return out


def time_domain_kernel(weight: torch.Tensor, m: int) -> torch.Tensor:
    """K of ``TemporalSpectralConv`` (weight (J, C_in, C_out, 2)) as one (M·C_out, M·C_in) matrix: row a·C_out + o,
    column b·C_in + i."""
    basis = circulant_basis(m, weight.shape[0]).to(weight.device, weight.dtype)
    k = torch.einsum("jkab,jiok->aobi", basis, weight)
    return k.reshape(m * weight.shape[2], m * weight.shape[1])


class TimeDomainBlock(nn.Module):
    """``TemporalBlock``'s T u = u + LeakyReLU(K u) on (B, M, C, H, W), K as one block-circulant 1×1 convolution
    over the M·C channels of each pixel (the block's own weights)."""

    def __init__(self, block: TemporalBlock):
        super().__init__()
        self.block = block

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, m, c, h, w = u.shape
        conv = self.block.conv
        k = time_domain_kernel(conv.weight[: conv.n_modes], m)
        ku = F.conv2d(u.reshape(b, m * c, h, w), k[:, :, None, None])
        return u + F.leaky_relu(ku, self.block.negative_slope).reshape(u.shape)


class HooksOnly(nn.Module):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u


class OnePass(nn.Module):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * 1.0


def _train_call(params, f):
    def run():
        for p in params:
            p.grad = None
        f().square().mean().backward()

    return run


def step_overheads(
    batches=BATCHES, repeats: int = 7, device: str = "cpu", preset: str = "digits", precision: str = "fp32"
) -> list[dict]:
    """Per batch: the plain network's forward+backward on B·M items and DSNO's with each layer stand-in, on
    ``device`` (synchronised around every call on CUDA), in float32 or under bf16 autocast."""
    from ..adapter import DSNO
    from ..backbones import load_backbone

    dev = torch.device(device)
    torch.manual_seed(0)
    bb = load_backbone("opdiff-unet", preset=preset).to(dev)
    s = bb.schedule
    times = torch.linspace(s.t_max, s.t_min, 5, dtype=torch.float64)[1:]
    model = DSNO(bb, times, modes=2, init="small", placement="full").to(dev).eval()
    shipped = dict(model.temporal.items())
    variants = {  # keyed by STAND_INS
        "hooks only": {k: HooksOnly() for k in shipped},
        "one pass": {k: OnePass() for k in shipped},
        "shipped": shipped,
        "time-domain kernel": {k: TimeDomainBlock(v) for k, v in shipped.items()},
    }
    params = list(model.parameters())
    rows = []
    for batch in batches:
        x = torch.randn(batch, *bb.image_shape, device=dev)
        x_bm, t_bm = x.repeat_interleave(len(times), 0), times.to(dev).repeat(batch)

        def plain():
            with precision_autocast(dev, precision):
                return bb(x_bm, t_bm).float()

        fns = {"plain": _train_call(params, plain)}
        for name, layers in variants.items():

            def call(layers=layers):
                model.temporal.update(layers)
                with precision_autocast(dev, precision):
                    return model(x).float()

            fns[name] = _train_call(params, call)
        m = device_medians(fns, repeats, dev)
        model.temporal.update(shipped)
        rows.append({"preset": preset, "precision": precision, "batch": batch, "layers": len(shipped), **m})
    return rows


def overhead_cells(row: dict) -> str:
    """One step row's table cells: each stand-in's overhead over the plain network, in the order of STAND_INS."""
    return " | ".join(f"{100 * (row[n] / row['plain'] - 1):+.1f}%" for n in STAND_INS)


def layer_timings(cases=LAYER_CASES, repeats: int = 9) -> list[dict]:
    """Forward+backward of one temporal layer alone (M = 4, J = 2, the DSNO init), shipped against the
    time-domain kernel, on the same input."""
    torch.manual_seed(0)
    rows = []
    for who, c, hw, batch in cases:
        block = TemporalBlock(c, 2, 4, init="small")
        fused = TimeDomainBlock(block)
        u = torch.randn(batch, 4, c, hw, hw)

        def call(f):
            def run():
                v = u.detach().requires_grad_(True)
                block.conv.weight.grad = None
                f(v).sum().backward()

            return run

        m = interleaved_medians({"shipped": call(block), "time-domain kernel": call(fused)}, repeats)
        rows.append({"who": who, "channels": c, "size": hw, "batch": batch, **m})
    return rows
