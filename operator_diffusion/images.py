"""Images in and out: the one place that converts between model space and pixels and reads image sources.

Conventions (those of DDPM/EDM and clean-fid):
  * model space: float images (…, C, H, W) in [-1, 1];
  * pixels: uint8 arrays (…, H, W, C) with C = 1 (grayscale) or 3 (RGB), value = round((x + 1)·127.5).

Sources (``load_images``) are what `opdiff fid`, `opdiff bench` and `opdiff teacher train` accept:
  * ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes; ships with scikit-learn);
  * a folder of image files (searched recursively, sorted by path; an `opdiff sample` folder means its
    ``images/`` subfolder);
  * an ``.npz`` file with a uint8 (N, H, W, C) array ``images`` (or ``arr_0``, guided-diffusion's key);
  * a Hugging Face ``datasets`` dataset: a folder written by ``save_to_disk`` or a Hub id (``split`` and
    ``column`` choose the images; ``label``/``labels`` columns become labels).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SAMPLES_INFO = "opdiff_samples.json"  # marks a folder written by `opdiff sample`
SAMPLES_IMAGES = "images"  # its PNG subfolder (what clean-fid and `opdiff fid` read)


# --------------------------------------------------------------------------------------------------
# Model space <-> pixels
# --------------------------------------------------------------------------------------------------
def to_uint8(x: Tensor) -> np.ndarray:
    """(…, C, H, W) floats in [-1, 1] → (…, H, W, C) uint8 pixels, round((x + 1)·127.5) clipped to [0, 255]."""
    u = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u.movedim(-3, -1).numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """(…, H, W, C) uint8 pixels → (…, C, H, W) float32 in [-1, 1] (exact inverse of ``to_uint8`` on pixels)."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 127.5 - 1.0


def check_pixels(images: np.ndarray, what: str = "images") -> np.ndarray:
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim < 3
        or images.shape[-1] not in (1, 3)
    ):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ValueError(f"{what} must be uint8 (…, H, W, C) pixels with C = 1 or 3, got {dtype} {shape}")
    return images


def as_rgb(images: np.ndarray) -> np.ndarray:
    """Grayscale pixels (…, H, W, 1) repeated to RGB (…, H, W, 3); RGB returned as is."""
    images = check_pixels(images)
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0], mode="L") if image.shape[-1] == 1 else Image.fromarray(image, mode="RGB")


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Write one (H, W, C) uint8 image losslessly (grayscale for C = 1)."""
    _pil(check_pixels(image, "image")).save(str(path), format="PNG")


def image_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """Tile (N, H, W, C) pixels into one (rows·(H+pad)+pad, nrow·(W+pad)+pad, C) image, row-major
    (``nrow`` images per row; default ⌈√N⌉), ``pad`` pixels of ``pad_value`` between and around tiles."""
    images = check_pixels(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"image_grid needs a non-empty (N, H, W, C) array, got shape {images.shape}")
    n, h, w, c = images.shape
    nrow = int(nrow or int(np.ceil(np.sqrt(n))))
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y : y + h, x : x + w] = images[k]
    return grid


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (…, H, W, C) pixels (tiny 8×8 images are unreadable as is)."""
    return image if factor <= 1 else np.repeat(np.repeat(image, factor, axis=-3), factor, axis=-2)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """Pixels (N, H, W, C) uint8, optional integer labels (N,), and where they came from.

    ``identity`` is a JSON-able description that changes when the images do (used as a cache key)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""
    identity: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W), the model-space image shape."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def tensor(self) -> Tensor:
        """The images in model space: (N, C, H, W) float32 in [-1, 1]."""
        return from_uint8(self.images)

    def key(self) -> str:
        """A short content key (sha256 of the identity)."""
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]


def digits_images() -> ImageSet:
    """scikit-learn's 8×8 digits as (1797, 8, 8, 1) uint8 (values 0–16 scaled by 255/16) with labels 0–9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageSet(pixels, d.target.astype(np.int64), "digits", {"kind": "digits", "n": len(pixels)})


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def samples_folder(folder: str | os.PathLike) -> Path:
    """The folder whose images count: an `opdiff sample` output's ``images/``, else ``folder`` itself."""
    folder = Path(folder)
    return folder / SAMPLES_IMAGES if (folder / SAMPLES_INFO).is_file() else folder


def read_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, C) uint8: grayscale files keep one channel, everything else becomes RGB."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("L", "1", "I;16", "I", "F"):
            return np.asarray(im.convert("L"))[..., None]
        return np.asarray(im.convert("RGB"))


def read_image_folder(folder: str | os.PathLike, num: int | None = None) -> ImageSet:
    """All images of a folder (or the first ``num`` by sorted path); they must share one size and mode."""
    root = samples_folder(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder of images")
    files = image_files(root)
    if not files:
        raise ValueError(f"{str(root)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if num is not None:
        files = files[:num]
    images = [read_image(p) for p in files]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"the images in {str(root)!r} differ in size or channels ({sorted(shapes)[:3]}); resize them to one size "
            "first"
        )
    stat = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    identity = {
        "kind": "folder",
        "path": str(root.resolve()),
        "files": hashlib.sha256(json.dumps(stat).encode()).hexdigest(),
        "n": len(files),
    }
    return ImageSet(np.stack(images), None, str(root), identity)


def read_npz(path: str | os.PathLike, num: int | None = None) -> ImageSet:
    """Images from an .npz (``images`` or ``arr_0``; uint8 (N, H, W, C)); ``labels`` when present. No pickle."""
    from .provenance import file_sha256

    with np.load(str(path), allow_pickle=False) as z:
        key = "images" if "images" in z.files else "arr_0" if "arr_0" in z.files else None
        if key is None:
            raise ValueError(
                f"{str(path)!r} has no 'images' or 'arr_0' array (it has {', '.join(z.files) or 'nothing'})"
            )
        images = z[key]
        labels = z["labels"] if "labels" in z.files else None
    if images.ndim == 5:  # an `opdiff sample --times all` file: (N, M, H, W, C); the last time is the sample
        images = images[:, -1]
    images = check_pixels(np.ascontiguousarray(images), f"{path}:{key}")
    if num is not None:
        images = images[:num]
        labels = None if labels is None else labels[:num]
    identity = {"kind": "npz", "path": str(Path(path).resolve()), "sha256": file_sha256(path), "n": len(images)}
    return ImageSet(images, labels, str(path), identity)


def read_hf_dataset(name: str, split: str = "train", column: str | None = None, num: int | None = None) -> ImageSet:
    """Images of a ``datasets`` dataset (a ``save_to_disk`` folder or a Hub id), converted to uint8 pixels."""
    import datasets

    path = Path(name)
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(name)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"dataset {name!r} has no split {split!r}; it has {', '.join(ds)}")
        ds = ds[split]
    if column is None:
        found = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
        column = found[0] if found else next((k for k in ("image", "img") if k in ds.column_names), None)
    if column is None or column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no image column {column!r}; its columns: {', '.join(ds.column_names)}")
    if num is not None:
        ds = ds.select(range(min(num, len(ds))))
    images = []
    for item in ds[column]:
        if hasattr(item, "mode"):  # PIL image
            arr = (
                np.asarray(item.convert("L"))[..., None] if item.mode in ("L", "1") else np.asarray(item.convert("RGB"))
            )
        else:
            arr = np.asarray(item)
            arr = arr[..., None] if arr.ndim == 2 else arr
        images.append(arr)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(
            f"the images of dataset {name!r} differ in size ({sorted(shapes)[:3]}); resize them to one size first"
        )
    images = check_pixels(
        np.stack(images).astype(np.uint8) if images and images[0].dtype != np.uint8 else np.stack(images),
        f"dataset {name!r} column {column!r}",
    )
    label_col = next((k for k in ("label", "labels") if k in ds.column_names), None)
    labels = np.asarray(ds[label_col], dtype=np.int64) if label_col else None
    identity = {
        "kind": "datasets",
        "name": name,
        "split": split,
        "column": column,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "n": len(images),
    }
    return ImageSet(images, labels, name, identity)


def load_images(
    source: str | os.PathLike, num: int | None = None, split: str = "train", column: str | None = None
) -> ImageSet:
    """Read an image source (see the module docstring); ``num`` keeps the first ``num`` images."""
    if num is not None and num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    s = str(source)
    if s == "digits":
        out = digits_images()
        if num is not None:
            out = ImageSet(out.images[:num], out.labels[:num], out.source, {**out.identity, "n": min(num, len(out))})
        return out
    path = Path(s)
    if path.is_file() and path.suffix == ".npz":
        return read_npz(path, num)
    if path.is_dir() and not _is_saved_dataset(path):
        return read_image_folder(path, num)
    if path.is_dir() or (not path.exists() and "/" in s and not s.startswith((".", "/"))):
        return read_hf_dataset(s, split, column, num)
    raise FileNotFoundError(
        f"{s!r} is not an image source: use 'digits', a folder of images, an .npz with an 'images' array, "
        "a datasets folder (save_to_disk) or a Hub dataset id"
    )


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def check_image_shape(images: ImageSet, shape: Sequence[int], what: str = "the model") -> None:
    """Raise a clear error when an image set's (C, H, W) differs from ``shape``."""
    if tuple(images.shape) != tuple(shape):
        raise ValueError(
            f"{images.source!r} holds images of shape {images.shape} (C, H, W) but {what} uses {tuple(shape)}"
        )
