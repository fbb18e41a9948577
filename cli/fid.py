"""`opdiff fid`: Fréchet distance between the features of two image sets (clean-fid's InceptionV3 in "clean"
mode, or a small feature network for small images), with cached reference statistics. The flags map to an
``FIDConfig``; ``fid.evaluate_fid`` does the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from operator_diffusion.configs import FID_RUN_NUM, FIDConfig, field_default

from ._common import as_text, console, err_console, fail, print_rows, stage_progress


def _default(name: str):
    return field_default(FIDConfig, name)


def fid(
    source: str = typer.Argument(
        ...,
        help="Images under test: an `opdiff train` run or its Hub id (samples it: --num, --seeds), 'digits', an image "
        "folder (an "
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
        None, "--num", help=f"Use the first N images of SOURCE (default: all; a run draws {FID_RUN_NUM})."
    ),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="A run SOURCE: the seeds to sample (default: held out, after the training seeds)."
    ),
    ref_num: Optional[int] = typer.Option(None, "--ref-num", help="Use the first N images of REF (default: all)."),
    feature_extractor: str = typer.Option(
        _default("feature_extractor"),
        "--feature-extractor",
        help="inception (clean-fid InceptionV3) | digits (shipped 8×8 digits network) | PATH of a FeatureNet "
        ".safetensors.",
    ),
    inception_path: Optional[Path] = typer.Option(
        None,
        "--inception-path",
        help="clean-fid's inception-2015-12-05.pt, never downloaded (default /tmp/inception-2015-12-05.pt, "
        "downloaded there by clean-fid's mechanism when missing, unless --offline or HF_HUB_OFFLINE=1).",
    ),
    split: str = typer.Option(_default("split"), "--split", help="Split of a datasets source."),
    column: Optional[str] = typer.Option(
        None, "--column", help="Image column of a datasets source (default: the first image column)."
    ),
    device: str = typer.Option(
        _default("device"), "--device", help="Device of the feature network: auto | cpu | cuda | cuda:N."
    ),
    batch_size: int = typer.Option(_default("batch_size"), "--batch-size", help="Images per feature batch."),
    cache_dir: Optional[Path] = typer.Option(
        None,
        "--cache-dir",
        help="Reference statistics cache (default fid/ under $OPDIFF_CACHE, else ~/.cache/opdiff/fid).",
    ),
    save_stats: Optional[Path] = typer.Option(
        None, "--save-stats", help="Write SOURCE's statistics to this .npz (usable later as SOURCE or --ref)."
    ),
    overwrite: bool = typer.Option(_default("overwrite"), "--overwrite", help="Replace an existing --save-stats file."),
    offline: bool = typer.Option(
        _default("offline"),
        "--offline",
        help="Download nothing for the FID: the Inception weights are never downloaded (a missing file is a one-line "
        "error), and a Hub run SOURCE is read from the Hub cache only (HF_HUB_OFFLINE=1 does this and more).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """FID of SOURCE against --ref (clean-fid's Fréchet distance; reference statistics are cached)."""
    from rich.progress import Progress

    from operator_diffusion import fid as F

    try:
        config = FIDConfig(
            source=source,
            ref=ref,
            num=num,
            seeds=seeds,
            ref_num=ref_num,
            feature_extractor=feature_extractor,
            inception_path=as_text(inception_path),
            split=split,
            column=column,
            device=device,
            batch_size=batch_size,
            cache_dir=as_text(cache_dir),
            save_stats=as_text(save_stats),
            overwrite=overwrite,
            offline=offline,
        )
        with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
            outcome = F.evaluate_fid(config, stage_progress(progress))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    except F.FIDRunError as e:
        fail(str(e), code=1)

    for message in outcome.warnings:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    result = outcome.summary
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    row = {**result, "fid": f"{result['fid']:.4f}", "n_reference": result["n_reference"] or "unknown"}
    print_rows(
        [row],
        {"fid": "FID", "n_source": "N source", "n_reference": "N reference", "extractor": "extractor"},
        f"FID of {source} against {ref}",
        False,
    )
    if save_stats is not None:
        console.print(f"wrote {save_stats}")
