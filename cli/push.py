"""`opdiff push`: upload a finished run to the Hugging Face Hub as a model repository with a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ._common import console, fail


def push(
    run: Path = typer.Argument(..., help="A finished `opdiff train` run folder."),
    repo_id: str = typer.Argument(..., help="The Hub model repository, namespace/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    token: Optional[str] = typer.Option(
        None, "--token", help="A Hub token with write access (default: the logged-in token, `hf auth login`)."
    ),
    bench: Optional[Path] = typer.Option(
        None, "--bench", help="The `opdiff bench --out` folder whose table goes on the card (default: one in RUN)."
    ),
    samples: Optional[Path] = typer.Option(
        None, "--samples", help="The `opdiff sample --out` folder whose grid.png goes up (default: one in RUN)."
    ),
    sample: Optional[int] = typer.Option(
        None,
        "--sample",
        help="Draw the card's grid now: N one-NFE samples on held-out seeds, as `opdiff sample --num N` (instead of "
        "--samples).",
    ),
    local_dir: Optional[Path] = typer.Option(
        None, "--local-dir", help="Write the repository's files into this new folder instead of uploading them."
    ),
) -> None:
    """Upload a finished run (model.safetensors, its JSON records, a model card, PNGs; never a pickle) to the Hub."""
    from operator_diffusion import hub

    try:
        hub.check_repo_id(repo_id)
        hub.finished_run_info(run)
        if local_dir is not None:
            if local_dir.exists() and (not local_dir.is_dir() or any(local_dir.iterdir())):
                fail(f"--local-dir {str(local_dir)!r} already exists and is not an empty folder")
            names = hub.stage_run(run, local_dir, repo_id, bench, samples, sample)
            console.print(f"wrote {', '.join(names)} into {local_dir}")
            return
        url = hub.push_run(
            run, repo_id, private=private or None, token=token, bench=bench, samples=samples, sample=sample
        )
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    except OSError as e:  # the Hub refused or was unreachable (huggingface_hub's HTTP errors are OSErrors)
        fail(f"the upload failed: {' '.join(str(e).split())[:300]}", code=1)
    console.print(f"uploaded {run} to {url}")
