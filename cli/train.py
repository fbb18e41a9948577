"""`opdiff train`: DSNO (or the one-step baseline) on a trajectory dataset, with Accelerate.

Bad input exits with code 2 before anything is written; run it under `accelerate launch` or `torchrun`
for several GPUs (or CPU processes with ACCELERATE_USE_CPU=1)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import typer

from operator_diffusion.configs import TrainConfig, field_default

from ._common import console, fail, parse_options, run_with_training_bar


def _default(name: str):
    return field_default(TrainConfig, name)


def train(
    data: str = typer.Option(..., "--data", help="Trajectory dataset: an `opdiff collect` folder (or a Hub id)."),
    out: Path = typer.Option(
        ..., "--out", help="Run directory (checkpoints, metrics.jsonl, model.safetensors); re-run to resume."
    ),
    init_from: Optional[Path] = typer.Option(
        None,
        "--init-from",
        help="Weights (.safetensors) to start from; default: the collection's teacher (the paper does); "
        "'scratch': the backbone's own initialisation.",
    ),
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Backbone to train; default: the dataset's teacher architecture."
    ),
    backbone_option: List[str] = typer.Option(
        [], "--backbone-option", "-o", help="Backbone option KEY=VALUE (repeatable), e.g. dropout=0.1."
    ),
    modes: int = typer.Option(
        _default("modes"), "--modes", help="Fourier modes per temporal layer (see `opdiff spectrum`)."
    ),
    placement: Optional[str] = typer.Option(
        None,
        "--placement",
        help="Where the temporal layers go: full (default), through-mid or through-up1 (opdiff-unet: they end "
        "early, and a sample runs the rest of the network on one frame), or comma-separated module names/globs.",
    ),
    weighting: str = typer.Option(
        _default("weighting"), "--weighting", help="Per-time loss weight: sqrt-snr (paper), snr or uniform."
    ),
    weight_min: float = typer.Option(_default("weight_min"), "--weight-min", help="Lower clamp of the loss weight."),
    weight_max: float = typer.Option(
        _default("weight_max"),
        "--weight-max",
        help="Upper clamp of the loss weight (reference 1e4; see metrics.jsonl share_tI for each time's share).",
    ),
    loss: str = typer.Option(
        _default("loss"), "--loss", help="l1 (paper), l2 or pseudo-huber (iCT: mean (√(‖Δ‖² + c²) − c)/√(C·H·W))."
    ),
    huber_c: Optional[float] = typer.Option(
        None, "--huber-c", help="c of --loss pseudo-huber (> 0); default iCT's 0.00054·√(C·H·W)."
    ),
    final_weight: Optional[float] = typer.Option(
        None, "--final-weight", help="Loss weight of the last output time t_M (> 0), replacing its w(t_M)."
    ),
    output_skip: Optional[str] = typer.Option(
        None,
        "--output-skip",
        help="fit: predict c_skip·x_T + c_out·F per output time, fitted to the data (default: the raw output).",
    ),
    batch_size: int = typer.Option(
        _default("batch_size"), "--batch-size", help="Trajectories per process and micro-step."
    ),
    grad_accum: int = typer.Option(_default("grad_accum"), "--grad-accum", help="Gradient accumulation micro-steps."),
    lr: float = typer.Option(_default("lr"), "--lr", help="Adam learning rate."),
    warmup: int = typer.Option(_default("warmup"), "--warmup", help="Linear learning-rate warm-up steps."),
    lr_decay: str = typer.Option(
        _default("lr_decay"),
        "--lr-decay",
        help="Learning rate after warm-up: constant, cosine or linear (to 0 at --max-steps).",
    ),
    ema: float = typer.Option(_default("ema"), "--ema", help="EMA decay of the exported weights."),
    mixed_precision: Optional[str] = typer.Option(
        None, "--mixed-precision", help="bf16, fp16 or no (default: bf16 on GPU, no on CPU)."
    ),
    max_steps: int = typer.Option(_default("max_steps"), "--max-steps", help="Optimizer steps."),
    gradient_checkpointing: bool = typer.Option(
        _default("gradient_checkpointing"),
        "--gradient-checkpointing",
        help="Recompute the U-Net's blocks in the backward pass instead of keeping their activations: less memory, "
        "about a third more compute, the same gradients (a run may resume with or without it).",
    ),
    trainable: Optional[str] = typer.Option(
        None,
        "--trainable",
        help="The parameters that train; the others stay the teacher's: all (default), temporal, norms, globs over "
        "parameter names (network.mid_block.*), joined by + or , (e.g. temporal+norms).",
    ),
    lora_rank: Optional[int] = typer.Option(
        None,
        "--lora-rank",
        help="LoRA adapters of this rank on the U-Net's Linear and Conv2d layers (needs peft); the teacher's weights "
        "stay frozen, the adapters and the temporal layers train, and the export merges them.",
    ),
    lora_targets: Optional[str] = typer.Option(
        None, "--lora-targets", help="Globs over the layers that get LoRA adapters (default: every Linear and Conv2d)."
    ),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help="'one-step': the knowledge-distillation baseline (no temporal layers, last time only)."
    ),
    seed: int = typer.Option(_default("seed"), "--seed"),
    save_every: int = typer.Option(
        _default("save_every"), "--save-every", help="Checkpoint every N steps (resume point)."
    ),
    log_every: int = typer.Option(_default("log_every"), "--log-every", help="Append to metrics.jsonl every N steps."),
    tracker: List[str] = typer.Option(
        [], "--tracker", help="Accelerate tracker (tensorboard, wandb, ...), repeatable."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved configuration and the model size, then exit."
    ),
) -> None:
    """Train DSNO on a trajectory dataset (one-step sampling by operator learning)."""
    from operator_diffusion import training

    if baseline not in (None, "one-step"):
        fail(f"--baseline takes 'one-step', got {baseline!r}")
    if weighting not in training.WEIGHTINGS:
        fail(f"unknown --weighting {weighting!r}; valid: {', '.join(training.WEIGHTINGS)}")
    try:  # everything is checked before the training bar starts (the config checks its own plain values)
        config = training.TrainConfig(
            data=data,
            out=str(out),
            init_from=None if init_from is None else str(init_from),
            backbone=backbone,
            backbone_options=parse_options(backbone_option),
            modes=modes,
            placement=placement,
            weighting=weighting,
            weight_min=weight_min,
            weight_max=weight_max,
            loss=loss,
            huber_c=huber_c,
            final_weight=final_weight,
            output_skip=output_skip,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            warmup=warmup,
            lr_decay=lr_decay,
            ema=ema,
            mixed_precision=mixed_precision,
            max_steps=max_steps,
            baseline=baseline == "one-step",
            seed=seed,
            save_every=save_every,
            log_every=log_every,
            trackers=tuple(tracker),
            gradient_checkpointing=gradient_checkpointing,
            trainable=trainable,
            lora_rank=lora_rank,
            lora_targets=lora_targets,
        )
        plan = training.plan_run(config)
        training.check_run_dir(out, plan.run_info)
        if dry_run:
            report = plan.model.parameter_report()
            typer.echo(
                json.dumps(
                    {
                        "config": dataclasses.asdict(config),
                        "init_from": plan.init_from or _source_text(plan.init_source),  # resolved: the teacher
                        "mixed_precision": plan.mixed_precision,
                        "times": plan.model.times.tolist(),
                        "loss_weights": plan.weights.tolist(),
                        "backbone_parameters": report["backbone_parameters"],
                        "temporal_parameters": report["temporal_parameters"],
                        "trainable_parameters": plan.trainable_parameters,
                        "dataset": {"trajectories": len(plan.cache), "content_sha256": plan.content_sha256},
                    },
                    indent=2,
                )
            )
            return
        result = _run(training, config, plan)
    except (ValueError, FileNotFoundError, TypeError, ImportError) as e:  # TypeError: an unknown backbone option;
        fail(str(e))  # ImportError: an optional dependency (peft for --lora-rank) is missing
    except training.NonFiniteLossError as e:  # not a usage error: the run diverged
        fail(str(e), code=1)
    msg = f"resumed from step {result.resumed_from}; " if result.resumed_from else ""
    console.print(f"{msg}trained to step {result.step}: {result.model_path or out}")


def _source_text(source: dict | None) -> str | None:
    """The collection's teacher a run starts from when it loads its own weights (a diffusers folder or Hub id)."""
    if source is None:
        return None
    return f"the collection's teacher, {source['name']} from {source.get('pretrained') or source.get('checkpoint')}"


def _run(training, config, plan):
    """Train under the steps bar (``run_with_training_bar``)."""
    return run_with_training_bar(
        "train", config.max_steps, "loss", lambda progress: training.train(config, progress, plan), console
    )
