"""A small CNN feature extractor for small images: ``FeatureNet`` (a classifier whose penultimate layer gives the
features; safetensors files), ``FeatureNetExtractor`` and its trainer ``train_feature_net``; the shipped digits
network (``DIGITS_FEATURENET``) and its reference statistics (``DIGITS_STATS``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..images import ImageSet, from_uint8
from .extractor import FeatureExtractor
from .files import atomic_write, oneline
from .frechet import FIDInputError

FEATURENET_KEY = "opdiff.featurenet"  # safetensors metadata entry holding FeatureNet.config()
FEATURENET_FORMAT = "opdiff-featurenet/1"
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # shipped with the package (assets/README.md)
DIGITS_FEATURENET = ASSETS / "digits_featurenet.safetensors"
DIGITS_STATS = ASSETS / "digits_fid_stats.npz"  # FeatureStats of the 1,797 digits under DIGITS_FEATURENET


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(_groups(c_out), c_out), nn.SiLU())


class FeatureNet(nn.Module):
    """A small CNN classifier whose penultimate layer serves as FID features for small images.

    conv3×3-GroupNorm-SiLU blocks: a stem (``width``), then stride-2 stages (doubling the width) until the
    map is at most 4×4 (8×8 → one stage, 32×32 → three), a last block to ``feature_dim`` channels, and a
    global average pool: ``features(x)`` (N, feature_dim), like Inception's pool3. ``forward(x)`` adds a
    linear head to ``num_classes`` logits (``num_classes = 0``: no head). Inputs are in model space
    (pixels/127.5 − 1, ``images.from_uint8``), (N, in_channels, H, W) with (H, W) = ``hw``: ``image_size`` is
    one integer for square images or [H, W] for others (the stages run until both sides are at most 4)."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int | Sequence[int] = 8,
        width: int = 32,
        feature_dim: int = 64,
        num_classes: int = 10,
    ):
        super().__init__()
        sides = [image_size] if isinstance(image_size, int) else list(image_size)
        if not 1 <= len(sides) <= 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in sides):
            raise ValueError(f"FeatureNet image_size must be an integer or [H, W] integers, got {image_size!r}")
        for name, v, lo in (
            ("in_channels", in_channels, 1),
            *(("image_size", side, 2) for side in sides),
            ("width", width, 1),
            ("feature_dim", feature_dim, 1),
            ("num_classes", num_classes, 0),
        ):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"FeatureNet {name} must be an integer ≥ {lo}, got {v!r}")
        h, w = sides * (3 - len(sides))
        # one integer when square: the config (and so the digest and id) of square networks stays what it was
        self.image_size: int | list[int] = h if h == w else [h, w]
        self.in_channels, self.width = in_channels, width
        self.feature_dim, self.num_classes = feature_dim, num_classes
        layers, c = [_block(in_channels, width)], width
        while True:
            layers += [_block(c, 2 * c, stride=2), _block(2 * c, 2 * c)]
            c, h, w = 2 * c, (h + 1) // 2, (w + 1) // 2
            if max(h, w) <= 4:
                break
        layers.append(_block(c, feature_dim))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes) if num_classes else None

    @property
    def hw(self) -> tuple[int, int]:
        """The (H, W) of the images the network takes."""
        size = self.image_size
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "width": self.width,
            "feature_dim": self.feature_dim,
            "num_classes": self.num_classes,
        }

    def features(self, x: Tensor) -> Tensor:
        """The penultimate features: the global average of the last block, (N, feature_dim)."""
        return self.body(x).mean(dim=(-2, -1))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes)."""
        if self.head is None:
            raise ValueError("this FeatureNet has no classifier head (num_classes = 0)")
        return self.head(self.features(x))

    def _serialized(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        return tensors, {FEATURENET_KEY: json.dumps(self.config(), sort_keys=True), "format": FEATURENET_FORMAT}

    def save(self, path: str | os.PathLike) -> None:
        """Weights to .safetensors with ``config()`` in the metadata (``opdiff.featurenet``)."""
        from safetensors.torch import save

        tensors, meta = self._serialized()
        data = save(tensors, metadata=meta)
        atomic_write(Path(path), lambda f: f.write(data))

    def digest(self) -> str:
        """sha256 of the config (JSON) and the weights (every tensor's name, dtype, shape and bytes, in name
        order): the same for a network and the file ``save`` writes of it. (Not the file's own sha256:
        safetensors writes the metadata entries in no fixed order.)"""
        tensors, meta = self._serialized()
        h = hashlib.sha256(meta[FEATURENET_KEY].encode())
        for name in sorted(tensors):
            t = tensors[name]
            h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str = "cpu") -> "FeatureNet":
        """Rebuild a FeatureNet written by ``save`` (safetensors only: never unpickles)."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature network {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(
                f"{str(path)!r} is not a readable safetensors file ({oneline(e)}); "
                "a feature network is written by FeatureNet.save"
            ) from None
        if FEATURENET_KEY not in meta or meta.get("format") != FEATURENET_FORMAT:
            raise ValueError(
                f"{str(path)!r} has no {FEATURENET_FORMAT} metadata: it is not a feature network saved "
                "by opdiff (FeatureNet.save / train_feature_net)"
            )
        try:
            net = cls(**json.loads(meta[FEATURENET_KEY]))
            net.load_state_dict(state)
        except (json.JSONDecodeError, TypeError, RuntimeError, ValueError) as e:
            raise ValueError(f"{str(path)!r} holds a malformed feature network ({oneline(e)})") from None
        return net.to(map_location).eval()


class FeatureNetExtractor(FeatureExtractor):
    """``FeatureNet.features`` of model-space images (``images.from_uint8``). ``net``: a FeatureNet or the path of
    one saved with ``FeatureNet.save``. The id is ``featurenet:<FeatureNet.digest()>[:12]`` (config and weights)."""

    def __init__(self, net: FeatureNet | str | os.PathLike, device: str = "cpu"):
        if isinstance(net, FeatureNet):
            self.net, self.path, digest = net, None, net.digest()
        else:
            self.path = Path(net)
            self.net = FeatureNet.load(self.path)
            digest = self.net.digest()
        self.net.eval()
        self.id = f"featurenet:{digest[:12]}"
        self.dim = self.net.feature_dim
        self.device = device

    def check(self, pixels: np.ndarray) -> None:
        """The images must have the network's height, width and channels: a FeatureNet never resizes (its features
        of other sizes or aspects would mean nothing), unlike Inception, which takes any size and aspect."""
        _, h, w, c = pixels.shape
        n = self.net
        (nh, nw), nc = n.hw, n.in_channels
        if (h, w, c) != (nh, nw, nc):
            name = str(self.path) if self.path else "the feature network"
            aspect = " (another aspect ratio)" if h * nw != w * nh else ""
            raise FIDInputError(
                f"the images are {h}×{w} with {c} channel(s){aspect} but {name} takes only {nh}×{nw} with {nc} "
                f"channel(s); use --feature-extractor inception (any size and aspect ratio) or a feature network "
                f"trained on {h}×{w} images (train_feature_net)"
            )

    def features(self, pixels, batch_size=64, device=None, progress=None):
        """(N, feature_dim) features of uint8 (N, H, W, C) pixels."""
        device = device or self.device
        net = self.net.to(device)
        return self._run(pixels, batch_size, progress, lambda b: net.features(from_uint8(b).to(device)))


# --------------------------------------------------------------------------------------------------
# Training a FeatureNet
# --------------------------------------------------------------------------------------------------
def _shift(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translations by up to ``max_shift`` pixels per image (edge-replicated border)."""
    n, _, h, w = x.shape
    pad = nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(x)
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            idx = ((offs[:, 0] == dy) & (offs[:, 1] == dx)).nonzero().flatten()
            if len(idx):
                out[idx] = pad[idx, :, dy : dy + h, dx : dx + w]
    return out


def _accuracy(net: FeatureNet, x: Tensor, y: Tensor, batch_size: int) -> float:
    if len(x) == 0:
        return float("nan")
    net.eval()
    with torch.inference_mode():
        hits = sum(
            int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
            for i in range(0, len(x), batch_size)
        )
    return hits / len(x)


def train_feature_net(
    images: ImageSet,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    augment: bool = True,
    progress: Optional[Callable[[int, dict], None]] = None,
    width: int = 32,
    feature_dim: int = 64,
    holdout: float = 0.1,
    device: str = "cpu",
) -> tuple[FeatureNet, dict[str, float]]:
    """Train a ``FeatureNet`` classifier on labelled images (cross-entropy, AdamW, cosine learning rate).

    A random ``holdout`` share (10%) is kept out of training to estimate accuracy; with ``augment``, every
    batch is shifted by random ±1-pixel translations. ``progress(epoch, metrics)`` is called after every
    epoch. Returns the network (eval mode, on CPU) and ``{"train_accuracy", "heldout_accuracy", "n_train",
    "n_heldout", "epochs"}``."""
    if images.labels is None:
        raise ValueError(f"{images.source!r} has no labels; a feature network is trained as a classifier")
    if epochs < 1 or batch_size < 1 or not 0 <= holdout < 1:
        raise ValueError(f"need epochs ≥ 1, batch_size ≥ 1 and 0 ≤ holdout < 1 (got {epochs}, {batch_size}, {holdout})")
    c, h, w = images.shape
    labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.long)
    if labels.min() < 0:
        raise ValueError("labels must be integers ≥ 0")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = images.tensor()
    perm = torch.randperm(len(x_all), generator=gen)
    n_hold = int(round(holdout * len(x_all)))
    hold, train = perm[:n_hold], perm[n_hold:]
    net = FeatureNet(c, [h, w], width, feature_dim, int(labels.max()) + 1).to(device)
    x_tr, y_tr = x_all[train].to(device), labels[train].to(device)
    x_ho, y_ho = x_all[hold].to(device), labels[hold].to(device)
    steps_per_epoch = -(-len(x_tr) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15)
    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_tr), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(x_tr), batch_size):
            idx = order[i : i + batch_size]
            xb = x_tr[idx]
            if augment:
                xb = _shift(xb.cpu(), gen).to(device)
            loss = nn.functional.cross_entropy(net(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        metrics = {"epoch": epoch + 1, "loss": total / len(x_tr)}
        if progress is not None:
            progress(epoch + 1, metrics)
    metrics = {
        "train_accuracy": _accuracy(net, x_tr, y_tr, 512),
        "heldout_accuracy": _accuracy(net, x_ho, y_ho, 512),
        "n_train": len(x_tr),
        "n_heldout": len(x_ho),
        "epochs": epochs,
    }
    return net.cpu().eval(), metrics
