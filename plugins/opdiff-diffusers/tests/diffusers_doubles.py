"""Test doubles shared by the plugin's tests: a tiny ``UNet2DModel`` config and its injection points, and the
config.json of google/ddpm-cifar10-32 (written out here: nothing is downloaded). A plain module rather than a
conftest.py: the main suite's conftest would shadow a second ``conftest`` on the import path."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads; on a shared 2-core machine they oversubscribe (a test module
    uses it by importing it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_CFG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
TINY_POINTS = [
    "down_blocks.0.resnets.0",
    "down_blocks.1.attentions.0",
    "mid_block",
    "up_blocks.0.attentions.0",
    "up_blocks.0.attentions.1",
    "up_blocks.1.resnets.0",
    "up_blocks.1.resnets.1",
]

# config.json of google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 model, converted to diffusers)
DDPM_CIFAR10_CFG = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "resnet_time_scale_shift": "default",
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def tiny_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_CFG, **overrides}).eval()
