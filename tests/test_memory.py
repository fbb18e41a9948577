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


# --------------------------------------------------------------------------------------------------
# The measurements behind the SD 1.5 estimate (operator_diffusion.memory), against hand counts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_saved_bytes_of_a_small_net_are_the_hand_count(device):
    """Linear(5→7) → ReLU → Linear(7→3) on 4 rows, float32. Trainable weights: the first layer keeps its input x
    (4·5·4 B) for its weight's gradient, ReLU its output (4·7·4 B), which the second layer keeps too (the same
    storage, counted once). Frozen weights and an x that needs a gradient: the layers keep only their weights (the
    parameters, not counted), ReLU its output. A 3×3 convolution keeps its input."""
    from operator_diffusion.memory import saved_tensor_bytes

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).to(device)
    x = torch.randn(4, 5, device=device)
    params = list(net.parameters())
    blocks = {"first": net[0], "relu": net[1], "second": net[2]}
    saved = saved_tensor_bytes(lambda: net(x), params, blocks)
    assert saved == {"total": 4 * 5 * 4 + 4 * 7 * 4, "first": 4 * 5 * 4, "relu": 4 * 7 * 4}
    net.requires_grad_(False)
    saved = saved_tensor_bytes(lambda: net(x.requires_grad_()), params)
    assert saved == {"total": 4 * 7 * 4, "other": 4 * 7 * 4}
    conv = torch.nn.Conv2d(2, 3, 3, padding=1, device=device)
    y = torch.randn(1, 2, 5, 5, device=device)
    assert saved_tensor_bytes(lambda: conv(y), list(conv.parameters()))["total"] == 2 * 5 * 5 * 4


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_live_bytes_follow_allocations_and_frees(device):
    """a = 2x, b = a + 1, drop a, c = 3b: at most two results are alive at once; after the call only c."""
    from operator_diffusion.memory import LiveBytes

    x = torch.empty(64, 32, device=device)

    def f():
        a = x * 2
        b = a + 1
        del a
        return b * 3

    with LiveBytes(exclude=[x]) as live:
        c = f()
    assert live.peak == 2 * x.nbytes and live.live == x.nbytes
    del c
    assert live.live == 0


def test_step_cost_counts_the_flops_of_forward_and_backward():
    """Linear(5→7) without bias on 4 rows: 2·4·5·7 FLOPs forward, as many for the weight's gradient, as many again
    when the input needs one too; the gradient itself is released when complete, not counted."""
    from operator_diffusion.memory import step_cost

    lin = torch.nn.Linear(5, 7, bias=False, device="meta")
    x = torch.empty(4, 5, device="meta")
    fwd = 2 * 4 * 5 * 7
    assert step_cost(lin, lambda: lin(x).sum(), [x]).flops == 2 * fwd
    x.requires_grad_()
    assert step_cost(lin, lambda: lin(x).sum(), [x]).flops == 3 * fwd
    assert lin.weight.grad is None


def test_fused_attention_saves_rows_not_the_attention_matrix():
    """Attention over L = 256 tokens: the CPU/meta fallback keeps the L×L matrix; the fused kernels a GPU runs keep
    q, k, v, the output and a per-row log-sum-exp (plus two RNG words)."""
    from operator_diffusion.memory import fused_attention, saved_tensor_bytes

    b, h, n, d = 2, 4, 256, 16
    for dtype, size in ((torch.bfloat16, 2), (torch.float32, 4)):
        q, k, v = (torch.empty(b, h, n, d, device="meta", dtype=dtype, requires_grad=True) for _ in range(3))

        def attend():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        assert saved_tensor_bytes(attend)["total"] >= b * h * n * n * size
        with fused_attention():
            fused = saved_tensor_bytes(attend)["total"]
        rows = 4 * b * h * n * d * size + b * h * n * 4  # q, k, v, out; the log-sum-exp in float32
        assert rows <= fused <= rows + 64


def test_emulated_autocast_casts_like_cuda_autocast():
    """A linear layer computes on bf16 copies of its input and weight and returns bf16. For its weight's gradient it
    keeps the input's copy (4·5·2 bytes); when the input needs a gradient too, also the weight's copy (7·5·2 bytes).
    A GroupNorm runs in float32."""
    from operator_diffusion.memory import emulated_autocast, saved_tensor_bytes

    lin, norm = torch.nn.Linear(5, 7, device="meta"), torch.nn.GroupNorm(1, 7, device="meta")
    x = torch.empty(4, 5, device="meta")
    out = {}
    with emulated_autocast(torch.nn.Sequential(lin)):
        assert saved_tensor_bytes(lambda: out.setdefault("y", lin(x)), list(lin.parameters()))["total"] == 4 * 5 * 2
        assert out["y"].dtype == torch.bfloat16
        x.requires_grad_()
        assert saved_tensor_bytes(lambda: lin(x), list(lin.parameters()))["total"] == 4 * 5 * 2 + 7 * 5 * 2
    with emulated_autocast(torch.nn.Sequential(norm)):
        assert norm(out["y"]).dtype == torch.float32
    assert lin(x).dtype == torch.float32  # restored
