"""The built-in backbone ``opdiff-unet``: a compact DDPM++/ADM-style U-Net.

Architecture (Song et al. 2021 DDPM++; Dhariwal & Nichol 2021 ADM): sinusoidal (or Gaussian Fourier)
embedding of the noise conditioning → MLP; ResBlocks GroupNorm → SiLU → conv with adaptive group norm
(the embedding gives a per-channel scale and shift, ADM's ``use_scale_shift_norm``), dropout, zero-initialised
last conv, residual sums scaled by 1/√2 (DDPM++ ``skip_rescale``); self-attention (SDPA) inside the
ResBlocks of chosen resolutions; strided-conv down- and nearest+conv upsampling; optional class embedding
with a null label for classifier-free guidance.

Module names (``OpdiffUNet.named_modules()``), level ``l = 0`` being the full resolution::

    time_embed, time_mlp, label_embed, stem
    down.{l}.res.{j}            ResBlock j of down level l (its attention, if any, is .attn inside it)
    down.{l}.downsample         Resample (all levels but the last)
    mid                         res.0 (with attention), res.1
    up.{l}.res.{j}              ResBlock j (num_res_blocks + 1 of them) of the up level at the resolution of down.{l}
    up.{l}.upsample             Resample (all levels but 0)
    out_norm, out_conv

Default injection points (DSNO): every ``down.{l}.res.{j}`` and ``up.{l}.res.{j}`` (each ResBlock's output
is after its attention) and ``mid``, in forward order; never a resample block.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..prediction import Prediction
from ..schedules import DiffusionProcess, VPLinear, schedule_from_config
from .base import Backbone

__all__ = ["UNET_PRESETS", "OpdiffUNet", "OpdiffUNetBackbone", "ResBlock", "SelfAttention", "Resample"]

# Architecture presets; explicit kwargs override them. Parameters (unconditional): tiny 191k, digits 272k,
# cifar10 58.0M.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a forward on 8 items takes milliseconds on CPU
    "tiny": dict(
        image_size=8,
        in_channels=3,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
    ),
    # scikit-learn's 8×8 grayscale digits: the embedded, download-free data set
    # (16 base channels: 11.6 MFLOP per image, 2.7× cheaper on CPU than 32 channels for FID 0.54 vs 0.32 at 512
    # samples; every demo stage runs on it, so the cheaper teacher buys DSNO 2.5× the training steps)
    "digits": dict(
        image_size=8,
        in_channels=1,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=2,
        attn_resolutions=(4,),
        dropout=0.1,
    ),
    # DDPM++ (cont.) CIFAR-10 of Song et al. 2021 / EDM: 128 channels, 4 blocks per level, attention at 16×16
    "cifar10": dict(
        image_size=32,
        in_channels=3,
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=0.1,
    ),
}


def _num_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's rule: up to 32 groups of at least 4 channels, reduced until it divides ``channels``."""
    g = max(1, min(max_groups, channels // min_channels_per_group))
    while channels % g:
        g -= 1
    return g


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer that closes a residual branch (DDPM++/ADM): each block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class TimestepEmbedding(nn.Module):
    """Noise conditioning c (N,) → (N, channels) features [cos(c·f), sin(c·f)].

    ``positional``: f_i = 10000^{-i/(channels/2)} (Transformer/DDPM; suits c on [0, 1000] and EDM's ¼ log σ);
    ``fourier``: f ~ 2π·N(0, scale²), fixed (NCSN++'s Gaussian Fourier features, stored as a buffer)."""

    def __init__(
        self,
        channels: int,
        kind: Literal["positional", "fourier"] = "positional",
        max_positions: int = 10000,
        fourier_scale: float = 16.0,
    ):
        super().__init__()
        if channels % 2:
            raise ValueError(f"time embedding channels must be even, got {channels}")
        if kind not in ("positional", "fourier"):
            raise ValueError(f"unknown embedding_type {kind!r}; valid: positional, fourier")
        self.channels, self.kind, self.max_positions = channels, kind, max_positions
        if kind == "fourier":
            self.register_buffer("freqs", 2 * math.pi * fourier_scale * torch.randn(channels // 2))

    def forward(self, c: Tensor) -> Tensor:
        half = self.channels // 2
        if self.kind == "fourier":
            freqs = self.freqs.float()
        else:
            freqs = torch.exp(
                -math.log(self.max_positions) / half * torch.arange(half, device=c.device, dtype=torch.float32)
            )
        args = c.float()[:, None] * freqs[None]  # (N, half), in float32 whatever the network dtype
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of each item, residual: (x + proj(attn)) · skip_scale."""

    def __init__(self, channels: int, head_channels: int = 64, skip_scale: float = 1.0):
        super().__init__()
        heads = max(1, channels // head_channels)
        while channels % heads:
            heads -= 1
        self.heads, self.skip_scale = heads, skip_scale
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # (B, 3C, H, W) -> 3 × (B, heads, H·W, C/heads)
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H·W, C/heads)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return (x + self.proj(h)) * self.skip_scale


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv → adaptive GroupNorm (scale, shift from the embedding) → SiLU → dropout → conv,
    plus the (1×1-projected) input, times ``skip_scale``; then the optional attention (``.attn``), so the
    block's output is "after its attention"."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        attention: bool = False,
        attn_head_channels: int = 64,
        skip_scale: float = 1.0,
    ):
        super().__init__()
        self.skip_scale = skip_scale
        self.norm0 = _group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.attn = SelfAttention(out_channels, attn_head_channels, skip_scale) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # (B, 2C) -> 2 × (B, C, 1, 1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        return x if self.attn is None else self.attn(x)


class Resample(nn.Module):
    """Base of the resolution-changing blocks (no temporal layer ever goes after one)."""


class Downsample(Resample):
    """3×3 convolution with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(Resample):
    """Nearest-neighbour ×2 then a 3×3 convolution: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownLevel(nn.Module):
    """The ResBlocks of one resolution (``res``) and the ``downsample`` that follows them (or None)."""

    def __init__(self, blocks: list[ResBlock], downsample: Downsample | None):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.downsample = downsample


class UpLevel(nn.Module):
    """The ResBlocks of one resolution (``res``, fed with concatenated skips) and the ``upsample`` after them."""

    def __init__(self, blocks: list[ResBlock], upsample: Upsample | None):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.upsample = upsample


class MidBlock(nn.Module):
    """ResBlock with attention, then ResBlock, at the lowest resolution."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, attn_head_channels: int, skip_scale: float):
        super().__init__()
        self.res = nn.ModuleList(
            ResBlock(
                channels,
                channels,
                emb_channels,
                dropout,
                attention=a,
                attn_head_channels=attn_head_channels,
                skip_scale=skip_scale,
            )
            for a in (True, False)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for block in self.res:
            x = block(x, emb)
        return x


class OpdiffUNet(nn.Module):
    """DDPM++/ADM-style U-Net ``net(x, c_noise, labels) -> (B, C, H, W)`` (module names: see the module docstring).

    ``c_noise`` (B,) is what gets embedded (the backbone maps schedule time to it); ``labels`` (B,) are class
    indices in [0, num_classes], ``num_classes`` being the null label (classifier-free guidance)."""

    def __init__(
        self,
        *,
        image_size: int = 32,  # H = W
        in_channels: int = 3,  # also the output channels (ε, x0 or v have the image's shape)
        model_channels: int = 128,  # base width; level l has model_channels · channel_mult[l]
        channel_mult: tuple[int, ...] = (2, 2, 2),
        num_res_blocks: int = 4,  # per level on the way down (one more on the way up)
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_classes: int = 0,  # 0: unconditional
        attn_head_channels: int = 64,  # ADM: 64 channels per head (1 head below 128 channels)
        embedding_type: Literal["positional", "fourier"] = "positional",
        rescale_skip: bool = True,  # DDPM++: residual sums × 1/√2
    ):
        super().__init__()
        channel_mult, attn_resolutions = tuple(int(m) for m in channel_mult), tuple(int(r) for r in attn_resolutions)
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1 or model_channels < 1:
            raise ValueError("the U-Net needs at least one level, one ResBlock per level and model_channels >= 1")
        if image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2^{levels - 1} (channel_mult has {levels} levels)"
            )
        resolutions = [image_size >> l for l in range(levels)]
        if unknown := sorted(set(attn_resolutions) - set(resolutions)):
            raise ValueError(f"attn_resolutions {unknown} are not resolutions of this U-Net: {resolutions}")
        self._config = dict(
            image_size=int(image_size),
            in_channels=int(in_channels),
            model_channels=int(model_channels),
            channel_mult=list(channel_mult),
            num_res_blocks=int(num_res_blocks),
            attn_resolutions=list(attn_resolutions),
            dropout=float(dropout),
            num_classes=int(num_classes),
            attn_head_channels=int(attn_head_channels),
            embedding_type=embedding_type,
            rescale_skip=bool(rescale_skip),
        )
        emb_ch = 4 * model_channels
        skip_scale = 2**-0.5 if rescale_skip else 1.0

        def block(cin: int, cout: int, res: int) -> ResBlock:
            return ResBlock(cin, cout, emb_ch, dropout, res in attn_resolutions, attn_head_channels, skip_scale)

        self.time_embed = TimestepEmbedding(model_channels, embedding_type)
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = nn.Embedding(num_classes + 1, emb_ch) if num_classes else None  # last row: null label

        ch = model_channels * channel_mult[0]
        self.stem = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips, down = [ch], []
        for l, mult in enumerate(channel_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(ch, model_channels * mult, resolutions[l]))
                ch = model_channels * mult
                skips.append(ch)
            downsample = Downsample(ch) if l < levels - 1 else None
            if downsample is not None:
                skips.append(ch)
            down.append(DownLevel(blocks, downsample))
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(ch, emb_ch, dropout, attn_head_channels, skip_scale)
        up: list[UpLevel | None] = [None] * levels
        for l in reversed(range(levels)):  # up.{l} works at the resolution of down.{l}
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(block(ch + skips.pop(), model_channels * channel_mult[l], resolutions[l]))
                ch = model_channels * channel_mult[l]
            up[l] = UpLevel(blocks, Upsample(ch) if l > 0 else None)
        self.up = nn.ModuleList(up)
        self.out_norm = _group_norm(ch)
        self.out_conv = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))
        # (block name, item index): forward continues after that block on those items only (``cut_points``)
        self.keep: tuple[str, Tensor] | None = None
        # gradient checkpointing: called as checkpoint(block, *args) for each ResBlock and the mid block while
        # gradients are enabled (``OpdiffUNetBackbone.enable_gradient_checkpointing``); None: plain calls
        self.checkpoint: Any = None

    def config(self) -> dict[str, Any]:
        """The constructor kwargs (JSON-serialisable): ``OpdiffUNet(**net.config())`` rebuilds the architecture."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._config.items()}

    def injection_points(self, through: Literal["full", "mid", "up1"] = "full") -> list[str]:
        """DSNO placement in forward order: every down ResBlock (after its attention) and the mid block, then
        the up ResBlocks of every up level (``"full"``), of none (``"mid"``) or of the lowest-resolution up
        level only (``"up1"``). The shorter placements leave the rest of the decoder frame-independent."""
        down = [f"down.{l}.res.{j}" for l, lvl in enumerate(self.down) for j in range(len(lvl.res))]
        levels = {"full": len(self.up), "mid": 0, "up1": 1}[through]
        up_levels = list(reversed(range(len(self.up))))[:levels]
        up = [f"up.{l}.res.{j}" for l in up_levels for j in range(len(self.up[l].res))]
        return [*down, "mid", *up]

    def cut_points(self) -> list[str]:
        """The blocks after which ``forward`` can drop items (``keep``), in forward order: the stem, every
        ResBlock and resample block, and the mid block."""
        names = ["stem"]
        for l, level in enumerate(self.down):
            names += [f"down.{l}.res.{j}" for j in range(len(level.res))]
            names += [f"down.{l}.downsample"] if level.downsample is not None else []
        names.append("mid")
        for l in reversed(range(len(self.up))):
            names += [f"up.{l}.res.{j}" for j in range(len(self.up[l].res))]
            names += [f"up.{l}.upsample"] if self.up[l].upsample is not None else []
        return names

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.time_mlp(self.time_embed(c_noise).to(x.dtype))  # (B, 4·model_channels)
        if self.label_embed is not None:
            if labels is None:
                raise ValueError("this U-Net is class-conditional: pass labels (the null label is num_classes)")
            emb = emb + self.label_embed(labels)
        elif labels is not None:
            raise ValueError("this U-Net is unconditional (num_classes=0) but labels were given")
        emb = F.silu(emb)  # every ResBlock's emb_proj sees SiLU(emb) (ADM's emb_layers)
        keep = self.keep
        checkpoint = self.checkpoint if torch.is_grad_enabled() else None

        def run(block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
            return block(h, emb) if checkpoint is None else checkpoint(block, h, emb)

        def cut(name: str, h: Tensor, hs: list[Tensor], emb: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
            """After block ``name``: continue on the kept items only (``keep``), skips and embedding included."""
            if keep is None or keep[0] != name:
                return h, hs, emb
            return h[keep[1]], [s[keep[1]] for s in hs], emb[keep[1]]

        h = self.stem(x)
        hs = [h]
        h, hs, emb = cut("stem", h, hs, emb)
        for l, level in enumerate(self.down):
            for j, block in enumerate(level.res):
                h = run(block, h, emb)
                hs.append(h)
                h, hs, emb = cut(f"down.{l}.res.{j}", h, hs, emb)
            if level.downsample is not None:
                h = level.downsample(h)
                hs.append(h)
                h, hs, emb = cut(f"down.{l}.downsample", h, hs, emb)
        h = run(self.mid, h, emb)
        h, hs, emb = cut("mid", h, hs, emb)
        for l in reversed(range(len(self.up))):
            level = self.up[l]
            for j, block in enumerate(level.res):
                h = run(block, torch.cat([h, hs.pop()], dim=1), emb)
                h, hs, emb = cut(f"up.{l}.res.{j}", h, hs, emb)
            if level.upsample is not None:
                h = level.upsample(h)
                h, hs, emb = cut(f"up.{l}.upsample", h, hs, emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def unet_kwargs(preset: str | None = None, **overrides) -> dict[str, Any]:
    """Architecture kwargs of ``preset`` (or the ``OpdiffUNet`` defaults when None) updated by ``overrides``."""
    if preset is None:
        return dict(overrides)
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown opdiff-unet preset {preset!r}; valid: {', '.join(UNET_PRESETS)}")
    return {**UNET_PRESETS[preset], **overrides}


def _schedule(schedule: DiffusionProcess | dict | str | None) -> DiffusionProcess:
    """A schedule given as an object, its ``config()``, or a name with default parameters (``"psld"``)."""
    if schedule is None:
        return VPLinear()
    if isinstance(schedule, str):
        return schedule_from_config({"name": schedule})
    if isinstance(schedule, dict):
        return schedule_from_config(schedule)
    return schedule


class OpdiffUNetBackbone(Backbone):
    """``OpdiffUNet`` as a backbone of a given schedule and prediction type.

    Network inputs as functions of the continuous schedule time t (one rule per schedule family):
      * noise conditioning c_noise(t): ``DiscreteVP.timestep(t)`` ∈ [0, N−1] for a discrete DDPM schedule,
        1000·t for the continuous VP schedules (DDPM/score-SDE convention; positional embedding), and EDM's
        ¼ log ρ_t = −λ_t/4 otherwise (= ¼ log σ for EDM/VE, where α = 1);
      * input scaling c_in(t) = 1/√(σ_data² α_t² + σ_t²) (EDM's c_in; σ_data = ``schedule.sigma_data`` for
        EDM/VE, else 1, which makes it exactly 1 on VP schedules where x_t already has unit scale).
    The output is the raw network output in ``prediction`` (no c_skip/c_out preconditioning).

    PSLD: the network takes and returns the phase-space state, 2·``in_channels`` channels (x then m; the
    HSM ε̂ of both halves, ``prediction="eps"``); ``in_channels`` (and ``config()``) stays the data's C.
    c_noise = 1000·t as for the continuous VP schedules, and c_in = 1: z_t has unit scale throughout (its
    prior N(0, diag(1, M)) has standard deviations 1 in x and √M = 0.5 in m for the CIFAR-10 config).
    """

    name = "opdiff-unet"

    def __init__(
        self,
        preset: str | None = None,  # "tiny", "digits", "cifar10" (UNET_PRESETS); kwargs override it
        *,
        schedule: DiffusionProcess
        | dict
        | str
        | None = None,  # a Schedule/PSLD, its config() or name; default VPLinear()
        prediction: Prediction = "eps",
        checkpoint: str | None = None,  # .safetensors weights to load
        **arch_kwargs,  # OpdiffUNet kwargs
    ):
        schedule = _schedule(schedule)
        arch = unet_kwargs(preset, **arch_kwargs)
        channels = int(arch.get("in_channels", inspect.signature(OpdiffUNet).parameters["in_channels"].default))
        arch["in_channels"] = schedule.state_channels(channels)  # PSLD: the state (x, m), twice the data's
        network = OpdiffUNet(**arch)
        size, num_classes = network.config()["image_size"], network.config()["num_classes"]
        super().__init__(
            network,
            schedule,
            prediction,
            image_shape=(channels, size, size),
            num_classes=num_classes,
            null_label=num_classes if num_classes else None,
        )
        if checkpoint is not None:
            self.load_weights(checkpoint)

    @classmethod
    def option_names(cls) -> list[str]:
        """Its own options and the U-Net's architecture keyword arguments (``OpdiffUNet``)."""
        own = ["preset", "schedule", "prediction", "checkpoint"]
        return own + [p for p in inspect.signature(OpdiffUNet).parameters if p not in own]

    def config(self) -> dict[str, Any]:
        arch = {**self.network.config(), "in_channels": self.image_shape[0]}  # the data's C (PSLD: the network has 2C)
        return {"name": self.name, **arch, "schedule": self.schedule.config(), "prediction": self.prediction}

    @property
    def default_injection_points(self) -> list[str]:
        return self.network.injection_points()

    @property
    def placement_presets(self) -> dict[str, list[str]]:
        """``full`` (every ResBlock and the mid block), ``through-mid`` (the encoder and the mid block: the whole
        decoder runs on the requested frames only) and ``through-up1`` (also the lowest-resolution up level)."""
        net = self.network
        return {
            "full": net.injection_points("full"),
            "through-mid": net.injection_points("mid"),
            "through-up1": net.injection_points("up1"),
        }

    @property
    def item_cut_points(self) -> list[str]:
        return self.network.cut_points()

    @contextlib.contextmanager
    def keep_items(self, after: str, index: Tensor):
        if after not in self.item_cut_points:
            raise ValueError(
                f"{after!r} is not an item cut point of opdiff-unet; valid: {', '.join(self.item_cut_points)}"
            )
        self.network.keep = (after, index)
        try:
            yield
        finally:
            self.network.keep = None

    def enable_gradient_checkpointing(self, checkpoint) -> None:
        """Every ResBlock and the mid block is called through ``checkpoint`` while gradients are enabled."""
        self.network.checkpoint = checkpoint

    def noise_conditioning(self, t: Tensor) -> Tensor:
        """c_noise(t), what the network's time embedding sees: the schedule's (``DiffusionProcess.c_noise``)."""
        return self.schedule.c_noise(t)

    def input_scale(self, t: Tensor) -> Tensor:
        """c_in(t) = 1/√(σ_data² α_t² + σ_t²) (1 for PSLD): the schedule's ``c_in``."""
        return self.schedule.c_in(t)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        labels = self.check_inputs(x, labels)
        t = self.expand_times(t, x)
        c_in = self.input_scale(t).to(x.dtype)[:, None, None, None]
        out = self.network((c_in * x).to(self.network.stem.weight.dtype), self.noise_conditioning(t), labels)
        return out.to(x.dtype)
