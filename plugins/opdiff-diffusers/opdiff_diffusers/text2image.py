"""The backbone ``diffusers-text2image``: a latent text-to-image diffusers pipeline (Stable Diffusion 1.x / 2.x) in
opdiff's conventions.

Where things come from:
  * the components: ``from_pretrained`` of a diffusers pipeline folder (``model_index.json`` with ``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), local or a Hub id: a ``UNet2DConditionModel``
    (the network DSNO is built on), an ``AutoencoderKL`` (decoding latents), a ``CLIPTextModel`` and a
    ``CLIPTokenizer`` (prompts → ``encoder_hidden_states``); weights from safetensors only;
  * the noise schedule and prediction type: the scheduler config, as for ``diffusers-unet2d``
    (``scaled_linear`` betas, v-prediction, zero terminal SNR through ``rescale_betas_zero_snr``);
  * the state: the latent (``unet.in_channels``, H/f, W/f), f = 2^(number of VAE blocks − 1) = 8 for SD;
  * the conditioning: ``encoder_hidden_states`` (B, L, D), L = the tokenizer's ``model_max_length`` (77), D = the
    UNet's ``cross_attention_dim``, computed by ``encode_prompts`` as the diffusers pipelines do (padded to L,
    truncated with a warning, the text encoder's last hidden state).

Without ``pretrained``, ``unet_config`` (a dict or the preset ``"sd1.5"``: diffusers' class defaults with SD 1.5's
``cross_attention_dim`` and ``sample_size``) builds the UNet alone with random weights: enough for ``opdiff inspect``,
not for prompts or decoding.

SDXL (a second text encoder and ``added_cond_kwargs``) is refused: this backbone passes ``encoder_hidden_states``
only.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from operator_diffusion.backbones import Backbone
from operator_diffusion.schedules import DiscreteVP

from .backbone import (
    UNetBlockCuts,
    alphas_cumprod_from_scheduler_config,
    discover_injection_points,
    hub_offline,
    injection_point_channels,
    jsonable,
    looks_like_local_path,
    prediction_from_scheduler,
    read_json,
    scheduler_json,
)

__all__ = [
    "COMPONENTS",
    "DiffusersText2ImageBackbone",
    "PipelineComponents",
    "SD15_UNET_CONFIG",
    "UNET_PRESETS",
    "check_pipeline_folder",
    "check_unet_config",
    "load_pipeline",
    "tokenize_prompts",
]

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
MODEL_INDEX = "model_index.json"
PROMPT_INPUT = "encoder_hidden_states"
DEFAULT_TEXT_LENGTH = 77  # CLIP's context (SD 1.x/2.x tokenizers' model_max_length)
ENCODE_BATCH = 64  # prompts per text-encoder call

# SD 1.5's unet/config.json differs from UNet2DConditionModel's class defaults in these two entries only
SD15_UNET_CONFIG: dict[str, Any] = {"cross_attention_dim": 768, "sample_size": 64}
UNET_PRESETS: dict[str, dict[str, Any]] = {"sd1.5": SD15_UNET_CONFIG}

_SDXL_HINT = (
    "SDXL-style pipelines (a second text encoder, added_cond_kwargs text_embeds/time_ids) are not supported by "
    "diffusers-text2image yet: use an SD 1.x or 2.x pipeline"
)


# --------------------------------------------------------------------------------------------------
# Checks (pure: configs in, one clear error out)
# --------------------------------------------------------------------------------------------------
def check_pipeline_folder(path: Path) -> dict[str, Any]:
    """The ``model_index.json`` of a local pipeline folder, after checking that every component this backbone
    loads is there and that it is no SDXL pipeline; FileNotFoundError / ValueError in one line otherwise."""
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is no diffusers pipeline folder: it has no {MODEL_INDEX} (expected "
            f"{MODEL_INDEX} with {', '.join(c + '/' for c in COMPONENTS)})"
        )
    index = read_json(index_file)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise ValueError(f"{str(path)!r} holds {index.get('_class_name') or 'an SDXL pipeline'}: {_SDXL_HINT}")
    missing = [c for c in COMPONENTS if not (path / c).is_dir() or index.get(c) in (None, [None, None])]
    if missing:
        raise FileNotFoundError(
            f"pipeline folder {str(path)!r} lacks the component(s) {', '.join(missing)}: a text-to-image teacher "
            f"needs {', '.join(c + '/' for c in COMPONENTS)} (save the full pipeline with save_pretrained)"
        )
    return index


def check_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse UNet2DConditionModel configs this backbone cannot drive with ``encoder_hidden_states`` alone."""
    if config.get("addition_embed_type") is not None:
        raise ValueError(f"the UNet has addition_embed_type={config['addition_embed_type']!r}: {_SDXL_HINT}")
    for key in ("class_embed_type", "num_class_embeds", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            raise ValueError(
                f"the UNet has {key}={config[key]!r}: diffusers-text2image drives text-conditioned UNets "
                "(encoder_hidden_states only); class or image conditioning is not supported"
            )
    if config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(
            f"the UNet has time_embedding_type={config['time_embedding_type']!r}: only positional time embeddings "
            "of DDPM steps are supported"
        )


def unet_config_from_arg(arg: Mapping[str, Any] | str) -> dict[str, Any]:
    """A UNet2DConditionModel config: a preset name (``UNET_PRESETS``), a config.json file, or a dict (private
    ``_`` keys dropped)."""
    if isinstance(arg, str):
        if arg in UNET_PRESETS:
            return dict(UNET_PRESETS[arg])
        path = Path(arg).expanduser()
        if path.is_dir():
            path = path / "unet" / "config.json" if (path / "unet").is_dir() else path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"unet_config {arg!r} is neither a preset ({', '.join(UNET_PRESETS)}) nor a config.json file"
            )
        arg = read_json(path)
    return {k: v for k, v in dict(arg).items() if not k.startswith("_")}


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> Tensor:
    """Token ids (P, L) of prompts as the diffusers pipelines tokenise them: padded to L = ``model_max_length`` and
    truncated there; a prompt longer than that is truncated with a warning naming how many were."""
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt")
    if any(not isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    length = int(tokenizer.model_max_length)
    full = tokenizer(list(prompts), padding=False, truncation=False).input_ids
    long = [p for p, ids in zip(prompts, full) if len(ids) > length]
    if long:
        warnings.warn(
            f"{len(long)} prompt(s) exceed the tokenizer's {length} tokens and were truncated (the text encoder sees "
            f"their first {length - 2} tokens), e.g. {long[0][:60]!r}",
            stacklevel=3,
        )
    return tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PipelineComponents:
    """What ``load_pipeline`` returns: the five components (the scheduler as its config)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler_config: dict[str, Any]
    source: str  # the absolute folder or the Hub id


def load_pipeline(pretrained: str | os.PathLike, **kwargs) -> PipelineComponents:
    """Each component through its class's own ``from_pretrained`` (safetensors only; ``kwargs`` such as
    ``torch_dtype``, ``revision``, ``local_files_only`` go to the models)."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {"use_safetensors": True, **kwargs}
    path = Path(pretrained).expanduser()
    if path.is_dir():
        check_pipeline_folder(path)
        source = str(path.resolve())
    else:
        name = str(pretrained)
        if path.exists():
            raise ValueError(f"pretrained must be a pipeline folder or a Hub id, got the file {name!r}")
        if looks_like_local_path(name):
            raise FileNotFoundError(f"pipeline folder {name!r} does not exist (and it is no Hub id 'owner/name')")
        if hub_offline():
            kwargs["local_files_only"] = True
        index = dict(DiffusionPipeline.load_config(name, local_files_only=kwargs.get("local_files_only", False)))
        if "text_encoder_2" in index:
            raise ValueError(f"{name!r} is an SDXL-style pipeline: {_SDXL_HINT}")
        source = name
    unet_cfg = dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
    if unet_cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{source}/unet holds a {unet_cfg['_class_name']}, not a UNet2DConditionModel")
    check_unet_config(unet_cfg)
    text_kwargs = {k: v for k, v in kwargs.items() if k != "use_safetensors"}
    return PipelineComponents(
        unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
        vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", use_safetensors=True, **text_kwargs
        ),
        tokenizer=CLIPTokenizer.from_pretrained(
            source, subfolder="tokenizer", **{k: v for k, v in text_kwargs.items() if k != "torch_dtype"}
        ),
        scheduler_config=dict(DDPMScheduler.load_config(source, subfolder="scheduler")),
        source=source,
    )


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch_dtype {name!r} is no torch dtype (e.g. float32, float16, bfloat16)")
    return value


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------
class DiffusersText2ImageBackbone(UNetBlockCuts, Backbone):
    """A Stable-Diffusion-style pipeline: ``UNet2DConditionModel`` on VAE latents, conditioned on CLIP text
    embeddings (see the module docstring).

    ``DiffusersText2ImageBackbone(pretrained=None, *, unet_config=None, scheduler_config=None, prediction=None,
    resolution=None, torch_dtype=None, checkpoint=None)``:
      * ``pretrained``: a pipeline folder or Hub id (all five components);
      * ``unet_config``: without ``pretrained``, a UNet config dict, config.json or preset ("sd1.5"): the UNet
        alone, random weights (no prompts, no decoding);
      * ``scheduler_config``: a dict overriding the pipeline's (without a pipeline: DDPM's linear betas);
      * ``prediction``: "eps", "x0" or "v" (default: the scheduler's ``prediction_type``);
      * ``resolution``: the decoded images' side in pixels (default: the UNet's ``sample_size`` × f); the latent
        side is resolution / f;
      * ``torch_dtype``: the components' dtype, e.g. "float16" (default: as saved, float32);
      * ``checkpoint``: a .safetensors file of the UNet written by ``save_weights``.

    ``forward(x, t, encoder_hidden_states=E)`` feeds the UNet the fractional DDPM step ``schedule.timestep(t)``
    = tN − 1 and the prompt embeddings E (B, L, D) and returns its raw output.
    """

    name = "diffusers-text2image"

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        *,
        unet_config: Mapping[str, Any] | str | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        prediction: str | None = None,
        resolution: int | None = None,
        torch_dtype: str | None = None,
        checkpoint: str | os.PathLike | None = None,
    ):
        from diffusers import UNet2DConditionModel

        from .backbone import DEFAULT_SCHEDULER_CONFIG

        if (pretrained is None) == (unet_config is None):
            raise ValueError(
                "diffusers-text2image needs pretrained=<pipeline folder or Hub id> or, for the UNet alone, "
                f"unet_config=<config dict, config.json or a preset: {', '.join(UNET_PRESETS)}> (not both)"
            )
        dtype = _dtype(torch_dtype)
        self.vae = self.text_encoder = self.tokenizer = None
        if pretrained is not None:
            parts = load_pipeline(pretrained, **({"torch_dtype": dtype} if dtype is not None else {}))
            unet, found_scheduler, self._source = parts.unet, parts.scheduler_config, parts.source
            self.vae, self.text_encoder, self.tokenizer = parts.vae.eval(), parts.text_encoder.eval(), parts.tokenizer
            for module in (self.vae, self.text_encoder):
                module.requires_grad_(False)  # never trained here: only the UNet is DSNO's body
        else:
            cfg = unet_config_from_arg(unet_config)
            check_unet_config(cfg)
            unet, found_scheduler, self._source = UNet2DConditionModel(**cfg), None, None
            if dtype is not None:
                unet = unet.to(dtype)
            self._unet_preset = cfg
        sched = dict(scheduler_config) if scheduler_config is not None else found_scheduler or DEFAULT_SCHEDULER_CONFIG
        self._scheduler_config = scheduler_json(sched)
        schedule = DiscreteVP.from_alphas_cumprod(alphas_cumprod_from_scheduler_config(sched))
        prediction = prediction or prediction_from_scheduler(sched)
        uc = unet.config
        if uc.sample_size is None and resolution is None:
            raise ValueError("the UNet config has no sample_size: give resolution=<image side in pixels>")
        f = self.vae_scale_factor_of(self.vae)
        side = int(resolution) // f if resolution is not None else int(uc.sample_size)
        if resolution is not None and (int(resolution) % f or side < 1):
            raise ValueError(f"resolution {resolution} must be a positive multiple of the VAE's factor {f}")
        if int(uc.out_channels) != int(uc.in_channels):
            raise ValueError(f"the UNet outputs {uc.out_channels} channels for {uc.in_channels} input channels")
        super().__init__(unet, schedule, prediction, image_shape=(int(uc.in_channels), side, side))
        self._resolution = None if resolution is None else int(resolution)
        self._torch_dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        if checkpoint is not None:
            self.load_weights(checkpoint)

    # ----------------------------------------------------------------------------------------------
    @staticmethod
    def vae_scale_factor_of(vae: nn.Module | None) -> int:
        """The VAE's spatial factor f = 2^(blocks − 1) (diffusers' ``vae_scale_factor``; SD's 8 without a VAE)."""
        return 8 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def vae_scale_factor(self) -> int:
        return self.vae_scale_factor_of(self.vae)

    @property
    def text_length(self) -> int:
        """L, the length of a prompt embedding (the tokenizer's maximum)."""
        return DEFAULT_TEXT_LENGTH if self.tokenizer is None else int(self.tokenizer.model_max_length)

    @property
    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {PROMPT_INPUT: (self.text_length, int(self.network.config.cross_attention_dim))}

    @property
    def takes_prompts(self) -> bool:
        return True

    def _require_pipeline(self, what: str) -> None:
        if self.text_encoder is None:
            raise ValueError(
                f"this diffusers-text2image backbone was built from a UNet config alone: {what} needs the pipeline's "
                "components (pretrained=<pipeline folder>)"
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """{"encoder_hidden_states": (P, L, D) float32 on CPU}: the text encoder's last hidden state of each prompt,
        tokenised as the diffusers pipelines do (``tokenize_prompts``: padded, truncated with a warning)."""
        self._require_pipeline("encoding prompts")
        ids = tokenize_prompts(self.tokenizer, prompts)
        enc = self.text_encoder
        device = next(enc.parameters()).device
        use_mask = bool(getattr(enc.config, "use_attention_mask", False))
        pad = self.tokenizer.pad_token_id
        out = []
        for chunk in ids.split(ENCODE_BATCH):
            chunk = chunk.to(device)
            mask = (chunk != pad).long() if use_mask else None
            out.append(enc(chunk, attention_mask=mask)[0].float().cpu())
        return {PROMPT_INPUT: torch.cat(out)}

    @property
    def decoded_shape(self) -> tuple[int, int, int]:
        c = 3 if self.vae is None else int(self.vae.config.out_channels)
        f = self.vae_scale_factor
        return (c, self.image_shape[1] * f, self.image_shape[2] * f)

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (B, 3, H, W), float32: ``vae.decode(z / scaling_factor + shift_factor)`` of latents z."""
        self._require_pipeline("decoding latents")
        cfg = self.vae.config
        p = next(self.vae.parameters())
        z = x.to(device=p.device, dtype=p.dtype) / float(cfg.scaling_factor)
        if getattr(cfg, "shift_factor", None) is not None:
            z = z + float(cfg.shift_factor)
        return self.vae.decode(z, return_dict=False)[0].float().to(x.device)

    def to(self, *args, **kwargs) -> "DiffusersText2ImageBackbone":
        """Moves the VAE and text encoder with the UNet."""
        super().to(*args, **kwargs)
        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.to(*args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"name": self.name}
        if self._source is not None:
            cfg["pretrained"] = self._source
        else:
            cfg["unet_config"] = jsonable(self._unet_preset)
        cfg.update(
            scheduler_config=json.loads(json.dumps(self._scheduler_config)),
            prediction=self.prediction,
            resolution=self._resolution,
            torch_dtype=self._torch_dtype,
        )
        return cfg

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self._scheduler_config)

    @property
    def default_injection_points(self) -> list[str]:
        """``discover_injection_points`` on the UNet2DConditionModel: in its cross-attention blocks the point is each
        ResNet's ``Transformer2DModel`` (a 1-tuple of the features), as the self-attention of a UNet2DModel;
        ``mid_block`` (UNetMidBlock2DCrossAttn, one tensor) is a point."""
        return discover_injection_points(self.network)

    def injection_point_channels(self) -> dict[str, int]:
        return injection_point_channels(self.network)

    def noise_conditioning(self, t: Tensor) -> Tensor:
        """What the UNet's time embedding sees: the fractional DDPM step tN − 1 (float32)."""
        return self.schedule.timestep(t).to(torch.float32)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None, **cond: Tensor) -> Tensor:
        self.check_inputs(x, labels)
        cond = self.check_conditioning(x, cond)
        t = self.expand_times(t, x)
        out = self.network(
            x.to(self.dtype),
            self.noise_conditioning(t),
            encoder_hidden_states=cond[PROMPT_INPUT].to(self.dtype),
            return_dict=False,
        )[0]
        return out.to(x.dtype)
