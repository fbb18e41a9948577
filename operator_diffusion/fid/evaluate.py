"""`opdiff fid` as a library call: ``evaluate_fid(FIDConfig)`` opens SOURCE and REF (an `opdiff train` run as
SOURCE is sampled on held-out seeds), checks them against the feature extractor, computes or loads the reference
statistics first (cached), then SOURCE's, and returns the distance with what it was computed from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..configs import CLEANFID_PREFIX, FID_RUN_NUM, FIDConfig
from ..images import ImageSet
from .frechet import FeatureStats, FIDInputError, check_compatible, frechet_distance, small_sample_warning
from .inception import InceptionExtractor
from .stats import load_extractor, open_source, reference_stats, stats_of_images


class FIDRunError(RuntimeError):
    """The inputs were fine but the FID could not be computed or its statistics not written (not a usage error)."""


@dataclass(frozen=True)
class FIDResult:
    summary: dict[str, Any]  # fid, the counts, the extractor, the sources, whether the reference was cached
    warnings: tuple[str, ...] = ()  # small-sample warnings for the caller to print


def is_run(spec: str) -> bool:
    """Whether ``spec`` is an `opdiff train` run folder (a SOURCE that is sampled)."""
    p = Path(spec)
    return p.is_dir() and (p / "model.safetensors").is_file() and (p / "config.json").is_file()


def run_folder(spec: str, offline: bool = False) -> Optional[str]:
    """The run folder SOURCE names: a local `opdiff train` run (or Hub-layout folder), or a Hub model id holding one
    (``hub.resolve_run``, from the Hub cache only when ``offline``). None for anything else: an image source, e.g. a
    Hub *dataset* id, which no model repository answers."""
    if is_run(spec):
        return spec
    from ..hub import looks_like_hub_id, resolve_run

    if Path(spec).exists() or not looks_like_hub_id(spec):
        return None
    try:
        local = str(resolve_run(spec, offline))
    except FileNotFoundError:  # no such model repository (a dataset id), or the Hub unreachable: read it as images
        return None
    return local if is_run(local) else None


def run_samples(spec: str, num: Optional[int], seeds, device: str, name: Optional[str] = None) -> ImageSet:
    """An `opdiff train` run folder as SOURCE (``name``: what the user called it, default the folder): its one-NFE
    samples for held-out seeds (default ``FID_RUN_NUM``), as pixels in memory."""
    import numpy as np

    from ..images import to_uint8
    from ..sampling import dsno_batches, open_run, parse_labels
    from ..seeds import resolve_seeds, seeds_text

    model, info = open_run(spec, device)
    seed_list = resolve_seeds(seeds, num, FID_RUN_NUM, info, (info,))
    labels = parse_labels(None, model.backbone.num_classes)
    batches = dsno_batches(model, seed_list, labels, None, 256, device)
    pixels = np.concatenate([to_uint8(b.pixels[:, -1]) for b in batches])
    called = name or spec
    return ImageSet(
        pixels,
        None,
        f"{called} (DSNO, seeds {seeds_text(seeds, seed_list)})",
        {"kind": "run", "run": called, "seeds": [seed_list[0], seed_list[-1], len(seed_list)]},
    )


def _open(spec: str, num: Optional[int], split: str, column: Optional[str], what: str):
    """An ImageSet or FeatureStats for SOURCE/REF; anything unreadable is a ValueError naming it."""
    try:
        return open_source(spec, num, split, column)
    except Exception as e:  # missing files, malformed .npz, unknown dataset: all the user's to fix
        raise ValueError(f"cannot read {what} {spec!r}: {' '.join(str(e).split()) or type(e).__name__}") from None


def evaluate_fid(config: FIDConfig, progress: Callable[[str, int, int], None] | None = None) -> FIDResult:
    """The FID of ``config.source`` against ``config.ref``. Usage errors (bad files, a mismatched extractor) are
    ValueError or FileNotFoundError, raised before any long computation; a computation that fails is
    ``FIDRunError``. ``progress(label, done, total)`` reports each feature pass."""
    from ..provenance import resolve_device

    c = config
    save = None if c.save_stats is None else Path(c.save_stats)
    if save is not None and save.is_dir():
        raise ValueError(f"--save-stats {str(save)!r} is a folder; give a file path, e.g. stats.npz")
    if save is not None and save.exists() and not c.overwrite:
        raise ValueError(f"--save-stats {str(save)!r} already exists; pass --overwrite or choose another file")
    dev = resolve_device(c.device)
    run = run_folder(c.source, c.offline)
    if c.seeds is not None and run is None:
        raise ValueError("--seeds only applies when SOURCE is an `opdiff train` run")
    src = (
        run_samples(run, c.num, c.seeds, dev, c.source)
        if run is not None
        else _open(c.source, c.num, c.split, c.column, "SOURCE")
    )
    named_ref = c.ref.startswith(CLEANFID_PREFIX)
    ref_obj = None if named_ref else _open(c.ref, c.ref_num, c.split, c.column, "--ref")
    ext = None
    if named_ref or isinstance(src, ImageSet) or isinstance(ref_obj, ImageSet):
        try:
            ext = load_extractor(c.feature_extractor, c.inception_path, dev, c.offline or None)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"--feature-extractor {c.feature_extractor}: {e}") from None
        if named_ref and not isinstance(ext, InceptionExtractor):
            raise ValueError(f"--ref {c.ref} holds clean-fid's Inception statistics; use --feature-extractor inception")
    for side, what in ((src, "SOURCE"), (ref_obj, "--ref")):
        if isinstance(side, FeatureStats) and ext is not None and side.extractor != ext.id:
            raise FIDInputError(
                f"{what} statistics were computed with {side.extractor!r} but --feature-extractor "
                f"{c.feature_extractor} is {ext.id!r}; pass the --feature-extractor they were made with"
            )
        if isinstance(side, ImageSet):
            if len(side) < 2:
                raise FIDInputError(f"{what} holds {len(side)} image(s); FID needs at least 2")
            ext.check(side.images)
    if isinstance(src, FeatureStats) and isinstance(ref_obj, FeatureStats):
        check_compatible(src, ref_obj)

    calls = {"n": 0}

    def bar(label: str):
        def update(done: int, total: int) -> None:
            calls["n"] += 1
            if progress is not None:
                progress(label, done, total)

        return update

    reference_cached = None
    try:
        # the reference first: a missing cleanfid: file is reported before the long pass over SOURCE
        if isinstance(ref_obj, FeatureStats):
            ref_stats = ref_obj
        else:
            ref_stats = reference_stats(
                c.ref if named_ref else ref_obj,
                ext,
                None,
                c.split,
                c.column,
                c.cache_dir,
                c.batch_size,
                dev,
                bar(f"features of {c.ref}"),
            )
            reference_cached = None if named_ref else calls["n"] == 0
        src_stats = (
            src
            if isinstance(src, FeatureStats)
            else stats_of_images(src, ext, c.batch_size, dev, bar(f"features of {c.source}"))
        )
        value = frechet_distance(src_stats, ref_stats)
    except (FIDInputError, FileNotFoundError):
        raise
    except (RuntimeError, ValueError, FloatingPointError, ArithmeticError) as e:
        raise FIDRunError(f"cannot compute the FID: {' '.join(str(e).split()) or type(e).__name__}") from None

    warnings = [
        small_sample_warning(s, f"{what} {s.source}") for s, what in ((src_stats, "SOURCE"), (ref_stats, "--ref"))
    ]
    if save is not None:
        try:
            src_stats.save(save)
        except OSError as e:
            raise FIDRunError(f"cannot write --save-stats {str(save)!r}: {e}") from None
    summary = {
        "fid": value,
        "n_source": src_stats.n,
        "n_reference": ref_stats.n or None,
        "extractor": src_stats.extractor,
        "feature_dim": src_stats.dim,
        "source": src_stats.source,
        "reference": ref_stats.source,
        "reference_cached": reference_cached,
        "saved_stats": str(save) if save is not None else None,
    }
    return FIDResult(summary, tuple(w for w in warnings if w))
