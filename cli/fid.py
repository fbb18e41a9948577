"""`opdiff fid`: Fréchet distance between the features of two image sets (clean-fid's InceptionV3 in "clean"
mode, or a small feature network for small images), with cached reference statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import console, err_console, fail, print_rows, resolve_device

CLEANFID_PREFIX = "cleanfid:"


def _check_inputs(
    num: Optional[int],
    ref_num: Optional[int],
    batch_size: int,
    save_stats: Optional[Path],
    ref: str,
    source: str,
    overwrite: bool = False,
) -> None:
    """Refuse bad flags with a one-line error before anything is loaded."""
    checks = [
        (num is None or num >= 2, f"--num must be at least 2 (a covariance needs 2 images), got {num}"),
        (ref_num is None or ref_num >= 2, f"--ref-num must be at least 2 (a covariance needs 2 images), got {ref_num}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
        (
            save_stats is None or not save_stats.is_dir(),
            f"--save-stats {str(save_stats)!r} is a folder; give a file path, e.g. stats.npz",
        ),
        (
            save_stats is None or save_stats.is_dir() or not save_stats.exists() or overwrite,
            f"--save-stats {str(save_stats)!r} already exists; pass --overwrite or choose another file",
        ),
        (
            not source.startswith(CLEANFID_PREFIX),
            f"SOURCE {source!r}: clean-fid's published statistics can only be the --ref",
        ),
        (
            not (ref.startswith(CLEANFID_PREFIX) and ref_num is not None),
            "--ref-num does not apply to precomputed cleanfid: statistics",
        ),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)


def _open(spec: str, num: Optional[int], split: str, column: Optional[str], what: str):
    """An ImageSet or FeatureStats for SOURCE/REF; anything unreadable is a usage error."""
    from operator_diffusion.fid import open_source

    try:
        return open_source(spec, num, split, column)
    except Exception as e:  # missing files, malformed .npz, unknown dataset: all the user's to fix
        fail(f"cannot read {what} {spec!r}: {' '.join(str(e).split()) or type(e).__name__}")


RUN_NUM = 10_000  # samples drawn from a run when --num is not given


def _is_run(spec: str) -> bool:
    p = Path(spec)
    return p.is_dir() and (p / "model.safetensors").is_file() and (p / "config.json").is_file()


def _run_samples(spec: str, num: Optional[int], seeds: Optional[str], dev: str):
    """An `opdiff train` run as SOURCE: its one-NFE samples for held-out seeds, as pixels in memory."""
    import numpy as np

    from operator_diffusion.images import ImageSet, to_uint8
    from operator_diffusion.sampling import dsno_batches, parse_labels

    from .sample import load_run_or_fail, resolve_seeds

    model, info = load_run_or_fail(spec, dev)
    seed_list = resolve_seeds(seeds, num if num is not None or seeds is not None else RUN_NUM, info, (info,))
    labels = parse_labels(None, model.backbone.num_classes)
    pixels = np.concatenate([to_uint8(b.pixels[:, -1]) for b in dsno_batches(model, seed_list, labels, None, 256, dev)])
    name = f"{spec} (DSNO, seeds {seed_list[0]}-{seed_list[-1]})" if seeds is None else f"{spec} (DSNO, seeds {seeds})"
    return ImageSet(
        pixels, None, name, {"kind": "run", "run": spec, "seeds": [seed_list[0], seed_list[-1], len(seed_list)]}
    )


def _bars(progress):
    """A progress callback per feature computation; the task appears on the first batch (a cached reference
    computes nothing and shows none). ``calls`` counts the batches."""
    calls = {"n": 0}

    def make(label: str):
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None:
                task = progress.add_task(label, total=total)
            calls["n"] += 1
            progress.update(task, completed=done)

        return update

    return make, calls


def fid(
    source: str = typer.Argument(
        ...,
        help="Images under test: an `opdiff train` run (samples it: --num, --seeds), 'digits', an image folder (an "
        "`opdiff sample` folder works), "
        "an .npz of images, a statistics .npz (--save-stats), a datasets folder or Hub id.",
    ),
    ref: str = typer.Option(
        ...,
        "--ref",
        help="Reference: the same kinds as SOURCE, or cleanfid:NAME/RES/SPLIT "
        "(clean-fid's published Inception statistics, e.g. cleanfid:cifar10/32/train).",
    ),
    num: Optional[int] = typer.Option(
        None, "--num", help=f"Use the first N images of SOURCE (default: all; a run draws {RUN_NUM})."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="A run SOURCE: the seeds to sample (default: held out, after the training seeds)."
    ),
    ref_num: Optional[int] = typer.Option(None, "--ref-num", help="Use the first N images of REF (default: all)."),
    feature_extractor: str = typer.Option(
        "inception",
        "--feature-extractor",
        help="inception (clean-fid InceptionV3) | digits (shipped 8×8 digits network) | PATH of a FeatureNet "
        ".safetensors.",
    ),
    inception_path: Optional[Path] = typer.Option(
        None,
        "--inception-path",
        help="clean-fid's inception-2015-12-05.pt (default /tmp/inception-2015-12-05.pt); never downloaded.",
    ),
    split: str = typer.Option("train", "--split", help="Split of a datasets source."),
    column: Optional[str] = typer.Option(
        None, "--column", help="Image column of a datasets source (default: the first image column)."
    ),
    device: str = typer.Option("auto", "--device", help="Device of the feature network: auto | cpu | cuda | cuda:N."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per feature batch."),
    cache_dir: Optional[Path] = typer.Option(
        None,
        "--cache-dir",
        help="Reference statistics cache (default fid/ under $OPDIFF_CACHE, else ~/.cache/opdiff/fid).",
    ),
    save_stats: Optional[Path] = typer.Option(
        None, "--save-stats", help="Write SOURCE's statistics to this .npz (usable later as SOURCE or --ref)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --save-stats file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """FID of SOURCE against --ref (clean-fid's Fréchet distance; reference statistics are cached)."""
    _check_inputs(num, ref_num, batch_size, save_stats, ref, source, overwrite)
    dev = resolve_device(device)

    from operator_diffusion import fid as F
    from operator_diffusion.images import ImageSet

    if seeds is not None and not _is_run(source):
        fail("--seeds only applies when SOURCE is an `opdiff train` run")
    src = _run_samples(source, num, seeds, dev) if _is_run(source) else _open(source, num, split, column, "SOURCE")
    named_ref = ref.startswith(CLEANFID_PREFIX)
    ref_obj = None if named_ref else _open(ref, ref_num, split, column, "--ref")
    if named_ref and len(ref[len(CLEANFID_PREFIX) :].split("/")) != 3:
        fail(f"bad --ref {ref!r}: use cleanfid:NAME/RES/SPLIT, e.g. cleanfid:cifar10/32/train")

    ext = None
    if named_ref or isinstance(src, ImageSet) or isinstance(ref_obj, ImageSet):
        try:
            ext = F.load_extractor(feature_extractor, inception_path, dev)
        except (FileNotFoundError, ValueError) as e:
            fail(f"--feature-extractor {feature_extractor}: {e}")
        if named_ref and not isinstance(ext, F.InceptionExtractor):
            fail(f"--ref {ref} holds clean-fid's Inception statistics; use --feature-extractor inception")
    try:
        for side, what in ((src, "SOURCE"), (ref_obj, "--ref")):
            if isinstance(side, F.FeatureStats) and ext is not None and side.extractor != ext.id:
                raise F.FIDInputError(
                    f"{what} statistics were computed with {side.extractor!r} but --feature-extractor "
                    f"{feature_extractor} is {ext.id!r}; pass the --feature-extractor they were made with"
                )
            if isinstance(side, ImageSet):
                if len(side) < 2:
                    raise F.FIDInputError(f"{what} holds {len(side)} image(s); FID needs at least 2")
                ext.check(side.images)
        if isinstance(src, F.FeatureStats) and isinstance(ref_obj, F.FeatureStats):
            F.check_compatible(src, ref_obj)
    except ValueError as e:  # FIDInputError and malformed pixels
        fail(str(e))

    from rich.progress import Progress

    reference_cached = None
    try:
        with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
            bar, calls = _bars(progress)
            # the reference first: a missing cleanfid: file is reported before the long pass over SOURCE
            if isinstance(ref_obj, F.FeatureStats):
                ref_stats = ref_obj
            else:
                ref_stats = F.reference_stats(
                    ref if named_ref else ref_obj,
                    ext,
                    None,
                    split,
                    column,
                    cache_dir,
                    batch_size,
                    dev,
                    bar(f"features of {ref}"),
                )
                reference_cached = None if named_ref else calls["n"] == 0
            src_stats = (
                src
                if isinstance(src, F.FeatureStats)
                else F.stats_of_images(src, ext, batch_size, dev, bar(f"features of {source}"))
            )
        value = F.frechet_distance(src_stats, ref_stats)
    except F.FIDInputError as e:
        fail(str(e))
    except FileNotFoundError as e:
        fail(str(e))
    except (RuntimeError, ValueError, FloatingPointError, ArithmeticError) as e:
        fail(f"cannot compute the FID: {' '.join(str(e).split()) or type(e).__name__}", code=1)

    for stats, what in ((src_stats, "SOURCE"), (ref_stats, "--ref")):
        message = F.small_sample_warning(stats, f"{what} {stats.source}")
        if message:
            err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    if save_stats is not None:
        try:
            src_stats.save(save_stats)
        except OSError as e:
            fail(f"cannot write --save-stats {str(save_stats)!r}: {e}", code=1)

    result: dict[str, Any] = {
        "fid": value,
        "n_source": src_stats.n,
        "n_reference": ref_stats.n or None,
        "extractor": src_stats.extractor,
        "feature_dim": src_stats.dim,
        "source": src_stats.source,
        "reference": ref_stats.source,
        "reference_cached": reference_cached,
        "saved_stats": str(save_stats) if save_stats is not None else None,
    }
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    row = {**result, "fid": f"{value:.4f}", "n_reference": ref_stats.n or "unknown"}
    print_rows(
        [row],
        {"fid": "FID", "n_source": "N source", "n_reference": "N reference", "extractor": "extractor"},
        f"FID of {source} against {ref}",
        False,
    )
    if save_stats is not None:
        console.print(f"wrote {save_stats}")
