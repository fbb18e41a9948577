"""Gradient checkpointing on the diffusers backbones: diffusers' own ``enable_gradient_checkpointing`` with DSNO's
frame-keeping checkpoint function. Reference: the plain backward pass, in float64 with dropout on; counting calls
shows that the recomputation passes through the temporal layers hooked inside the checkpointed ResNets."""

from __future__ import annotations

import copy

import pytest
import torch
from text2image_doubles import TINY_UNET

from opdiff_diffusers.backbone import DiffusersUNet2DBackbone
from opdiff_diffusers.text2image import DiffusersText2ImageBackbone
from operator_diffusion.adapter import DSNO

from diffusers_doubles import one_thread, tiny_unet  # noqa: F401  (one_thread: the module's fixture)

TIMES = [0.75, 0.5, 0.25, 1e-3]


def backbones():
    torch.manual_seed(0)
    yield "unet2d", DiffusersUNet2DBackbone(tiny_unet(dropout=0.3)), {}
    bb = DiffusersText2ImageBackbone(unet_config={**TINY_UNET, "dropout": 0.3})
    yield "text2image", bb, {"encoder_hidden_states": torch.randn(2, *bb.conditioning_shapes["encoder_hidden_states"])}


@pytest.mark.parametrize("kind", ["unet2d", "text2image"])
def test_gradient_checkpointing_gives_the_plain_gradients_with_dropout(kind):
    _, bb, cond = next(b for b in backbones() if b[0] == kind)
    bb.network.double()
    model = DSNO(bb, TIMES, modes=2, init="small").double().train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))  # every layer visibly changes the output (zero-initialised convs too)
    cond = {k: v.double() for k, v in cond.items()}
    x = torch.randn(2, *bb.image_shape, dtype=torch.float64)

    def gradients(m: DSNO, seed: int = 7) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = m(x, **cond)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    plain = gradients(model)
    ckpt = copy.deepcopy(model)
    ckpt.enable_gradient_checkpointing()
    counts = {k: 0 for k in ckpt.temporal}
    for k, block in ckpt.temporal.items():
        block.register_forward_pre_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1))
    checkpointed = gradients(ckpt)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-12, atol=1e-14, msg=name)
    # diffusers checkpoints each ResNet (the hook inside runs again in the backward pass); its attentions and the mid
    # block are called outside the checkpoint function, so their temporal layers run once
    for key, n in counts.items():
        assert n == (2 if ".resnets." in key.replace("__", ".") else 1), key
    assert any(n == 2 for n in counts.values())
    other = gradients(ckpt, seed=8)  # another dropout draw: the agreement above is not dropout being inert
    name = next(iter(plain))
    assert not torch.allclose(other[name], plain[name])
