"""The Fréchet distance between Gaussians fitted to features: ``FeatureStats`` (μ, Σ, N and the extractor id, with
its .npz file format), ``stats_from_features``, ``trace_sqrt_product`` and ``frechet_distance`` (float64, no
``scipy.linalg.sqrtm``), the compatibility check and the small-sample warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .files import atomic_write, oneline

STATS_FORMAT_VERSION = 1


class FIDInputError(ValueError):
    """Inputs that cannot be compared: images of the wrong shape for the feature network, statistics of
    different extractors, too few images. A usage error, not a compute fault."""


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
        atomic_write(
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
            raise ValueError(f"{str(path)!r} is not a readable .npz statistics file ({oneline(e)}); {hint}") from None
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
            raise ValueError(f"{str(path)!r} has unreadable meta ({oneline(e)}); {hint}") from None
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
