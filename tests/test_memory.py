"""Memory at scale: gradient checkpointing and freezing on the built-in backbone (the diffusers backbones:
plugins/opdiff-diffusers/tests/test_diffusers_memory.py).

References: the plain backward pass (gradients with and without checkpointing agree in float64, dropout on: the
recomputed blocks see the forward pass's RNG state and temporal layers); counting calls shows that the recomputation
really passes through the temporal layers."""

from __future__ import annotations

import copy

import pytest
import torch

from operator_diffusion.adapter import DSNO
from operator_diffusion.operators import TemporalBlock

from conftest import tiny

TIMES = [0.75, 0.5, 0.25, 1e-3]


def random_dsno(bb) -> DSNO:
    """A float64 DSNO in training mode whose temporal layers all change the output."""
    bb.network.double()
    model = DSNO(bb, TIMES, modes=2, init="small").double().train()
    with torch.no_grad():
        for p in model.temporal.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    return model


def gradients(model: DSNO, x: torch.Tensor, seed: int = 7, **cond) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of a fixed random linear functional of DSNO's output, with dropout's draws
    seeded."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x, **cond)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def count_calls(modules) -> list[int]:
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_gradient_checkpointing_gives_the_plain_gradients_with_dropout():
    bb = tiny(dropout=0.3)
    model = random_dsno(bb)
    x = torch.randn(2, *bb.image_shape, dtype=torch.float64)
    plain = gradients(model, x)
    ckpt = copy.deepcopy(model)
    ckpt.enable_gradient_checkpointing()
    blocks = [m for m in ckpt.temporal.values() if isinstance(m, TemporalBlock)]
    calls = count_calls(blocks)
    checkpointed = gradients(ckpt, x)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-14, msg=name)
    # every injection point of opdiff-unet is a checkpointed ResBlock or the mid block: each temporal layer ran in
    # the forward pass and again when the backward pass recomputed its block
    assert calls == [2] * len(blocks)
    # a different dropout draw gives different gradients: the agreement above is not dropout being inert
    other = gradients(ckpt, x, seed=8)
    assert not torch.allclose(other["network.stem.weight"], plain["network.stem.weight"])


def test_gradient_checkpointing_is_inert_without_gradients_and_survives_a_deep_copy():
    """Sampling (no grad) calls the blocks once; an EMA or export copy checkpoints with its own temporal layers."""
    bb = tiny(dropout=0.0)
    model = random_dsno(bb).eval()
    model.enable_gradient_checkpointing()
    x = torch.randn(2, *bb.image_shape, dtype=torch.float64)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
    calls = count_calls(list(copied.temporal.values()))
    with torch.no_grad():
        torch.testing.assert_close(copied(x), expected, rtol=0, atol=0)
    assert calls == [1] * len(calls)
    assert copied.network.checkpoint.dsno is copied
    plain = random_dsno(tiny(dropout=0.0))
    plain.load_state_dict(copied.state_dict())
    torch.testing.assert_close(gradients(copied, x), gradients(plain, x), rtol=1e-12, atol=1e-14)


def test_a_backbone_without_checkpointing_is_refused_in_one_line():
    """The base class's default, for a plugin backbone that does not implement it."""
    from operator_diffusion.backbones import Backbone
    from operator_diffusion.backbones.unet import OpdiffUNetBackbone

    class Bare(OpdiffUNetBackbone):
        enable_gradient_checkpointing = Backbone.enable_gradient_checkpointing

    bb = Bare(preset="tiny")
    with pytest.raises(
        ValueError, match="'opdiff-unet' does not support gradient checkpointing: drop --gradient-checkpointing"
    ):
        DSNO(bb, TIMES).enable_gradient_checkpointing()
