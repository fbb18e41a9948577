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


The modules: ``frechet`` (``FeatureStats`` and the distance), ``extractor`` (the ``FeatureExtractor``
interface), ``inception`` (clean-fid's InceptionV3), ``featurenet`` (the small CNN, its trainer and the shipped
digits network), ``stats`` (image sources, the reference statistics cache, ``compute_fid``), ``evaluate``
(`opdiff fid` from an ``FIDConfig``: ``evaluate_fid``) and ``files`` (helpers they share). This package exports
their public API: ``from operator_diffusion.fid import X``.
"""

from __future__ import annotations

from ..settings import CACHE_ENV  # the cache root variable, for callers
from .evaluate import FIDResult, FIDRunError, evaluate_fid
from .extractor import FeatureExtractor, Progress
from .featurenet import (
    ASSETS,
    DIGITS_FEATURENET,
    DIGITS_STATS,
    FEATURENET_FORMAT,
    FEATURENET_KEY,
    FeatureNet,
    FeatureNetExtractor,
    train_feature_net,
)
from .frechet import (
    STATS_FORMAT_VERSION,
    FeatureStats,
    FIDInputError,
    check_compatible,
    frechet_distance,
    small_sample_warning,
    stats_from_features,
    trace_sqrt_product,
)
from .inception import INCEPTION_FILE, INCEPTION_NAME, INCEPTION_URL, InceptionExtractor, clean_preprocess
from .stats import (
    CLEANFID_STATS_URL,
    Source,
    cache_key,
    cleanfid_stats_path,
    compute_fid,
    default_cache_dir,
    fid_of_pixels,
    load_extractor,
    open_source,
    reference_stats,
    source_stats,
    stats_of_images,
)

__all__ = [
    "evaluate_fid",
    "FIDResult",
    "FIDRunError",
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
    # also exported: what the CLI, the demo, the benchmarks and the tests use
    "ASSETS",
    "CACHE_ENV",
    "CLEANFID_STATS_URL",
    "DIGITS_STATS",
    "FEATURENET_FORMAT",
    "FEATURENET_KEY",
    "INCEPTION_NAME",
    "STATS_FORMAT_VERSION",
    "Progress",
    "Source",
    "cache_key",
    "check_compatible",
    "clean_preprocess",
    "open_source",
    "source_stats",
    "trace_sqrt_product",
]
