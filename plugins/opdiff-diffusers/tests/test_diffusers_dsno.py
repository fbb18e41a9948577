"""DSNO over a diffusers ``UNet2DModel``: the adapter works on a U-Net it has no table for.

References: the plain UNet evaluated item by item (zero-init DSNO is the teacher), the plugin's own
channel table (read from block configs, not traced) for the parameter count.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from opdiff_diffusers.backbone import DiffusersUNet2DBackbone
from operator_diffusion.adapter import DSNO

from diffusers_doubles import DDPM_CIFAR10_CFG, TINY_POINTS, tiny_unet

TIMES = [0.8, 0.5, 0.2, 0.01]


def perturbed(unet: UNet2DModel) -> UNet2DModel:
    with torch.no_grad():  # diffusers zero-initialises nothing, but make every layer matter anyway
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return unet


@torch.no_grad()
def test_zero_init_dsno_is_the_diffusers_unet_and_keeps_its_keys():
    bb = DiffusersUNet2DBackbone(perturbed(tiny_unet(num_class_embeds=3)))
    model = DSNO(bb, TIMES, modes=2)
    assert [p.name for p in model.injection_points] == TINY_POINTS
    x, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    out = model(x, labels)
    ref = torch.stack([bb(x, torch.full((2,), t), labels) for t in TIMES], dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    keys = {k[len("network.") :] for k in model.state_dict() if k.startswith("network.")}
    assert keys == set(bb.network.state_dict())
    # small init: the temporal layers act, and only within one example
    for p in model.temporal.parameters():
        p.copy_(0.2 * torch.randn_like(p))
    mixed = model(x, labels)
    assert (mixed - ref).abs().max() > 1e-3
    torch.testing.assert_close(mixed[1:], model(x[1:], labels[1:]), rtol=1e-5, atol=1e-5)


def test_parameter_overhead_on_the_ddpm_cifar10_config():
    torch.manual_seed(0)
    bb = DiffusersUNet2DBackbone(UNet2DModel(**{k: v for k, v in DDPM_CIFAR10_CFG.items() if not k.startswith("_")}))
    model = DSNO(bb, TIMES, modes=2)
    report = model.parameter_report()
    table = bb.injection_point_channels()  # from the block configs, independent of the adapter's tracing
    assert [p.name for p in model.injection_points] == list(table)
    assert report["temporal_parameters"] == 4 * sum(c * c for c in table.values())  # J=2 complex C×C per point
    assert report["backbone_parameters"] == 35_746_307
    assert report["overhead"] == pytest.approx(4 * 1_130_496 / 35_746_307)  # 12.65%: the paper reports ~10%


@pytest.mark.parametrize("placement", [None, "through-mid", "through-up1"])
@torch.no_grad()
def test_frame_pruning_on_a_diffusers_unet_gives_the_full_forward_frames(placement):
    """The hook-based cut (keep_items_by_hooks) against the unpruned pass, in float64, with class labels; the
    blocks after the cut see B·K items."""
    bb = DiffusersUNet2DBackbone(perturbed(tiny_unet(num_class_embeds=3)).double())
    model = DSNO(bb, TIMES, modes=2, init="small", placement=placement).double().eval()
    for p in model.temporal.parameters():
        p.copy_(0.2 * torch.randn_like(p))
    expected_cut = {None: "up_blocks.1", "through-mid": "mid_block", "through-up1": "up_blocks.0"}[placement]
    assert model.cut_point == expected_cut
    x, labels = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2, 1])
    full = model(x, labels)
    seen: list[int] = []
    handle = bb.network.conv_out.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        pruned = model(x, labels, frames=[0, 3])
    finally:
        handle.remove()
    assert seen == [3 * 2]
    torch.testing.assert_close(pruned, full[:, [0, 3]], rtol=1e-12, atol=1e-12)
    if placement == "through-mid":
        names = [p.name for p in model.injection_points]
        assert names == [n for n in TINY_POINTS if not n.startswith("up_blocks.")]
