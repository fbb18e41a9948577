"""`opdiff teacher train`: train a diffusion teacher (denoising score matching) on images, with Accelerate.

Bad input exits with code 2 before anything is written; a fault while training (a NaN loss, I/O) with
code 1. Run it under `accelerate launch` or `torchrun` for several GPUs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, fail, parse_options, run_with_training_bar

teacher_app = typer.Typer(
    help="Train diffusion teachers on images (the networks `opdiff collect` samples from).", no_args_is_help=True
)


@teacher_app.command("train")
def train(
    data: str = typer.Option(
        ...,
        "--data",
        help="Images: 'digits', a folder of images, an .npz ('images' uint8 N×H×W×C, optional 'labels'), a datasets "
        "folder or a Hub id.",
    ),
    out: Path = typer.Option(
        ..., "--out", help="Run directory (checkpoints, metrics.jsonl, teacher.safetensors); re-run to resume."
    ),
    backbone: str = typer.Option("opdiff-unet", "--backbone", help="Backbone to train (see `opdiff backbones`)."),
    backbone_option: List[str] = typer.Option(
        [],
        "--backbone-option",
        "-o",
        help="Backbone option KEY=VALUE (repeatable), e.g. preset=cifar10; default for opdiff-unet on 1×8×8 images: "
        "preset=digits.",
    ),
    prediction: str = typer.Option("eps", "--prediction", help="What the network learns: eps, x0 or v."),
    num_classes: int = typer.Option(
        0, "--num-classes", help="Class-conditional on the data's labels 0..K-1 (0: unconditional)."
    ),
    label_dropout: float = typer.Option(
        0.1,
        "--label-dropout",
        help="Probability of the null label during conditional training (classifier-free guidance).",
    ),
    batch_size: int = typer.Option(128, "--batch-size", help="Images per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Gradient accumulation micro-steps."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    warmup: int = typer.Option(200, "--warmup", help="Linear learning-rate warm-up steps."),
    lr_decay: str = typer.Option(
        "constant", "--lr-decay", help="Learning rate after warm-up: constant, cosine or linear (to 0 at --max-steps)."
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    ema: float = typer.Option(0.999, "--ema", help="EMA decay of the exported weights."),
    max_steps: int = typer.Option(4000, "--max-steps", help="Optimizer steps."),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Max gradient norm (0: no clipping)."),
    mixed_precision: Optional[str] = typer.Option(
        None, "--mixed-precision", help="bf16, fp16 or no (default: bf16 on GPU, no on CPU)."
    ),
    seed: int = typer.Option(0, "--seed", help="Initialisation, data order, noise."),
    save_every: int = typer.Option(1000, "--save-every", help="Checkpoint every N steps (resume point)."),
    log_every: int = typer.Option(10, "--log-every", help="Append to metrics.jsonl every N steps."),
    hflip: bool = typer.Option(
        False, "--hflip", help="Random horizontal flips (off by default: digits are not mirror-symmetric)."
    ),
    split: str = typer.Option("train", "--split", help="datasets sources: the split."),
    column: Optional[str] = typer.Option(None, "--column", help="datasets sources: the image column."),
    num: Optional[int] = typer.Option(None, "--num", help="Train on the first NUM images only."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate, print the resolved configuration and the model size, then exit."
    ),
) -> None:
    """Train a diffusion teacher on images (denoising score matching on the backbone's schedule)."""
    from operator_diffusion import teacher as tt

    try:  # the config checks its own plain values
        config = tt.TeacherConfig(
            data=data,
            out=str(out),
            backbone=backbone,
            backbone_options=parse_options(backbone_option),
            prediction=prediction,
            num_classes=num_classes,
            label_dropout=label_dropout,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            lr_decay=lr_decay,
            weight_decay=weight_decay,
            ema=ema,
            max_steps=max_steps,
            grad_clip=grad_clip,
            mixed_precision=mixed_precision,
            seed=seed,
            save_every=save_every,
            log_every=log_every,
            hflip=hflip,
            split=split,
            column=column,
            num=num,
        )
        plan = tt.plan_teacher(config)
        resume = tt.check_out_dir(out, plan.run_info)
    except ImportError as e:  # a backbone plugin that fails to import
        fail(str(e), code=1)
    except (ValueError, FileNotFoundError, TypeError) as e:  # TypeError: an unknown backbone option
        fail(str(e))
    except OSError as e:  # e.g. a Hub id that cannot be reached (ConnectionError), an unreadable file
        fail(f"cannot read --data {data!r}: {type(e).__name__}: {e}")
    if dry_run:
        images = plan.images
        typer.echo(
            json.dumps(
                {
                    "config": dataclasses.asdict(config),
                    "mixed_precision": plan.mixed_precision,
                    "resume": resume,
                    "backbone": plan.backbone.config(),
                    "backbone_options": plan.backbone_kwargs,
                    "parameters": plan.backbone.num_parameters(),
                    "data": {
                        "source": images.source,
                        "images": len(images),
                        "shape": list(images.shape),
                        "labels": images.labels is not None,
                        "identity": images.identity,
                    },
                    "steps_per_epoch": len(images) // batch_size // grad_accum,
                },
                indent=2,
            )
        )
        return
    try:
        result = _run(tt, plan)
    except ValueError as e:  # a run folder whose checkpoint changed since it was written (runs.CheckpointError)
        fail(str(e))
    except (ArithmeticError, RuntimeError, OSError) as e:  # the inputs were checked above: a fault
        fail(f"{type(e).__name__}: {e}", code=1)
    msg = f"resumed from step {result.resumed_from}; " if result.resumed_from else ""
    loss = f", loss {result.final_loss:.4g}" if result.final_loss is not None else ""
    console.print(
        f"{msg}trained to step {result.step}{loss}: {result.checkpoint or out} (EMA weights)", highlight=False
    )
    console.print(f"next: {result.command}", highlight=False, soft_wrap=True)


def _run(tt, plan):
    """Train under the steps bar (``run_with_training_bar``)."""
    return run_with_training_bar(
        "teacher",
        plan.config.max_steps,
        "loss_avg",
        lambda progress: tt.train_teacher(plan, progress=progress),
        err_console,
    )
