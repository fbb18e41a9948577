"""Statistics of image sources and FID end to end: the extractor named by a spec (``load_extractor``), image sources
(``open_source``), their statistics (``stats_of_images``, ``source_stats``), the on-disk cache of reference
statistics (``reference_stats``, keyed by ``cache_key``), clean-fid's published statistics (``cleanfid:``) and
``compute_fid``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..images import ImageSet, check_pixels, load_images
from ..settings import cache_root
from .extractor import FeatureExtractor, Progress
from .featurenet import DIGITS_FEATURENET, FeatureNetExtractor
from .files import oneline
from .frechet import STATS_FORMAT_VERSION, FeatureStats, FIDInputError, frechet_distance, stats_from_features
from .inception import InceptionExtractor

CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"  # cleanfid/features.py: get_reference_statistics
Source = Union[str, os.PathLike, np.ndarray, ImageSet]


def load_extractor(
    spec: str | FeatureExtractor,
    inception_path: Optional[str | os.PathLike] = None,
    device: str = "cpu",
    offline: Optional[bool] = None,
) -> FeatureExtractor:
    """``"inception"`` (clean-fid's InceptionV3, weights at ``inception_path`` or /tmp, downloaded there by clean-fid
    unless ``offline``, default ``HF_HUB_OFFLINE``), ``"digits"`` (the shipped 8×8 digits FeatureNet) or the path of
    a FeatureNet .safetensors file."""
    if isinstance(spec, FeatureExtractor):
        return spec
    if spec == "inception":
        return InceptionExtractor(inception_path, device, offline)
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
            f"{str(path)!r} is not a readable clean-fid statistics file ({oneline(e)}); fetch {url} again"
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
