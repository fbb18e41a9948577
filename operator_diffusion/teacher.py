"""Training a diffusion teacher: denoising score matching on images, with Accelerate.

The network of a backbone (``opdiff-unet`` by default) learns, on the backbone's own schedule
x_t = α_t x_0 + σ_t ε (VP-linear by default), the target of its prediction type:

    t ~ U(t_min, t_max),  ε ~ N(0, I),  x_t = α_t x_0 + σ_t ε
    L = mean over items of  w · mean over (C, H, W) of (F(x_t, t, y) − target)²,   w = 1
    target = ε (``eps``), x_0 (``x0``) or v = α_t ε − σ_t x_0 (``v``, prediction.py's convention)

(the "simple" loss of DDPM in each parametrisation). A PSLD backbone (``--backbone-option schedule=psld``)
learns the HSM ε of the phase-space state instead (``hsm_loss``, docs/psld.md):

    t ~ U(1e-5, t_max),  ε ~ N(0, I) with 2C channels,  z_t = Φ_t (x_0, 0) + L_t ε,  L = mean ‖ε_θ(z_t, t) − ε‖²

Class-conditional training (``num_classes`` K > 0)
replaces each label by the backbone's null label with probability ``label_dropout``, so that the teacher
also learns the unconditional model classifier-free guidance needs.

The loop is ``training.train``'s (one piece of code per idea: the run directory, ``run.json`` identity check,
``COMPLETE``-marked checkpoints, ``metrics.jsonl`` truncation, the EMA, the warm-up and the launch checks come
from there): AdamW, linear warm-up then constant LR, gradient clipping, EMA (exported), gradient accumulation,
mixed precision and DDP. Resume is exact: the data order comes from the seeded per-epoch sampler with consumed
batches skipped, and every micro-step's randomness (times, noise, label dropout, flips, network dropout) is
drawn after reseeding torch from (seed, process, micro-step), so it does not depend on where a run stopped.

Output: ``OUT/teacher.safetensors`` (``Backbone.save_weights``: the EMA weights with the backbone config in the
metadata, so ``backbones.backbone_from_checkpoint`` rebuilds it) and ``OUT/teacher.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .backbones import Backbone, backbone_class, load_backbone
from .images import ImageSet, from_uint8, load_images
from .prediction import PREDICTION_TYPES, Prediction
from .provenance import versions
from .runs import (
    EMA,
    PRECISIONS,
    RUN_INFO,
    RUN_JSON_FIX,
    Indices,
    TrainState,
    check_in_sync,
    check_run_dir,
    check_run_numbers,
    count_micro_step,
    end_of_step,
    micro_seed,
    optimizer_step,
    read_json,
    resumable_batches,
    resume_from_checkpoint,
    start_run,
    write_atomic,
)
from .schedules import PSLD, DiffusionProcess, per_item

__all__ = [
    "FORMAT_VERSION",
    "TEACHER_FILE",
    "TEACHER_INFO",
    "RESUMABLE_FIELDS",
    "TeacherConfig",
    "TeacherPlan",
    "TeacherResult",
    "prediction_target",
    "denoising_loss",
    "hsm_loss",
    "sample_times",
    "drop_labels",
    "default_backbone_options",
    "plan_teacher",
    "check_out_dir",
    "train_teacher",
    "collect_command",
]

FORMAT_VERSION = 1
TEACHER_FILE = "teacher.safetensors"
TEACHER_INFO = "teacher.json"
RUN_KIND = "teacher"  # run.json's "kind": tells a teacher run from an `opdiff train` (DSNO) run
# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_FIELDS = ("max_steps", "save_every", "log_every", "keep_checkpoints")
LOSS_AVG_DECAY = 0.99  # metrics' loss_avg: exponential average over ~100 steps (the per-step loss is noisy)


@dataclass(frozen=True)
class TeacherConfig:
    """What to train; everything except ``RESUMABLE_FIELDS`` (and ``out``) is the run's identity.

    Defaults are tuned for the digits (``opdiff-unet`` preset ``digits``, 272k parameters): ``max_steps=4000`` is a
    good teacher in a few minutes on 2 CPU cores (docs/teacher.md)."""

    data: str  # images.load_images source: "digits", a folder, an .npz, a datasets folder or Hub id
    out: str  # run directory
    backbone: str = "opdiff-unet"
    backbone_options: dict[str, Any] = field(default_factory=dict)  # constructor kwargs; {} = chosen from the data
    prediction: Prediction = "eps"  # what the network learns: eps, x0 or v
    num_classes: int = 0  # K > 0: class-conditional on the source's labels 0..K-1
    label_dropout: float = 0.1  # probability of the null label (classifier-free guidance)
    batch_size: int = 128  # per process and micro-step
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 200  # linear LR warm-up from lr·1e-3 (training.learning_rate)
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up; to 0 at max_steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    ema: float = 0.999  # EMA decay of the exported weights (warm-up rule of training.EMA)
    max_steps: int = 4000  # optimizer steps
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping
    mixed_precision: Literal["bf16", "fp16", "no"] | None = None  # None: bf16 on GPU, no on CPU
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10
    keep_checkpoints: int = 2
    hflip: bool = False  # random horizontal flips (off: digits are not mirror-symmetric)
    split: str = "train"  # datasets sources: the split
    column: str | None = None  # datasets sources: the image column (default: the first image feature)
    num: int | None = None  # keep the first ``num`` images of the source

    def __post_init__(self) -> None:
        """The plain values checked at construction (one-line ValueErrors naming the setting)."""
        _check_numbers(self)

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in RESUMABLE_FIELDS + ("out",):
            d.pop(k)
        return json.loads(json.dumps(d))


# --------------------------------------------------------------------------------------------------
# The loss (pure functions)
# --------------------------------------------------------------------------------------------------
def prediction_target(kind: Prediction, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """What a network of prediction type ``kind`` should output at x_t = α x_0 + σ ε: ε, x_0 or
    v = α ε − σ x_0 (Salimans & Ho; the convention ``prediction.eps_from_prediction`` inverts).
    ``alpha``/``sigma`` are per-item (B,) or scalars."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return per_item(alpha, x0) * eps - per_item(sigma, x0) * x0
    raise ValueError(f"unknown prediction type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")


def denoising_loss(
    backbone: Backbone, x0: Tensor, t: Tensor, eps: Tensor, labels: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """Denoising score matching: mean over items of w_b · mean over the state's elements of (F(x_t, t, y) − target)²,
    with x_t = ``schedule.perturb(x_0, t, ε)`` (α_t x_0 + σ_t ε; PSLD's HSM kernel, ``hsm_loss``), F the raw network
    output (``backbone.forward``) and the target of ``backbone.prediction`` (``prediction_target``). ``eps`` has the
    state's channels (``backbone.state_shape``). ``weight`` (B,) defaults to 1. Coefficients in float64; float32
    result."""
    schedule = backbone.schedule
    x_t = schedule.perturb(x0, t.double(), eps).to(x0.dtype)
    if backbone.prediction == "eps":  # every process's ε target (PSLD networks predict only ε)
        target = eps
    else:
        target = prediction_target(backbone.prediction, x0, eps, schedule.alpha(t), schedule.sigma(t))
    return _weighted_mse(backbone(x_t, t, labels), target, weight)


def hsm_loss(
    backbone: Backbone, x0: Tensor, t: Tensor, eps: Tensor, labels: Tensor | None = None, weight: Tensor | None = None
) -> Tensor:
    """PSLD's hybrid score matching (Pandey & Mandt 2023, Eq. 9–10; docs/psld.md): z_t = Φ_t (x_0, 0) + L_t ε
    (``PSLD.perturb``: the HSM kernel, m_0 ~ N(0, κM) folded into L_t) for ε (B, 2C, H, W) ~ N(0, I), and the
    mean over items of w_b · mean over (2C, H, W) of (ε_θ(z_t, t, y) − ε)². ``denoising_loss`` of a PSLD backbone."""
    if not isinstance(backbone.schedule, PSLD):
        raise ValueError(
            f"hsm_loss needs a PSLD backbone, got the {backbone.schedule.name} schedule; use denoising_loss"
        )
    return denoising_loss(backbone, x0, t, eps, labels, weight)


def _weighted_mse(out: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """Mean over items of w_b · mean over the item's elements of (out − target)², in float32."""
    per_item = (out.float() - target.float()).square().flatten(1).mean(1)
    if weight is not None:
        per_item = weight.to(per_item) * per_item
    return per_item.mean()


def sample_times(schedule: DiffusionProcess, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
    """n float32 training times of ``schedule``'s teacher (``DiffusionProcess.training_times``: uniform on
    [t_min, t_max] for VP, log-uniform σ for VE, EDM's log-normal σ, PSLD's HSM range)."""
    return schedule.training_times(n, device=device, generator=generator)


def drop_labels(labels: Tensor, rate: float, null_label: int, generator: torch.Generator | None = None) -> Tensor:
    """Each label independently replaced by ``null_label`` with probability ``rate`` (classifier-free guidance)."""
    if rate <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device, generator=generator) < rate
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def _flip(x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each image mirrored left-right with probability ½."""
    mask = torch.rand(x0.shape[0], device=x0.device, generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], x0.flip(-1), x0)


# --------------------------------------------------------------------------------------------------
# Set-up: validation before anything is written
# --------------------------------------------------------------------------------------------------
@dataclass
class TeacherPlan:
    """A validated configuration with its data and freshly initialised backbone (one ``train_teacher`` call)."""

    config: TeacherConfig
    images: ImageSet
    backbone: Backbone
    backbone_kwargs: dict[str, Any]  # what the backbone was built with (``load_backbone(name, **kwargs)``)
    mixed_precision: str
    run_info: dict


def default_backbone_options(
    backbone: str, image_shape: tuple[int, int, int], options: dict[str, Any]
) -> dict[str, Any]:
    """The backbone options to use: ``options`` as given, except for ``opdiff-unet`` without a ``preset``, which
    gets preset ``digits`` on 1×8×8 images; other image shapes need explicit architecture options."""
    options = dict(options)
    if backbone != "opdiff-unet" or "preset" in options:
        return options
    if tuple(image_shape) == (1, 8, 8):
        return {"preset": "digits", **options}
    if not options:
        c, h, _ = image_shape
        raise ValueError(
            f"the images have shape {tuple(image_shape)} (C, H, W): choose an opdiff-unet architecture for them, e.g. "
            f"--backbone-option preset=cifar10 --backbone-option in_channels={c} --backbone-option image_size={h} "
            "(presets: tiny, digits, cifar10)"
        )
    return options


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (explicitly or through **kwargs)."""
    params = inspect.signature(cls.__init__).parameters.values()
    return any(
        (p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)) or p.kind == p.VAR_KEYWORD
        for p in params
    )


def _build_backbone(config: TeacherConfig, image_shape: tuple[int, int, int]) -> tuple[Backbone, dict[str, Any]]:
    options = default_backbone_options(config.backbone, image_shape, config.backbone_options)
    cls = backbone_class(config.backbone)
    for key, value in (("prediction", config.prediction), ("num_classes", config.num_classes)):
        if key in options and options[key] != value:
            raise ValueError(
                f"--backbone-option {key}={options[key]!r} contradicts --{key.replace('_', '-')} {value!r}; "
                f"set --{key.replace('_', '-')} only"
            )
    if _accepts(cls, "prediction"):
        options["prediction"] = config.prediction
    if config.num_classes and _accepts(cls, "num_classes"):
        options["num_classes"] = config.num_classes
    bb = load_backbone(config.backbone, **options)
    if tuple(bb.image_shape) != tuple(image_shape):
        c, h, w = image_shape
        hint = (
            f" (e.g. --backbone-option in_channels={c} --backbone-option image_size={h})"
            if config.backbone == "opdiff-unet" and h == w
            else ""
        )
        raise ValueError(
            f"backbone {bb.name!r} takes images of shape {tuple(bb.image_shape)} (C, H, W) but the data holds "
            f"{tuple(image_shape)}; choose backbone options for this shape{hint}"
        )
    if bb.prediction != config.prediction:
        raise ValueError(f"backbone {bb.name!r} predicts {bb.prediction!r}, not --prediction {config.prediction!r}")
    if bb.num_classes != config.num_classes:
        raise ValueError(
            f"backbone {bb.name!r} has {bb.num_classes} classes but --num-classes is {config.num_classes}; "
            "set --num-classes to the backbone's class count"
        )
    if config.num_classes and config.label_dropout > 0 and bb.null_label is None:
        raise ValueError(
            f"backbone {bb.name!r} has no null label: train it with --label-dropout 0 (no classifier-free guidance)"
        )
    return bb, options  # v-prediction off VP schedules is refused by Backbone (DiffusionProcess.predictions)


def _check_numbers(config: TeacherConfig) -> None:
    check_run_numbers(config)
    if not isinstance(config.num_classes, int) or config.num_classes < 0:
        raise ValueError(f"num_classes must be an integer >= 0, got {config.num_classes!r}")
    if config.num is not None and (not isinstance(config.num, int) or config.num < 1):
        raise ValueError(f"num must be an integer >= 1, got {config.num!r}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.label_dropout <= 1:
        raise ValueError(f"label_dropout must lie in [0, 1], got {config.label_dropout}")
    if not (math.isfinite(config.grad_clip) and config.grad_clip >= 0):
        raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {config.grad_clip}")
    if config.prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {config.prediction!r}; valid: {', '.join(PREDICTION_TYPES)}")
    if config.mixed_precision not in (*PRECISIONS, None):
        raise ValueError(f"unknown mixed precision {config.mixed_precision!r}; valid: {', '.join(PRECISIONS)}")


def _check_labels(images: ImageSet, num_classes: int) -> None:
    if not num_classes:
        return
    if images.labels is None:
        raise ValueError(
            f"--num-classes {num_classes} needs labels, but {images.source!r} has none (folders of images carry no "
            "labels; "
            "use 'digits', an .npz with a 'labels' array or a dataset with a label column)"
        )
    labels = np.asarray(images.labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"the labels of {images.source!r} must be one integer per image, got {labels.dtype} {labels.shape}"
        )
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{images.source!r} has labels {lo}..{hi}, outside 0..{num_classes - 1} for --num-classes {num_classes}"
        )


STEP_COPIES = 6  # float32 arrays of a batch alive in a step: x_0, ε, x_t, the output, the target, the error's gradient


def check_batch_memory(batch_size: int, values: int | None) -> None:
    """Bound --batch-size by memory (issue 16, item 15): a step holds ``STEP_COPIES`` float32 arrays of the batch's
    states (a lower bound: the network's activations come on top). ``values``: the numbers in one state (None: the
    data is not read yet, counted as 1, a bound that holds for any images)."""
    from .resources import check_batch_memory as check

    per = f"{values:,} values per image" if values else "even at one value per image"
    check(batch_size, values or 1, STEP_COPIES, per)


def plan_teacher(config: TeacherConfig) -> TeacherPlan:
    """Validate ``config``, read the images and build the backbone (initialised from ``config.seed``).
    Raises ValueError / FileNotFoundError / TypeError (an unknown backbone option) before anything is written; a
    batch beyond memory before the images are read."""
    check_batch_memory(config.batch_size, None)
    images = load_images(config.data, num=config.num, split=config.split, column=config.column)
    if len(images) < config.batch_size:
        raise ValueError(
            f"{images.source!r} holds {len(images)} images, fewer than one batch of {config.batch_size}; lower "
            "--batch-size"
        )
    _check_labels(images, config.num_classes)
    torch.manual_seed(config.seed)  # the network's initialisation
    backbone, kwargs = _build_backbone(config, images.shape)
    check_batch_memory(config.batch_size, math.prod(backbone.state_shape))
    precision = config.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    run_info = {
        "kind": RUN_KIND,
        "format_version": FORMAT_VERSION,
        "opdiff_version": __version__,
        "train": config.identity(),
        "data_content_sha256": images.key(),  # of the data's identity (images.ImageSet.key)
        "data": images.identity,
    }
    return TeacherPlan(config, images, backbone, kwargs, precision, run_info)


def check_out_dir(out: str | Path, run_info: dict) -> bool:
    """True when ``out`` holds this teacher run (resume), False when it is new or empty; ValueError otherwise
    (another run: the message names the differing fields; ``training.check_run_dir``)."""
    out = Path(out)
    info_path = out / RUN_INFO
    if info_path.is_file():
        kind = read_json(info_path, RUN_JSON_FIX).get("kind")
        if kind != RUN_KIND:
            raise ValueError(f"--out {str(out)!r} holds an `opdiff train` run, not a teacher run; choose a new --out")
    return check_run_dir(out, run_info)


def collect_command(plan: TeacherPlan, checkpoint: str | Path) -> str:
    """The `opdiff collect` command that loads this teacher (placeholders N and TRAJECTORIES)."""
    import shlex

    opts = " ".join(
        f"--backbone-option {shlex.quote(f'{k}={v if isinstance(v, str) else json.dumps(v)}')}"
        for k, v in plan.backbone_kwargs.items()
    )
    return (
        f"opdiff collect --backbone {shlex.quote(plan.config.backbone)} {opts} "
        f"--checkpoint {shlex.quote(str(checkpoint))} --num N --out TRAJECTORIES"
    ).replace("  ", " ")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class _Pixels:
    """Collate: one fancy-indexed read of the uint8 pixels per batch, converted to model space [-1, 1]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None):
        self.images, self.labels = images, labels

    def __call__(self, idx: list[int]) -> dict[str, Tensor]:
        idx = np.asarray(idx)
        batch = {"x0": from_uint8(self.images[idx])}
        if self.labels is not None:
            batch["label"] = torch.from_numpy(np.asarray(self.labels)[idx].astype(np.int64))
        return batch


class _Objective(nn.Module):
    """The module Accelerate prepares (autocast, DDP): the backbone's network as a submodule, and a forward
    that returns the denoising loss (through ``backbone.forward``, which calls that same network)."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.network = backbone.network
        self.backbone = (
            backbone  # a plain attribute (a Backbone is not a Module): its network is registered once, above
        )

    def forward(self, x0: Tensor, t: Tensor, eps: Tensor, labels: Tensor | None) -> Tensor:
        return denoising_loss(self.backbone, x0, t, eps, labels)


@dataclass
class TeacherState(TrainState):
    """``TrainState`` (optimizer steps, micro-batches) plus the smoothed loss, all saved with each checkpoint."""

    loss_avg: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "loss_avg": self.loss_avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_avg = state.get("loss_avg")

    def update_loss(self, loss: float) -> None:
        if self.loss_avg is None:
            self.loss_avg = loss
        else:
            d = min(LOSS_AVG_DECAY, (1 + self.step) / (10 + self.step))
            self.loss_avg = d * self.loss_avg + (1 - d) * loss


@dataclass
class TeacherResult:
    out: Path
    step: int
    resumed_from: int | None
    checkpoint: Path | None  # OUT/teacher.safetensors (main process)
    final_loss: float | None  # the smoothed loss (metrics' loss_avg) at the last step
    command: str = ""  # the `opdiff collect` command for this teacher


def train_teacher(
    config: TeacherConfig | TeacherPlan, progress: Callable[[int, int, dict], None] | None = None
) -> TeacherResult:
    """Train (or resume) the teacher run described by ``config`` (or by a ``plan_teacher`` plan, which it consumes);
    ``progress(step, max_steps, metrics)`` is called after every optimizer step on the main process. Writes
    ``teacher.safetensors`` (EMA weights) and ``teacher.json`` at the end."""
    plan = config if isinstance(config, TeacherPlan) else plan_teacher(config)
    config = plan.config
    out = Path(config.out)
    resume = check_out_dir(out, plan.run_info)

    def enough_images(accelerator) -> None:  # plan_teacher checked one process's batch
        if len(plan.images) < config.batch_size * accelerator.num_processes:
            raise ValueError(
                f"{plan.images.source!r} holds {len(plan.images)} images, fewer than one batch of "
                f"{config.batch_size} for each of {accelerator.num_processes} processes; lower --batch-size"
            )

    accelerator = start_run(
        out,
        plan.run_info,
        resume,
        mixed_precision=plan.mixed_precision,
        grad_accum=config.grad_accum,
        seed=config.seed,
        check=enough_images,
    )

    backbone = plan.backbone
    backbone.train()
    objective = _Objective(backbone)
    optimizer = torch.optim.AdamW(
        backbone.network.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
    )
    labels = plan.images.labels if config.num_classes else None
    loader = torch.utils.data.DataLoader(
        Indices(len(plan.images)),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=_Pixels(plan.images.images, labels),
    )
    objective, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    network = backbone.network  # the unwrapped module (prepare wraps the objective, never replaces it)
    ema = EMA(network, config.ema)
    state = TeacherState()
    accelerator.register_for_checkpointing(ema, state)

    resumed_from = resume_from_checkpoint(accelerator, out, resume, state)

    schedule, device = backbone.schedule, accelerator.device
    params = list(network.parameters())
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
    for batch in resumable_batches(accelerator, loader, state, config.max_steps):
        # all of this micro-step's randomness, network dropout included, from (seed, process, micro-step)
        torch.manual_seed(micro_seed("opdiff-teacher", config.seed, accelerator.process_index, state.micro))
        x0 = batch["x0"]
        if config.hflip:
            x0 = _flip(x0)
        y = batch.get("label")
        if y is not None and backbone.null_label is not None:  # plan_teacher refused dropout without a null label
            y = drop_labels(y, config.label_dropout, backbone.null_label)
        t = sample_times(schedule, x0.shape[0], device)
        eps = torch.randn((x0.shape[0], *backbone.state_shape), dtype=x0.dtype, device=x0.device)  # PSLD: 2C channels
        with accelerator.accumulate(objective):
            loss = objective(x0, t, eps, y)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, max_norm) if accelerator.sync_gradients else None
            optimizer_step(optimizer, state, config)
        if not count_micro_step(accelerator, state):
            continue
        ema.update(network)
        loss_value = float(accelerator.reduce(loss.detach(), reduction="mean"))
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"the loss became {loss_value} at step {state.step}; lower --lr or raise --warmup")
        state.update_loss(loss_value)
        metrics = {
            "loss": loss_value,
            "loss_avg": state.loss_avg,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
        }
        end_of_step(accelerator, out, state, config, metrics, progress)

    path = None
    accelerator.wait_for_everyone()
    check_in_sync(accelerator, network)
    if accelerator.is_main_process:
        path = _export(backbone, ema, state, out, plan, accelerator.num_processes)
    accelerator.wait_for_everyone()
    return TeacherResult(out, state.step, resumed_from, path, state.loss_avg, collect_command(plan, out / TEACHER_FILE))


def _export(
    backbone: Backbone, ema: EMA, state: TeacherState, out: Path, plan: TeacherPlan, num_processes: int
) -> Path:
    """EMA weights → ``teacher.safetensors`` (``Backbone.save_weights``, float32) and ``teacher.json``."""
    final = copy.deepcopy(backbone)
    final.network.to(device="cpu", dtype=torch.float32)
    final.eval()
    ema.copy_to(final.network)
    path = out / TEACHER_FILE
    tmp = out / (TEACHER_FILE + ".tmp")
    final.save_weights(tmp)
    tmp.replace(path)
    info = {
        **plan.run_info,
        "backbone": final.config(),
        "backbone_options": plan.backbone_kwargs,
        "image_shape": list(final.image_shape),
        "num_classes": final.num_classes,
        "null_label": final.null_label,
        "num_images": len(plan.images),
        "steps": state.step,
        "final_loss": state.loss_avg,
        "ema_updates": ema.updates,
        "num_processes": num_processes,
        "mixed_precision": plan.mixed_precision,
        "parameters": final.num_parameters(),
        "versions": versions("accelerate"),
        "collect": collect_command(plan, path),
    }
    write_atomic(out / TEACHER_INFO, json.dumps(info, indent=2) + "\n")
    return path
