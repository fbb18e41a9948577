"""Fréchet Inception Distance (FID) through clean-fid, with cached reference statistics.

FID (Heusel et al. 2017) fits a Gaussian N(μ, Σ) to the features of each image set and reports the
Fréchet (2-Wasserstein) distance between the two Gaussians,

    FID = |μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2}),

computed here in float64 (``frechet_distance``, no ``scipy.linalg.sqrtm``). The features come from a
``FeatureExtractor``:

  * ``InceptionExtractor``: clean-fid's torchscript InceptionV3 (``InceptionV3W``, 2048-d pool3 features)
    with clean-fid's "clean" preprocessing (PIL bicubic resize to 299×299 on float pixels). Its numbers
    are comparable with clean-fid's published ones. The weights file is never downloaded: it must be
    present locally (see ``InceptionExtractor``);
  * ``FeatureNetExtractor``: a small CNN (``FeatureNet``) trained as a classifier on small images, e.g.
    the 8×8 digits, where Inception features (of 8×8 images blown up to 299×299) mean little. Its FID is
    only comparable with FIDs of the same network (same ``extractor`` id).

Statistics (``FeatureStats``) carry the extractor id they were computed with; distances between
statistics of different extractors are refused. Reference statistics are cached on disk
(``reference_stats``), keyed by the extractor id and the image set's identity.

Pixels are uint8 (N, H, W, C) arrays, as in ``operator_diffusion.images``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .images import ImageSet, as_rgb, check_pixels, from_uint8, load_images
from .settings import CACHE_ENV, cache_root  # noqa: F401  (CACHE_ENV: the cache root variable, for callers)

__all__ = [
    "FeatureStats",
    "FeatureExtractor",
    "InceptionExtractor",
    "FeatureNet",
    "FeatureNetExtractor",
    "FIDInputError",
    "stats_from_features",
    "frechet_distance",
    "load_extractor",
    "train_feature_net",
    "stats_of_images",
    "fid_of_pixels",
    "reference_stats",
    "source_stats",
    "compute_fid",
    "default_cache_dir",
    "cleanfid_stats_path",
    "small_sample_warning",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "DIGITS_FEATURENET",
]

STATS_FORMAT_VERSION = 1
FEATURENET_KEY = "opdiff.featurenet"  # safetensors metadata entry holding FeatureNet.config()
FEATURENET_FORMAT = "opdiff-featurenet/1"
INCEPTION_NAME = "inception-2015-12-05.pt"  # clean-fid's file name (cleanfid/inception_torchscript.py)
# clean-fid's hard-coded location (cleanfid/features.py: "./" on Windows, "/tmp" elsewhere)
INCEPTION_FILE = os.path.join("./" if platform.system() == "Windows" else "/tmp", INCEPTION_NAME)
# where clean-fid downloads it from (cleanfid/downloads_helper.py: inception_url)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"  # cleanfid/features.py: get_reference_statistics
ASSETS = Path(__file__).resolve().parent / "assets"  # shipped with the package (operator_diffusion/assets/README.md)
DIGITS_FEATURENET = ASSETS / "digits_featurenet.safetensors"
DIGITS_STATS = ASSETS / "digits_fid_stats.npz"  # FeatureStats of the 1,797 digits under DIGITS_FEATURENET

Progress = Callable[[int, int], None]  # progress(images_done, images_total), called after every batch
Source = Union[str, os.PathLike, np.ndarray, ImageSet]


class FIDInputError(ValueError):
    """Inputs that cannot be compared: images of the wrong shape for the feature network, statistics of
    different extractors, too few images. A usage error, not a compute fault."""


# --------------------------------------------------------------------------------------------------
# Statistics and the distance
# --------------------------------------------------------------------------------------------------
@dataclass
class FeatureStats:
    """The Gaussian fitted to the features of ``n`` images: mean ``mu`` (D,) and covariance ``sigma`` (D, D),
    both float64, with the ``extractor`` id that produced the features and where the images came from.
    ``n = 0`` means unknown (clean-fid's published statistics do not record it)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    source: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz with ``mu``, ``sigma``, ``n`` and ``meta`` (a JSON string: extractor, source, identity,
        format_version). Written atomically (temporary file, then rename); no pickled objects."""
        meta = json.dumps(
            {
                "extractor": self.extractor,
                "source": self.source,
                "identity": self.identity,
                "format_version": STATS_FORMAT_VERSION,
            },
            sort_keys=True,
        )
        _atomic_write(
            Path(path),
            lambda f: np.savez(
                f,
                mu=np.asarray(self.mu, np.float64),
                sigma=np.asarray(self.sigma, np.float64),
                n=np.asarray(int(self.n), np.int64),
                meta=np.asarray(meta),
            ),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStats":
        """Read statistics written by ``save`` (``np.load(allow_pickle=False)``: never unpickles).
        Anything else is a ``ValueError`` saying what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
        hint = "write statistics with `opdiff fid SOURCE --save-stats PATH` (or FeatureStats.save)"
        try:
            z = np.load(str(path), allow_pickle=False)
        except Exception as e:  # pickle, truncated zip, not a numpy file at all
            raise ValueError(f"{str(path)!r} is not a readable .npz statistics file ({_oneline(e)}); {hint}") from None
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{str(path)!r} is a single .npy array, not an .npz statistics file; {hint}")
        with z:
            missing = [k for k in ("mu", "sigma", "n", "meta") if k not in z.files]
            if missing:
                extra = ""
                if "meta" in missing and "mu" in z.files and "sigma" in z.files:
                    extra = (
                        " (mu/sigma without opdiff metadata, e.g. clean-fid's own files: opdiff cannot tell "
                        "which feature network made them; use --ref cleanfid:NAME/RES/SPLIT for clean-fid's)"
                    )
                raise ValueError(f"{str(path)!r} lacks {', '.join(missing)}{extra}; {hint}")
            try:
                mu, sigma, n, meta = z["mu"], z["sigma"], z["n"], z["meta"]
            except ValueError:  # object arrays need pickle: refused
                raise ValueError(f"{str(path)!r} holds pickled object arrays, which are never loaded; {hint}") from None
        if mu.ndim != 1 or mu.dtype.kind != "f" or sigma.shape != (mu.shape[0], mu.shape[0]) or sigma.dtype.kind != "f":
            raise ValueError(
                f"{str(path)!r} has mu {mu.dtype}{mu.shape} and sigma {sigma.dtype}{sigma.shape}; "
                f"statistics need float mu (D,) and sigma (D, D); {hint}"
            )
        if n.shape != () or n.dtype.kind not in "iu" or int(n) < 0 or meta.shape != () or meta.dtype.kind != "U":
            raise ValueError(
                f"{str(path)!r} has a malformed n ({n.dtype}{n.shape}) or meta ({meta.dtype}{meta.shape}); {hint}"
            )
        try:
            info = json.loads(str(meta))
            version, extractor = info["format_version"], info["extractor"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{str(path)!r} has unreadable meta ({_oneline(e)}); {hint}") from None
        if version != STATS_FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has statistics format_version {version!r}; this opdiff reads "
                f"{STATS_FORMAT_VERSION}; recompute them with this opdiff"
            )
        return cls(
            mu.astype(np.float64),
            sigma.astype(np.float64),
            int(n),
            str(extractor),
            str(info.get("source", "")),
            dict(info.get("identity") or {}),
        )


def stats_from_features(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the unbiased covariance (``np.cov(rowvar=False)``, divisor N − 1) of (N, D) features,
    in float64, as clean-fid's ``fid_from_feats``. Needs N ≥ 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise FIDInputError(f"features must be an (N, D) array, got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise FIDInputError(f"FID needs at least 2 images for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def check_compatible(stats1: FeatureStats, stats2: FeatureStats) -> None:
    """Refuse statistics of different feature extractors (ids or dimensions): their FID means nothing."""
    if stats1.extractor != stats2.extractor or stats1.dim != stats2.dim:
        raise FIDInputError(
            f"the statistics come from different feature extractors ({stats1.extractor!r}, D={stats1.dim} for "
            f"{stats1.source or 'the first'} vs {stats2.extractor!r}, D={stats2.dim} for "
            f"{stats2.source or 'the second'}); "
            "compute both with the same --feature-extractor"
        )


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((Σ₁Σ₂)^{1/2}) for symmetric positive semi-definite Σ₁, Σ₂, in float64: Σ₁Σ₂ is similar to the symmetric
    S = Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so the trace is Σᵢ √λᵢ(S), with Σ₁^{1/2} and the λᵢ from ``eigh`` (eigenvalues that
    round-off pushes below 0 count as 0). No ``scipy.linalg.sqrtm``, whose ``disp`` argument SciPy removes."""
    s1 = 0.5 * (np.asarray(sigma1, np.float64) + np.asarray(sigma1, np.float64).T)
    s2 = 0.5 * (np.asarray(sigma2, np.float64) + np.asarray(sigma2, np.float64).T)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    sym = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh(0.5 * (sym + sym.T))
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(stats1: FeatureStats, stats2: FeatureStats) -> float:
    """|μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2}) (Heusel et al. 2017, the FID), in float64 with
    ``trace_sqrt_product``. Statistics of different extractors are refused (``FIDInputError``)."""
    check_compatible(stats1, stats2)
    mu1, mu2 = np.asarray(stats1.mu, np.float64), np.asarray(stats2.mu, np.float64)
    s1, s2 = np.asarray(stats1.sigma, np.float64), np.asarray(stats2.sigma, np.float64)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))


def small_sample_warning(stats: FeatureStats, what: str = "") -> Optional[str]:
    """A warning when fewer images than feature dimensions were used: Σ is then singular and FID is
    biased upwards and unstable (it decreases with N); compare FIDs only at equal N."""
    if 0 < stats.n < stats.dim:
        return (
            f"{what or stats.source or 'the images'}: {stats.n} images for {stats.dim}-dimensional features; "
            f"with N < D the covariance is singular and FID is strongly biased (compare FIDs only at equal N)"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------
class FeatureExtractor:
    """``id`` names the network and its weights (statistics are only comparable under equal ids);
    ``features(pixels, batch_size, device, progress)`` maps uint8 (N, H, W, C) pixels to (N, D) float64."""

    id: str = ""
    dim: int = 0

    def check(self, pixels: np.ndarray) -> None:
        """Raise ``FIDInputError`` when the images cannot go through this extractor."""
        check_pixels(pixels)

    def features(
        self,
        pixels: np.ndarray,
        batch_size: int = 64,
        device: Optional[str] = None,
        progress: Optional[Progress] = None,
    ) -> np.ndarray:
        raise NotImplementedError

    def _run(
        self, pixels: np.ndarray, batch_size: int, progress: Optional[Progress], fn: Callable[[np.ndarray], Tensor]
    ) -> np.ndarray:
        pixels = check_pixels(pixels)
        if pixels.ndim != 4:
            raise FIDInputError(f"images must be an (N, H, W, C) array, got shape {pixels.shape}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.check(pixels)
        out = []
        with torch.inference_mode():
            for start in range(0, len(pixels), batch_size):
                out.append(fn(pixels[start : start + batch_size]).detach().to("cpu", torch.float64).numpy())
                if progress is not None:
                    progress(min(start + batch_size, len(pixels)), len(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim))


def clean_preprocess(pixels: np.ndarray) -> Tensor:
    """clean-fid's "clean" preprocessing of uint8 (N, H, W, C) pixels: grayscale → RGB, then per image
    ``cleanfid.resize.build_resizer("clean")`` (PIL bicubic to 299×299 on float32, clipped to [0, 255]),
    then (N, 3, 299, 299) float32 in [0, 255], as ``cleanfid.utils.ResizeDataset`` hands it to the model
    (``ToTensor`` does not rescale float arrays)."""
    from cleanfid.resize import build_resizer

    resize = build_resizer("clean")
    rgb = as_rgb(pixels)
    return torch.from_numpy(np.stack([resize(im) for im in rgb]).transpose(0, 3, 1, 2).copy())


def _inception_module(path: str):
    """clean-fid's ``InceptionV3W`` (its ``forward``: (x − 128)/128 through the torchscript ``layers`` to
    2048 features, no resizing inside) over the torchscript weights at ``path`` (any file name)."""
    from cleanfid.inception_torchscript import InceptionV3W

    class _InceptionFile(InceptionV3W):
        def __init__(self, file: str):  # InceptionV3W.__init__ only allows <folder>/inception-2015-12-05.pt
            nn.Module.__init__(self)
            with warnings.catch_warnings():  # torch ≥ 2.9 deprecates TorchScript; clean-fid's weights are TorchScript
                warnings.simplefilter("ignore", FutureWarning)
                self.base = torch.jit.load(file, map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = False

    return _InceptionFile(path).eval()


class InceptionExtractor(FeatureExtractor):
    """clean-fid's InceptionV3 features in "clean" mode (``build_feature_extractor("clean")``: the torchscript
    model, resize outside the network). ``path``: the torchscript weights, default clean-fid's own
    ``/tmp/inception-2015-12-05.pt``. Never downloads: a missing file is a ``FileNotFoundError`` saying
    where to put it and where clean-fid gets it from. The model is loaded on first use."""

    dim = 2048

    def __init__(self, path: Optional[str | os.PathLike] = None, device: str = "cpu"):
        self.path = Path(path) if path is not None else Path(INCEPTION_FILE)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"the Inception weights {str(self.path)!r} are missing (opdiff never downloads): fetch {INCEPTION_URL} "
                f"on a machine with network and copy it to {INCEPTION_FILE} or pass --inception-path PATH"
            )
        from .provenance import file_sha256

        self.sha256 = file_sha256(self.path)
        self.id = f"inception_v3:clean:{self.sha256[:12]}"
        self.device = device
        self._model = None

    def model(self, device: Optional[str] = None):
        if self._model is None:
            try:
                self._model = _inception_module(str(self.path))
            except RuntimeError as e:
                raise ValueError(
                    f"{str(self.path)!r} is not clean-fid's torchscript Inception ({_oneline(e)}); get {INCEPTION_URL}"
                ) from None
        return self._model.to(device or self.device)

    def features(self, pixels, batch_size=64, device=None, progress=None):
        """2048-d pool3 features of clean-fid's clean mode (see ``clean_preprocess``)."""
        device = device or self.device
        model = self.model(device)
        return self._run(pixels, batch_size, progress, lambda b: model(clean_preprocess(b).to(device)))


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
    (pixels/127.5 − 1, ``images.from_uint8``), (N, in_channels, image_size, image_size)."""

    def __init__(
        self, in_channels: int = 1, image_size: int = 8, width: int = 32, feature_dim: int = 64, num_classes: int = 10
    ):
        super().__init__()
        for name, v, lo in (
            ("in_channels", in_channels, 1),
            ("image_size", image_size, 2),
            ("width", width, 1),
            ("feature_dim", feature_dim, 1),
            ("num_classes", num_classes, 0),
        ):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"FeatureNet {name} must be an integer ≥ {lo}, got {v!r}")
        self.in_channels, self.image_size, self.width = in_channels, image_size, width
        self.feature_dim, self.num_classes = feature_dim, num_classes
        layers, c, size = [_block(in_channels, width)], width, image_size
        while True:
            layers += [_block(c, 2 * c, stride=2), _block(2 * c, 2 * c)]
            c, size = 2 * c, (size + 1) // 2
            if size <= 4:
                break
        layers.append(_block(c, feature_dim))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(feature_dim, num_classes) if num_classes else None

    def config(self) -> dict[str, int]:
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
        _atomic_write(Path(path), lambda f: f.write(data))

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
                f"{str(path)!r} is not a readable safetensors file ({_oneline(e)}); "
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
            raise ValueError(f"{str(path)!r} holds a malformed feature network ({_oneline(e)})") from None
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
        _, h, w, c = pixels.shape
        n = self.net
        if (h, w, c) != (n.image_size, n.image_size, n.in_channels):
            name = str(self.path) if self.path else "the feature network"
            raise FIDInputError(
                f"the images are {h}×{w} with {c} channel(s) but {name} takes {n.image_size}×{n.image_size} with "
                f"{n.in_channels} channel(s); use a feature network trained on such images or --feature-extractor "
                "inception"
            )

    def features(self, pixels, batch_size=64, device=None, progress=None):
        """(N, feature_dim) features of uint8 (N, H, W, C) pixels."""
        device = device or self.device
        net = self.net.to(device)
        return self._run(pixels, batch_size, progress, lambda b: net.features(from_uint8(b).to(device)))


def load_extractor(
    spec: str | FeatureExtractor, inception_path: Optional[str | os.PathLike] = None, device: str = "cpu"
) -> FeatureExtractor:
    """``"inception"`` (clean-fid's InceptionV3, weights at ``inception_path`` or /tmp), ``"digits"`` (the
    shipped 8×8 digits FeatureNet) or the path of a FeatureNet .safetensors file."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if spec == "inception":
        return InceptionExtractor(inception_path, device)
    if spec == "digits":
        if not DIGITS_FEATURENET.is_file():
            raise FileNotFoundError(
                f"the shipped digits feature network is missing ({DIGITS_FEATURENET}); reinstall opdiff, or train one "
                "with operator_diffusion.fid.train_feature_net and pass its path as --feature-extractor PATH"
            )
        return FeatureNetExtractor(DIGITS_FEATURENET, device)
    if Path(spec).is_file():
        return FeatureNetExtractor(spec, device)
    raise FileNotFoundError(
        f"unknown feature extractor {spec!r}: use inception, digits or the path of a FeatureNet .safetensors file"
    )


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
    if h != w:
        raise ValueError(f"FeatureNet takes square images, {images.source!r} holds {h}×{w}")
    labels = torch.as_tensor(np.asarray(images.labels), dtype=torch.long)
    if labels.min() < 0:
        raise ValueError("labels must be integers ≥ 0")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = images.tensor()
    perm = torch.randperm(len(x_all), generator=gen)
    n_hold = int(round(holdout * len(x_all)))
    hold, train = perm[:n_hold], perm[n_hold:]
    net = FeatureNet(c, h, width, feature_dim, int(labels.max()) + 1).to(device)
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


# --------------------------------------------------------------------------------------------------
# Statistics of image sources, with a cache for references
# --------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``fid/`` under the cache root (``$OPDIFF_CACHE``, else ``~/.cache/opdiff``)."""
    return cache_root() / "fid"


def _array_set(pixels: np.ndarray, num: Optional[int]) -> ImageSet:
    pixels = check_pixels(pixels, "pixels")
    if pixels.ndim != 4:
        raise FIDInputError(f"pixels must be an (N, H, W, C) array, got shape {pixels.shape}")
    if num is not None:
        pixels = pixels[:num]
    pixels = np.ascontiguousarray(pixels)
    digest = hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return ImageSet(pixels, None, "array", {"kind": "array", "sha256": digest, "n": len(pixels)})


def _npz_kind(path: Path) -> str:
    """'stats' (mu/sigma), 'images' (images/arr_0) or 'other' for an .npz file (keys only: nothing is loaded)."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            files = set(z.files)
    except Exception:
        return "other"
    if {"mu", "sigma"} <= files and not {"images", "arr_0"} & files:
        return "stats"
    if {"mu", "sigma", "meta"} <= files:
        return "stats"
    return "images" if {"images", "arr_0"} & files else "other"


def open_source(
    source: Source, num: Optional[int] = None, split: str = "train", column: Optional[str] = None
) -> Union[ImageSet, FeatureStats]:
    """An image source (anything ``images.load_images`` reads, a uint8 (N, H, W, C) array or an ImageSet) as
    an ImageSet, or a statistics .npz (written by ``FeatureStats.save``) as FeatureStats."""
    if isinstance(source, ImageSet):
        if num is not None:
            return ImageSet(
                source.images[:num],
                None if source.labels is None else source.labels[:num],
                source.source,
                {**source.identity, "n": min(num, len(source))},
            )
        return source
    if isinstance(source, np.ndarray):
        return _array_set(source, num)
    path = Path(source)
    if path.is_file() and path.suffix == ".npz" and _npz_kind(path) == "stats":
        if num is not None:
            raise FIDInputError(f"{str(path)!r} holds precomputed statistics: a number of images does not apply to it")
        return FeatureStats.load(path)
    if path.is_file() and path.suffix == ".npz" and _npz_kind(path) == "other":
        raise ValueError(
            f"{str(path)!r} is neither an image .npz ('images' or 'arr_0') nor statistics ('mu', 'sigma', "
            "'meta' written by --save-stats)"
        )
    return load_images(source, num=num, split=split, column=column)


def stats_of_images(
    pixels: np.ndarray | ImageSet,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> FeatureStats:
    """The FeatureStats (mean, covariance) of the extractor's features of uint8 (N, H, W, C) pixels."""
    images = pixels if isinstance(pixels, ImageSet) else _array_set(pixels, None)
    feats = extractor.features(images.images, batch_size, device, progress)
    mu, sigma = stats_from_features(feats)
    return FeatureStats(mu, sigma, len(feats), extractor.id, images.source, images.identity)


def fid_of_pixels(
    pixels: np.ndarray,
    ref_stats: FeatureStats,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> float:
    """FID of in-memory uint8 (N, H, W, C) pixels (e.g. fresh samples) against reference statistics."""
    if ref_stats.extractor != extractor.id:
        raise FIDInputError(
            f"the reference statistics were computed with {ref_stats.extractor!r}, not with the "
            f"feature extractor {extractor.id!r}; use the same extractor for both"
        )
    return frechet_distance(stats_of_images(pixels, extractor, batch_size, device, progress), ref_stats)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write through ``write(file)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cache_key(extractor_id: str, identity: dict, num: Optional[int]) -> str:
    """``sha256`` of (extractor id, image-set identity, number of images), first 16 hex digits: the cache
    file's name (``<key>.npz``)."""
    blob = json.dumps(
        {"extractor": extractor_id, "identity": identity, "num": num, "v": STATS_FORMAT_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cleanfid_stats_path(
    name: str, res: str, split: str, cache_dir: Optional[str | os.PathLike] = None
) -> tuple[str, list[Path]]:
    """clean-fid's published statistics file for clean mode, InceptionV3 (``get_reference_statistics``): its URL
    and the local places opdiff looks for it: clean-fid's own ``cleanfid/stats/`` folder, then the cache dir."""
    import cleanfid

    res = "na" if split == "custom" else res
    rel = f"{name}_clean_{split}_{res}.npz".lower()
    folders = [
        Path(os.path.dirname(cleanfid.__file__)) / "stats",
        Path(cache_dir) if cache_dir else default_cache_dir(),
    ]
    return f"{CLEANFID_STATS_URL}/{rel}", [f / rel for f in folders]


def _cleanfid_reference(spec: str, extractor: FeatureExtractor, cache_dir) -> FeatureStats:
    parts = spec[len("cleanfid:") :].split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError(
            f"bad clean-fid reference {spec!r}: use cleanfid:NAME/RES/SPLIT, e.g. cleanfid:cifar10/32/train"
        )
    if not isinstance(extractor, InceptionExtractor):
        raise FIDInputError(f"{spec} holds clean-fid's InceptionV3 statistics: use --feature-extractor inception")
    url, paths = cleanfid_stats_path(*parts, cache_dir=cache_dir)
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"clean-fid's statistics for {spec} are not here (opdiff never downloads): fetch {url} "
            f"and put it at {paths[0]} or {paths[1]}"
        )
    try:
        with np.load(str(path), allow_pickle=False) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except Exception as e:
        raise ValueError(
            f"{str(path)!r} is not a readable clean-fid statistics file ({_oneline(e)}); fetch {url} again"
        ) from None
    if mu.shape != (extractor.dim,) or sigma.shape != (extractor.dim, extractor.dim):
        raise ValueError(f"{str(path)!r} has mu {mu.shape}, sigma {sigma.shape}; expected 2048-d Inception statistics")
    return FeatureStats(mu, sigma, 0, extractor.id, spec, {"kind": "cleanfid", "file": path.name})


def reference_stats(
    source: Source,
    extractor: FeatureExtractor,
    num: Optional[int] = None,
    split: str = "train",
    column: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
    use_cache: bool = True,
) -> FeatureStats:
    """Statistics of a reference: a statistics .npz (loaded), ``cleanfid:NAME/RES/SPLIT`` (clean-fid's published
    InceptionV3 statistics, already on disk), or an image source, whose statistics are computed once and
    cached in ``cache_dir`` (default ``default_cache_dir()``) as ``<cache_key>.npz``."""
    if isinstance(source, str) and source.startswith("cleanfid:"):
        if num is not None:
            raise FIDInputError(f"{source} holds precomputed statistics: a number of images does not apply to it")
        return _cleanfid_reference(source, extractor, cache_dir)
    opened = open_source(source, num, split, column)
    if isinstance(opened, FeatureStats):
        return opened
    if not use_cache:
        return stats_of_images(opened, extractor, batch_size, device, progress)
    # keyed by the number of images actually used, so that truncating before or inside this call shares entries
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(extractor.id, opened.identity, len(opened))}.npz"
    if path.is_file():
        try:
            cached = FeatureStats.load(path)
            if cached.extractor == extractor.id:
                return cached
        except ValueError:
            pass  # a damaged cache entry is recomputed
    stats = stats_of_images(opened, extractor, batch_size, device, progress)
    with contextlib.suppress(OSError):  # a read-only cache only costs the recomputation next time
        stats.save(path)
    return stats


def source_stats(
    source: Source,
    extractor: FeatureExtractor,
    num: Optional[int] = None,
    split: str = "train",
    column: Optional[str] = None,
    batch_size: int = 64,
    device: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> FeatureStats:
    """Statistics of the images under test (not cached: samples change): an image source, an array of pixels or
    a statistics .npz."""
    opened = open_source(source, num, split, column)
    return (
        opened if isinstance(opened, FeatureStats) else stats_of_images(opened, extractor, batch_size, device, progress)
    )


def compute_fid(
    source: Source,
    reference: Source,
    extractor: FeatureExtractor | str = "inception",
    num: Optional[int] = None,
    ref_num: Optional[int] = None,
    split: str = "train",
    column: Optional[str] = None,
    cache_dir: Optional[str | os.PathLike] = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: Optional[Progress] = None,
    inception_path: Optional[str] = None,
    save_stats: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """FID of ``source`` (image source, uint8 pixels or statistics .npz) against ``reference`` (the same, or
    ``cleanfid:NAME/RES/SPLIT``; its statistics are cached). ``extractor``: a FeatureExtractor or a
    ``load_extractor`` spec, loaded only if some features must be computed. ``save_stats`` writes the
    source's statistics. Returns ``{fid, n_source, n_reference, extractor, source, reference}``."""
    src = open_source(source, num, split, column)
    ref_is_named = isinstance(reference, str) and reference.startswith("cleanfid:")
    ref = None if ref_is_named else open_source(reference, ref_num, split, column)
    needs = ref_is_named or isinstance(src, ImageSet) or isinstance(ref, ImageSet)
    ext = load_extractor(extractor, inception_path, device) if needs else None
    if ext is not None:
        for s in (src, ref):
            if isinstance(s, FeatureStats) and s.extractor != ext.id:
                raise FIDInputError(
                    f"{s.source or 'the statistics'} were computed with {s.extractor!r}, but the feature "
                    f"extractor is {ext.id!r}; pass the same --feature-extractor"
                )
    src_stats = src if isinstance(src, FeatureStats) else stats_of_images(src, ext, batch_size, device, progress)
    if ref_is_named or isinstance(ref, ImageSet):
        ref_stats = reference_stats(
            ref if ref is not None else reference,
            ext,
            ref_num if ref_is_named else None,
            split,
            column,
            cache_dir,
            batch_size,
            device,
            progress,
        )
    else:
        ref_stats = ref
    value = frechet_distance(src_stats, ref_stats)
    if save_stats is not None:
        src_stats.save(save_stats)
    return {
        "fid": value,
        "n_source": src_stats.n,
        "n_reference": ref_stats.n or None,
        "extractor": src_stats.extractor,
        "source": src_stats.source,
        "reference": ref_stats.source,
    }


def _oneline(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
