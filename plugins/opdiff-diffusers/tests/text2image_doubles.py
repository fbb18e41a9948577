"""A tiny random-weight text-to-image pipeline written to a folder in diffusers' layout: a ``UNet2DConditionModel``,
an ``AutoencoderKL`` (4 blocks: the latent is (4, H/8, W/8) as in SD), a ``CLIPTextModel`` and a ``CLIPTokenizer``
whose byte-level vocab and merges this module writes, and a scheduler config. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TEXT_LENGTH = 16  # the tiny tokenizer's model_max_length (SD: 77)
CROSS_DIM = 16
IMAGE_SIDE = 32  # pixels; the latent is 4 × 4 × 4
MERGES = ["a t</w>", "c at</w>", "d o", "do g</w>"]

TINY_UNET = dict(
    sample_size=IMAGE_SIDE // 8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=CROSS_DIM,
    attention_head_dim=2,
    norm_num_groups=4,
)
TINY_POINTS = [  # after each ResNet, or after its cross-attention Transformer2DModel where it has one
    "down_blocks.0.attentions.0",
    "down_blocks.1.resnets.0",
    "mid_block",
    "up_blocks.0.resnets.0",
    "up_blocks.0.resnets.1",
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
]
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4, 4, 4, 4),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=2,
    sample_size=IMAGE_SIDE,
)
SD_SCHEDULER = {  # SD 1.5's scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character table (the base alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> Any:
    """A CLIPTokenizer over every byte (alone and word-final) and a few merges, saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LENGTH)
    tok.save_pretrained(str(folder))
    return tok


def write_tiny_pipeline(root: Path, scheduler: dict | None = None, seed: int = 0, **unet_overrides) -> Path:
    """Random-weight components (seeded) saved with save_pretrained in the pipeline layout under ``root``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(root / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**TINY_UNET, **unet_overrides})
    for p in unet.conv_out.parameters():  # zero-initialised in diffusers: the output would not see the input
        torch.nn.init.normal_(p, std=0.1)
    unet.save_pretrained(str(root / "unet"))
    AutoencoderKL(**TINY_VAE).save_pretrained(str(root / "vae"))
    text = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=CROSS_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    CLIPTextModel(text).save_pretrained(str(root / "text_encoder"))
    sched = dict(scheduler or SD_SCHEDULER)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    DDPMScheduler.from_config(sched)  # a valid config
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", sched.get("_class_name", "DDPMScheduler")],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def register() -> type:
    """The backbone class, registered in-process under its name (what the entry point does once installed)."""
    from opdiff_diffusers.text2image import DiffusersText2ImageBackbone
    from operator_diffusion.backbones import backbone_class, register_backbone

    try:
        if backbone_class(DiffusersText2ImageBackbone.name) is DiffusersText2ImageBackbone:
            return DiffusersText2ImageBackbone
    except (ValueError, ImportError):
        pass
    register_backbone(DiffusersText2ImageBackbone.name, DiffusersText2ImageBackbone, overwrite=True)
    return DiffusersText2ImageBackbone
