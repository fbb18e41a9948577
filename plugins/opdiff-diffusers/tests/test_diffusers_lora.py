"""LoRA (``opdiff train --lora-rank``, through peft) on the text-to-image ``UNet2DConditionModel``, on the attention
projections as SD LoRAs do: the adapters start as the identity (DSNO still equals its teacher), and merging them
gives the unmerged outputs with the plain diffusers weight layout. Reference: the model before the adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from text2image_doubles import TINY_UNET

from opdiff_diffusers.text2image import DiffusersText2ImageBackbone
from operator_diffusion.adapter import DSNO
from operator_diffusion.finetune import add_lora, merge_lora

from diffusers_doubles import one_thread  # noqa: F401  (the module's fixture)

pytest.importorskip("peft")


@torch.no_grad()
def test_lora_on_the_cross_attention_projections_merges_to_the_unmerged_outputs():
    torch.manual_seed(0)
    bb = DiffusersText2ImageBackbone(unet_config=TINY_UNET)
    bb.network.double()
    model = DSNO(bb, [0.75, 0.5, 0.25, 1e-3], modes=2, init="small").double().eval()
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    plain = copy.deepcopy(model)
    x = torch.randn(2, *bb.image_shape, dtype=torch.float64)
    cond = {"encoder_hidden_states": torch.randn(2, *bb.conditioning_shapes["encoder_hidden_states"]).double()}
    names = add_lora(model, rank=2, targets="*attn2.to_q,*attn2.to_k,*attn2.to_v,*attn2.to_out.0")
    assert names and all(".attn2." in n for n in names)
    torch.testing.assert_close(model(x, **cond), plain(x, **cond), rtol=0, atol=0)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.copy_(0.1 * torch.randn_like(p))
    unmerged = model(x, **cond)
    assert not torch.allclose(unmerged, plain(x, **cond))
    assert merge_lora(model.network) == len(names)
    assert model.state_dict().keys() == plain.state_dict().keys()
    torch.testing.assert_close(model(x, **cond), unmerged, rtol=1e-10, atol=1e-10)
