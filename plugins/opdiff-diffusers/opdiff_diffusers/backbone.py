"""The backbone ``diffusers-unet2d``: a diffusers ``UNet2DModel`` (DDPM-family checkpoints) in opdiff's conventions.

Where things come from:
  * the network: ``UNet2DModel.from_pretrained`` of a local directory or Hub id (a diffusers pipeline
    layout ``unet/`` + ``scheduler/scheduler_config.json``, or a bare model directory ``config.json`` +
    weights, optionally with ``scheduler_config.json`` beside it, as in the ``google/ddpm-*`` repositories),
    an in-memory ``UNet2DModel``, or ``UNet2DModel(**config)`` with random weights;
  * the noise schedule: the scheduler config's betas (``trained_betas``, or ``beta_schedule`` linear /
    scaled_linear / squaredcos_cap_v2 computed here in float64, any other through diffusers'
    ``DDPMScheduler``) → ``DiscreteVP.from_alphas_cumprod``; step n sits at t_n = (n+1)/N;
  * the prediction type: the scheduler's ``prediction_type`` (epsilon → "eps", sample → "x0",
    v_prediction → "v") unless given;
  * ``image_shape`` = (in_channels, *sample_size); ``num_classes`` = ``num_class_embeds`` (0 if None).

Without a scheduler config the schedule is DDPM's: linear betas 1e-4..0.02 over 1000 steps, ε-prediction.

Injection points (DSNO placement) are discovered from the module tree, see ``discover_injection_points``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from operator_diffusion.backbones import Backbone
from operator_diffusion.backbones.base import keep_items_by_hooks
from operator_diffusion.schedules import DiscreteVP

__all__ = [
    "DiffusersUNet2DBackbone",
    "DEFAULT_SCHEDULER_CONFIG",
    "SAMPLING_ONLY_SETTINGS",
    "SchedulerSettingsIgnored",
    "ignored_settings",
    "PREDICTION_FROM_DIFFUSERS",
    "alphas_cumprod_from_scheduler_config",
    "discover_injection_points",
    "injection_point_channels",
]

# DDPM (Ho et al. 2020), also diffusers' DDPMScheduler defaults
DEFAULT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
}

PREDICTION_FROM_DIFFUSERS: dict[str, str] = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

_UNET_CONFIG = "config.json"
_SCHEDULER_CONFIG = "scheduler_config.json"
_ZERO_SNR_FLOOR = 2.0**-24  # ᾱ of a zero-terminal-SNR last step (diffusers' Euler schedulers use the same)


# --------------------------------------------------------------------------------------------------
# Noise schedule from a diffusers scheduler config
# --------------------------------------------------------------------------------------------------
# Schedulers whose configs describe a σ (VE / EDM) or flow-matching process, not DDPM betas: read as DDPM they would
# give linear-β ε-prediction and feed DDPM step numbers to a network conditioned on σ.
NON_DDPM_SCHEDULERS = ("EDM", "ScoreSdeVe", "KarrasVe", "FlowMatch", "ScoreSdeVp", "CMStochasticIterative")


def check_ddpm_family(config: Mapping[str, Any]) -> None:
    """Refuse a scheduler config outside the DDPM family (betas over discrete steps) in one line."""
    name = str(config.get("_class_name") or "")
    sigma_only = ("sigma_max" in config or "sigma_min" in config) and not any(
        k in config for k in ("beta_start", "beta_schedule", "trained_betas")
    )
    if name.startswith(NON_DDPM_SCHEDULERS) or sigma_only:
        raise ValueError(
            f"scheduler config {name or '(unnamed)'} describes a σ-parameterised (VE/EDM) or flow process, not DDPM "
            "betas: diffusers-unet2d supports DDPM-family schedulers (DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler "
            "over betas); a VE/EDM UNet2DModel is not supported yet"
        )


class SchedulerSettingsIgnored(UserWarning):
    """A scheduler config sets what diffusers' sampling loops do but opdiff's solvers do not (``ignored_settings``)."""


# Settings that shape diffusers' sampling loops, not the network's probability-flow ODE, which opdiff solves on its
# own grid (--solver, --steps, --grid) and whose x̂_0 it never clips: key → whether its value departs from opdiff.
SAMPLING_ONLY_SETTINGS: dict[str, Any] = {
    "clip_sample": bool,  # x̂_0 clamped to ±clip_sample_range at every step
    "thresholding": bool,  # dynamic thresholding of x̂_0
    "timestep_spacing": lambda v: v is not None,  # the scheduler's own timesteps (leading, trailing, linspace)
    "steps_offset": bool,  # those timesteps shifted
    "set_alpha_to_one": lambda v: v is False,  # the final step to ᾱ_0 rather than to x̂_0
    "use_karras_sigmas": bool,  # σ grids of the multistep and Euler schedulers
    "use_exponential_sigmas": bool,
    "use_beta_sigmas": bool,
}


def ignored_settings(config: Mapping[str, Any]) -> list[str]:
    """``key=value`` of each setting of ``config`` that opdiff's sampling ignores (``SAMPLING_ONLY_SETTINGS``)."""
    return [f"{k}={config[k]!r}" for k, departs in SAMPLING_ONLY_SETTINGS.items() if k in config and departs(config[k])]


def alphas_cumprod_from_scheduler_config(config: Mapping[str, Any]) -> Tensor:
    """ᾱ_n, n = 0..N−1 (float64) of a diffusers DDPM-family scheduler config.

    ``trained_betas`` and the ``beta_schedule``s linear, scaled_linear and squaredcos_cap_v2 are computed
    here in float64 with diffusers' formulas; anything else (e.g. "sigmoid", ``rescale_betas_zero_snr``)
    goes through ``diffusers.DDPMScheduler.from_config(config).alphas_cumprod``. A zero last ᾱ (zero
    terminal SNR) is floored at 2⁻²⁴, as diffusers' Euler schedulers do, since a DiscreteVP needs ᾱ > 0."""
    cfg = dict(config)
    check_ddpm_family(cfg)
    n = int(cfg.get("num_train_timesteps") or 1000)
    trained = cfg.get("trained_betas")
    kind = cfg.get("beta_schedule", "linear")
    b0, b1 = float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
    betas = None
    if not cfg.get("rescale_betas_zero_snr", False):
        if trained is not None:
            betas = torch.as_tensor(list(trained), dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        elif kind == "scaled_linear":  # latent diffusion
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "squaredcos_cap_v2":  # improved DDPM's cosine ᾱ(t), betas capped at 0.999

            def alpha_bar(t: Tensor) -> Tensor:
                return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            i = torch.arange(n, dtype=torch.float64)
            betas = (1 - alpha_bar((i + 1) / n) / alpha_bar(i / n)).clamp(max=0.999)
    if betas is not None:
        if betas.dim() != 1 or len(betas) < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("scheduler config: betas must be a 1-D sequence of at least 2 values in (0, 1)")
        ac = torch.cumprod(1 - betas, 0)
    else:
        from diffusers import DDPMScheduler

        try:
            ac = DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float64)
        except NotImplementedError as e:  # diffusers' message for an unknown beta_schedule
            raise ValueError(f"scheduler config: unsupported beta_schedule {kind!r} ({e})") from None
    if float(ac[-1]) <= 0.0:
        ac = ac.clone()
        ac[-1] = min(_ZERO_SNR_FLOOR, float(ac[-2]) / 2)
    return ac


def prediction_from_scheduler(config: Mapping[str, Any]) -> str:
    kind = config.get("prediction_type") or "epsilon"
    if kind not in PREDICTION_FROM_DIFFUSERS:
        raise ValueError(
            f"scheduler prediction_type {kind!r} is not supported; valid: {', '.join(PREDICTION_FROM_DIFFUSERS)} "
            f"(or pass prediction='eps'/'x0'/'v' explicitly)"
        )
    return PREDICTION_FROM_DIFFUSERS[kind]


# --------------------------------------------------------------------------------------------------
# Injection points
# --------------------------------------------------------------------------------------------------
def _tensor_attention(module: nn.Module | None) -> bool:
    """True for attention modules whose output carries one (N, C, H, W) tensor for an (N, C, H, W) input, a
    temporal layer's place: diffusers' ``Attention`` (the self-attention of AttnDownBlock2D / AttnUpBlock2D /
    UNetMidBlock2D, built with ``_from_deprecated_attn_block``: it reshapes back to 4-D and adds the residual)
    returns the tensor, and ``Transformer2DModel`` (the cross-attention of CrossAttnDownBlock2D / UpBlock2D, called
    with ``return_dict=False`` inside the blocks) returns it as a 1-tuple, which DSNO's hook handles."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return isinstance(module, (Attention, Transformer2DModel))


def discover_injection_points(unet: nn.Module) -> list[str]:
    """DSNO placement for a diffusers ``UNet2DModel``, from its module tree, in forward order.

    For every down block ``down_blocks.{i}`` and then (after ``mid_block``) every up block ``up_blocks.{i}``,
    and every ``resnets.{j}`` in it: the point is ``attentions.{j}`` when the block has attentions paired
    with its resnets (``attentions[j]`` runs right after ``resnets[j]``) and that attention returns its
    features (diffusers ``Attention``, or ``Transformer2DModel`` as a 1-tuple: ``_tensor_attention``); otherwise
    ``resnets.{j}`` itself (blocks without attention; blocks with fewer attentions than resnets, e.g.
    AttnSkipUpBlock2D).
    ``mid_block`` (whose output is one tensor) sits between the down and up points. Downsamplers,
    upsamplers and the blocks themselves (down blocks return ``(h, skips)`` tuples) are never points.

    In the down blocks each resnet / attention output is also appended to the skip tuple: the blocks store
    the value the module *returned*, so a forward hook replacing the output changes the skip connection too.
    """
    points: list[str] = []

    def block_points(prefix: str, block: nn.Module) -> list[str]:
        resnets = getattr(block, "resnets", None)
        if resnets is None:
            return []
        attentions = getattr(block, "attentions", None)
        paired = attentions is not None and len(attentions) == len(resnets)
        out = []
        for j in range(len(resnets)):
            attn = attentions[j] if paired else None
            out.append(f"{prefix}.attentions.{j}" if _tensor_attention(attn) else f"{prefix}.resnets.{j}")
        return out

    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        points += block_points(f"down_blocks.{i}", block)
    if getattr(unet, "mid_block", None) is not None:
        points.append("mid_block")
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        points += block_points(f"up_blocks.{i}", block)
    return points


def _out_channels(module: nn.Module) -> int:
    if _tensor_attention(module):
        return int(getattr(module, "out_dim", None) or module.out_channels)  # Attention's out_dim; a Transformer2DModel
    if hasattr(module, "out_channels"):  # ResnetBlock2D, ResnetBlockCondNorm2D
        return int(module.out_channels)
    if hasattr(module, "resnets"):  # mid block: its last resnet's output
        return _out_channels(module.resnets[-1])
    raise TypeError(f"cannot tell the output channels of {type(module).__name__}")


def injection_point_channels(unet: nn.Module, points: list[str] | None = None) -> dict[str, int]:
    """Output channels C at each injection point (default: ``discover_injection_points(unet)``), read from
    the modules' definitions (works on the meta device)."""
    modules = dict(unet.named_modules())
    return {p: _out_channels(modules[p]) for p in (discover_injection_points(unet) if points is None else points)}


# --------------------------------------------------------------------------------------------------
# Config handling
# --------------------------------------------------------------------------------------------------
def jsonable(value: Any) -> Any:
    """Tuples → lists (recursively); raises TypeError for anything JSON cannot hold."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy / torch arrays (trained_betas)
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _unet_constructor_keys() -> set[str]:
    from diffusers import UNet2DModel

    return {k for k in inspect.signature(UNet2DModel.__init__).parameters if k not in ("self", "args", "kwargs")}


def _unet_config(unet: nn.Module) -> dict[str, Any]:
    """``unet.config`` restricted to ``UNet2DModel`` constructor arguments, JSON-serialisable."""
    keys = _unet_constructor_keys()
    return {k: jsonable(v) for k, v in dict(unet.config).items() if k in keys}


def _json_entries(config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of a mapping (the others, e.g. a torch dtype, dropped)."""
    out = {}
    for k, v in config.items():
        try:
            out[k] = jsonable(v)
        except TypeError:
            continue
    return out


def scheduler_json(config: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler config reduced to its JSON-serialisable entries (private ``_`` keys but ``_class_name`` dropped)."""
    return _json_entries({k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"})


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object")
    return data


def _local_scheduler_config(root: Path, model_dir: Path) -> dict[str, Any] | None:
    """``scheduler/scheduler_config.json`` of a pipeline directory, else a ``scheduler_config.json`` beside the
    UNet's config (flat ``google/ddpm-*`` layout) or at the root; None if there is none."""
    for candidate in (root / "scheduler" / _SCHEDULER_CONFIG, model_dir / _SCHEDULER_CONFIG, root / _SCHEDULER_CONFIG):
        if candidate.is_file():
            return read_json(candidate)
    return None


def _scheduler_config_from_arg(arg: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """``scheduler_config`` given as a dict, a JSON file, or a directory holding ``scheduler_config.json``
    (or a pipeline directory holding ``scheduler/scheduler_config.json``)."""
    if isinstance(arg, Mapping):
        return dict(arg)
    path = Path(arg)
    if path.is_file():
        return read_json(path)
    if path.is_dir():
        found = _local_scheduler_config(path, path)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"scheduler_config {str(arg)!r}: no such JSON file, nor a directory with {_SCHEDULER_CONFIG} "
        f"or scheduler/{_SCHEDULER_CONFIG}"
    )


def looks_like_local_path(name: str) -> bool:
    """A Hub id is 'name' or 'owner/name'; anything else (absolute, relative with ./, several parts) is a path, and
    so is 'a/b' when a folder 'a' exists here (``models/unet`` beside a ``models`` folder)."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    return "/" in name and Path(name.split("/")[0]).expanduser().is_dir()


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set (in the environment or as huggingface_hub read it at import)."""
    import huggingface_hub.constants as hc

    return bool(getattr(hc, "HF_HUB_OFFLINE", False)) or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
    )


def pickle_only_message(model_dir: Path) -> str:
    """The one-line refusal of a model folder whose weights are only pickles (``*.bin``), with the conversion."""
    names = ", ".join(sorted(p.name for p in model_dir.glob("*.bin"))[:3])
    where = str(model_dir)
    return (
        f"{where!r} holds only pickled weights ({names}) and opdiff reads safetensors only, since unpickling a file "
        f'can run code; if you trust the file, convert it once: python -c "from diffusers import UNet2DModel; '
        f"UNet2DModel.from_pretrained({where!r}, use_safetensors=False).save_pretrained({where!r}, "
        f'safe_serialization=True)"'
    )


def _load_pretrained(pretrained: str | os.PathLike, subfolder: str | None, kwargs: dict[str, Any]):
    """(UNet2DModel, scheduler config or None, where, subfolder) from a local directory or a Hub id; ``where`` is
    the directory's absolute path or the Hub id, and ``subfolder`` the one the UNet was found in.

    Weights are read from safetensors only (opdiff never unpickles a user's file): a folder that holds only
    pickled ``.bin`` weights is refused with the command that converts them (``pickle_only_message``); diffusers'
    own ``use_safetensors=False`` is the explicit opt-in that loads them anyway (``torch.load(weights_only=True)``)."""
    from diffusers import DDPMScheduler, UNet2DModel

    kwargs = {"use_safetensors": True, **kwargs}

    path = Path(pretrained).expanduser()
    if path.is_dir():
        if subfolder is None:
            if (path / "unet" / _UNET_CONFIG).is_file():
                subfolder = "unet"
            elif not (path / _UNET_CONFIG).is_file():
                raise FileNotFoundError(
                    f"no UNet found in {str(path)!r}: expected unet/{_UNET_CONFIG} (diffusers pipeline layout) "
                    f"or {_UNET_CONFIG} with the weights (model directory)"
                )
        elif not (path / subfolder / _UNET_CONFIG).is_file():
            raise FileNotFoundError(f"no UNet found in {str(path / subfolder)!r}: it has no {_UNET_CONFIG}")
        model_dir = path / subfolder if subfolder else path
        class_name = read_json(model_dir / _UNET_CONFIG).get("_class_name", "UNet2DModel")
        if class_name != "UNet2DModel":
            raise ValueError(
                f"{str(model_dir / _UNET_CONFIG)!r} describes a {class_name}, not a UNet2DModel; the "
                f"diffusers-unet2d backbone supports unconditional / class-conditional UNet2DModel checkpoints only"
            )
        if kwargs["use_safetensors"] and not any(model_dir.glob("*.safetensors")) and any(model_dir.glob("*.bin")):
            raise ValueError(pickle_only_message(model_dir))
        unet = UNet2DModel.from_pretrained(str(path), subfolder=subfolder, **kwargs)
        return unet, _local_scheduler_config(path, model_dir), str(path.resolve()), subfolder
    name = str(pretrained)
    if path.exists():
        raise ValueError(f"pretrained must be a directory or a Hub model id, got the file {name!r}")
    if looks_like_local_path(name):
        raise FileNotFoundError(f"pretrained directory {name!r} does not exist (and it is no Hub id 'owner/name')")
    if hub_offline():  # no retries against an unreachable Hub: only what is cached locally can load
        kwargs = {**kwargs, "local_files_only": True}
    # Hub id: flat layout (google/ddpm-*: config.json + scheduler_config.json at the root) or pipeline layout.
    if subfolder is None:
        try:
            unet = UNet2DModel.from_pretrained(name, **kwargs)
        except OSError as root_error:
            try:
                unet, subfolder = UNet2DModel.from_pretrained(name, subfolder="unet", **kwargs), "unet"
            except OSError:
                raise OSError(
                    f"could not load a UNet2DModel from the Hub id {name!r} (tried its root and unet/): {root_error} "
                    f"(offline? pass a local directory: a pipeline with unet/ or a model directory with config.json)"
                ) from root_error
    else:
        unet = UNet2DModel.from_pretrained(name, subfolder=subfolder, **kwargs)
    scheduler = None
    for sub in ("scheduler", None):  # pipeline layout, then flat
        try:
            scheduler = dict(DDPMScheduler.load_config(name, subfolder=sub))
            break
        except OSError:
            continue
    return unet, scheduler, name, subfolder


# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------
class UNetBlockCuts:
    """Frame pruning, placement presets and gradient checkpointing for diffusers U-Nets (``UNet2DModel``,
    ``UNet2DConditionModel``): their ``forward`` hands every per-item tensor (the features, the skip connections,
    the time embedding, the prompt embedding) to the mid and up blocks as arguments, so forward hooks can cut them
    (``keep_items_by_hooks``). Mixed into a ``Backbone`` whose ``network`` has ``down_blocks``/``mid_block``/
    ``up_blocks``."""

    def enable_gradient_checkpointing(self, checkpoint) -> None:
        """diffusers' own: its blocks call ``checkpoint(resnet, hidden_states, temb)`` (and the transformer blocks
        of cross-attention) while gradients are enabled."""
        self.network.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint)

    @property
    def placement_presets(self) -> dict[str, list[str]]:
        """``full`` (the discovered points), ``through-mid`` (the down blocks' points and the mid block: the whole
        decoder runs on the requested frames only) and ``through-up1`` (also the first, lowest-resolution up
        block), as for opdiff-unet."""
        full = self.default_injection_points
        up = [p for p in full if p.startswith("up_blocks.")]
        encoder = [p for p in full if p not in up]
        return {
            "full": full,
            "through-mid": encoder,
            "through-up1": encoder + [p for p in up if p.startswith("up_blocks.0.")],
        }

    @property
    def item_cut_points(self) -> list[str]:
        """After the mid block and after each up block (the blocks whose inputs ``forward`` passes as arguments)."""
        net = self.network
        return (["mid_block"] if net.mid_block is not None else []) + [
            f"up_blocks.{i}" for i in range(len(net.up_blocks))
        ]

    def keep_items(self, after: str, index: Tensor):
        cuts = self.item_cut_points
        if after not in cuts:
            raise ValueError(f"{after!r} is not an item cut point of {self.name}; valid: {', '.join(cuts)}")
        return keep_items_by_hooks(self.network, after, cuts[cuts.index(after) + 1 :], index)


class DiffusersUNet2DBackbone(UNetBlockCuts, Backbone):
    """A diffusers ``UNet2DModel`` with the schedule of its scheduler config (see the module docstring).

    ``DiffusersUNet2DBackbone(pretrained=None, *, config=None, subfolder=None, scheduler_config=None,
    prediction=None, checkpoint=None, null_label=None, **unet_kwargs)``:
      * ``pretrained``: a local directory, a Hub id, or a ``UNet2DModel`` instance; ``subfolder`` is found
        automatically (``unet/`` when present) unless given; ``unet_kwargs`` then go to ``from_pretrained``
        (e.g. ``torch_dtype``, ``revision``, ``local_files_only``);
      * otherwise ``config`` (a ``UNet2DModel`` config dict, e.g. a ``config.json``) updated by
        ``unet_kwargs`` builds ``UNet2DModel(**config)`` with random weights;
      * ``scheduler_config``: a dict, a JSON file or a directory (default: the pretrained directory's,
        else DDPM's linear betas 1e-4..0.02 over 1000 steps with ε-prediction);
      * ``prediction``: "eps", "x0" or "v" (default: the scheduler's ``prediction_type``);
      * ``checkpoint``: a .safetensors file written by ``save_weights`` to load into the network;
      * ``null_label``: the class index meaning "no class" for a class-conditional UNet trained for
        classifier-free guidance (``num_class_embeds`` counts it), or None.

    ``forward(x, t, labels)`` feeds the network the fractional timestep ``schedule.timestep(t)`` = tN − 1
    (rounded for a ``learned`` time embedding) and the labels as ``class_labels``; it returns ``.sample``
    (the first ``in_channels`` channels for a learned-variance UNet).
    """

    name = "diffusers-unet2d"

    def __init__(
        self,
        pretrained: str | os.PathLike | nn.Module | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        subfolder: str | None = None,
        scheduler_config: Mapping[str, Any] | str | os.PathLike | None = None,
        prediction: str | None = None,
        checkpoint: str | os.PathLike | None = None,
        null_label: int | None = None,
        **unet_kwargs,
    ):
        from diffusers import UNet2DModel

        if "schedule" in unet_kwargs:
            raise ValueError(
                "diffusers-unet2d takes its noise schedule from the scheduler config (scheduler_config=...); other "
                "schedules, PSLD included, are not supported: use the opdiff-unet backbone for a PSLD teacher"
            )
        found_scheduler = loaded_from = None
        if pretrained is not None and config is not None:
            raise ValueError("pass either pretrained (a directory, Hub id or UNet2DModel) or config, not both")
        if isinstance(pretrained, nn.Module):
            if not isinstance(pretrained, UNet2DModel):
                raise TypeError(f"pretrained must be a diffusers UNet2DModel, got {type(pretrained).__name__}")
            if subfolder is not None or unet_kwargs:
                raise ValueError(
                    "subfolder and from_pretrained kwargs only apply when pretrained is a directory or Hub id"
                )
            unet = pretrained
        elif pretrained is not None:
            unet, found_scheduler, where, found_in = _load_pretrained(pretrained, subfolder, unet_kwargs)
            loaded_from = {"pretrained": where, "subfolder": found_in, **_json_entries(unet_kwargs)}
        else:
            if subfolder is not None:
                raise ValueError("subfolder only applies with pretrained (a directory or Hub id)")
            if config is None and not unet_kwargs:
                raise ValueError(
                    "diffusers-unet2d needs pretrained=<directory or Hub id>, config=<UNet2DModel config dict> "
                    "or UNet2DModel keyword arguments"
                )
            cfg = {k: v for k, v in dict(config or {}).items() if not k.startswith("_")}  # drop _class_name, ...
            cfg.update(unet_kwargs)
            if unknown := sorted(set(cfg) - _unet_constructor_keys()):
                import difflib

                names = sorted(
                    _unet_constructor_keys() | {"pretrained", "subfolder", "scheduler_config", "prediction", "config"}
                )
                synonyms = {
                    "path": "pretrained",
                    "model": "pretrained",
                    "model_path": "pretrained",
                    "repo": "pretrained",
                    "hub_id": "pretrained",
                    "repo_id": "pretrained",
                    "model_id": "pretrained",
                }
                close = {
                    k: [synonyms[k]] if k in synonyms else difflib.get_close_matches(k, names, n=2, cutoff=0.5)
                    for k in unknown
                }
                hints = "".join(
                    f"; {k}: did you mean {' or '.join(repr(c) for c in v)}?" for k, v in close.items() if v
                )
                raise ValueError(f"unknown UNet2DModel config keys: {', '.join(unknown)}{hints}")
            unet = UNet2DModel(**cfg)

        if scheduler_config is not None:
            sched = _scheduler_config_from_arg(scheduler_config)
        elif found_scheduler is not None:
            sched = found_scheduler
        else:
            if pretrained is not None and not isinstance(pretrained, nn.Module):
                warnings.warn(
                    f"no scheduler config found with {str(pretrained)!r}: assuming DDPM's linear betas 1e-4..0.02 "
                    f"over 1000 steps and {DEFAULT_SCHEDULER_CONFIG['prediction_type']} prediction "
                    f"(pass scheduler_config= to choose)",
                    stacklevel=2,
                )
            sched = dict(DEFAULT_SCHEDULER_CONFIG)
        self._scheduler_config = scheduler_json(sched)
        if ignored := ignored_settings(self._scheduler_config):
            warnings.warn(
                f"the scheduler config's {', '.join(ignored)} shape diffusers' sampling loops, which opdiff does not "
                "run: it solves the probability-flow ODE on its own grid (--solver/--steps/--grid) and never clips or "
                "thresholds x̂_0 (the opdiff-diffusers README says which command is nearest to DDIMPipeline)",
                SchedulerSettingsIgnored,
                stacklevel=2,
            )
        schedule = DiscreteVP.from_alphas_cumprod(alphas_cumprod_from_scheduler_config(sched))
        if prediction is None:
            prediction = prediction_from_scheduler(sched)

        uc = unet.config
        if uc.time_embedding_type == "fourier":
            raise ValueError(
                "this UNet2DModel has a Gaussian Fourier time embedding (score-SDE VE / NCSN++ checkpoints, "
                "conditioned on σ rather than a DDPM step): not supported by diffusers-unet2d"
            )
        if uc.class_embed_type is not None:
            raise ValueError(
                f"class_embed_type={uc.class_embed_type!r} is not supported: diffusers-unet2d passes integer class "
                f"indices, i.e. class_embed_type=None with num_class_embeds"
            )
        if uc.sample_size is None:
            raise ValueError("the UNet2DModel config has no sample_size: the image shape is unknown (set sample_size)")
        size = uc.sample_size
        h, w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        in_ch, out_ch = int(uc.in_channels), int(uc.out_channels)
        variance = self._scheduler_config.get("variance_type")
        self._learned_variance = out_ch == 2 * in_ch and variance in ("learned", "learned_range")
        if out_ch != in_ch and not self._learned_variance:
            raise ValueError(
                f"the UNet outputs {out_ch} channels for {in_ch} input channels; only equal counts, or twice as many "
                f"with a learned-variance scheduler (variance_type learned/learned_range), are supported"
            )
        num_classes = int(uc.num_class_embeds or 0)
        if null_label is not None and num_classes and not 0 <= int(null_label) < num_classes:
            raise ValueError(f"null_label {null_label} is not a class embedding index 0..{num_classes - 1}")
        super().__init__(
            unet,
            schedule,
            prediction,
            image_shape=(in_ch, h, w),
            num_classes=num_classes,
            null_label=None if null_label is None else int(null_label),
        )
        self._unet_config = _unet_config(unet)
        self._loaded_from = loaded_from  # the folder or Hub id the weights came from (``source``)
        if checkpoint is not None:
            self.load_weights(checkpoint)

    # ----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": json.loads(json.dumps(self._unet_config)),
            "scheduler_config": json.loads(json.dumps(self._scheduler_config)),
            "prediction": self.prediction,
            "null_label": self.null_label,
        }

    def source(self) -> dict[str, Any] | None:
        """``load_backbone`` options that load these weights again: the model folder (absolute) or Hub id with its
        subfolder and ``from_pretrained`` options, and this scheduler config, prediction and null label (so the
        rebuilt backbone's ``config()`` is this one's); a checkpoint file loaded since wins (``Backbone.source``);
        None for random or in-memory weights."""
        if self.weights_file is not None or self._loaded_from is None:
            return super().source()
        return {
            "name": self.name,
            **json.loads(json.dumps(self._loaded_from)),
            "scheduler_config": self.scheduler_config,
            "prediction": self.prediction,
            "null_label": self.null_label,
        }

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The (JSON-serialisable) scheduler config the schedule was built from."""
        return dict(self._scheduler_config)

    @property
    def default_injection_points(self) -> list[str]:
        return discover_injection_points(self.network)

    def injection_point_channels(self) -> dict[str, int]:
        """Output channels at each default injection point."""
        return injection_point_channels(self.network)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self.check_inputs(x, labels)
        t = self.expand_times(t, x)
        out = self.network(x.to(self.dtype), self.noise_conditioning(t), class_labels=labels).sample
        if self._learned_variance:
            out = out[:, : self.image_shape[0]]
        return out.to(x.dtype)

    def noise_conditioning(self, t: Tensor) -> Tensor:
        """What the UNet's time embedding sees: the fractional DDPM step tN − 1 (float32), rounded and clamped
        to 0..N−1 for a ``learned`` (lookup-table) time embedding."""
        steps = self.schedule.timestep(t).to(torch.float32)
        if self.network.config.time_embedding_type == "learned":
            steps = steps.round().clamp(0, self.schedule.num_steps - 1).long()
        return steps
