"""The feature-extractor interface: ``FeatureExtractor`` maps uint8 (N, H, W, C) pixels to (N, D) float64 features
in batches, under an ``id`` that names the network and its weights. Implementations: ``inception.InceptionExtractor``
and ``featurenet.FeatureNetExtractor``.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..images import check_pixels
from .frechet import FIDInputError

Progress = Callable[[int, int], None]  # progress(images_done, images_total), called after every batch


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
