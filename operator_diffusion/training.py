"""DSNO training with Accelerate (and the one-step distillation baseline).

Loss (paper eq. 10, reference code): for each output time t_i,

    L_i = mean |G(x_T)(t_i) − target_i|      (``loss="l1"``; ``"l2"`` squares instead; ``"pseudo-huber"``: iCT's
                                              mean_b (√(‖Δ_b‖² + c²) − c)/√D, see ``per_time_losses``)
    L   = (1/M) Σ_i w(t_i) L_i,   w = clamp(α/σ, w_min, w_max)  (``"sqrt-snr"``; ``"snr"``: α²/σ²; ``"uniform"``: 1)

with the reference clamp [1, 1e4] (a PSLD teacher: α/σ of its data channel, Φ₀₀/L₀₀ = e^{``PSLD.x_log_snr``}).
With it the last term carries ~99.9% of the loss on the reference grids (~76% on opdiff's default grid;
``final_weight``, when set, replaces w(t_M) to change that); each term and its share are logged so that this
is visible. The one-step baseline (Luhman & Luhman, 2021) trains the same backbone on the last output only.

Accelerate does devices, mixed precision (bf16 default on GPU; the temporal FFT always runs in float32),
gradient accumulation, DDP (``accelerate launch`` / ``torchrun``) and checkpoints (``save_state`` with the EMA
and the step counter registered). Resume is exact: the sampler is seeded per epoch, consumed batches are
skipped, RNG states are restored, and ``metrics.jsonl`` is cut back to the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from . import __version__
from .adapter import DSNO
from .backbones import Backbone, load_backbone
from .schedules import schedule_from_config

FORMAT_VERSION = 1
RUN_INFO = "run.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
WEIGHTINGS = ("sqrt-snr", "snr", "uniform")
LOSSES = ("l1", "l2", "pseudo-huber")
HUBER_C_PER_SQRT_DIM = 0.00054  # iCT (Song & Dhariwal, 2023): c = 0.00054·√D, D = C·H·W
PRECISIONS = ("bf16", "fp16", "no")
# Fields that may change between a run and its resumption (they do not change what is trained).
LR_DECAYS = ("constant", "cosine", "linear")
RESUMABLE_FIELDS = ("max_steps", "save_every", "log_every", "keep_checkpoints", "trackers")
# Fields added after runs were made: left out of the identity while None (their old behaviour), so those runs resume.
LATER_FIELDS = ("huber_c", "final_weight")


@dataclass(frozen=True)
class TrainConfig:
    """What to train; everything except ``RESUMABLE_FIELDS`` is the run's identity."""

    data: str                                  # collection directory or Hub id (``opdiff collect``)
    out: str                                   # run directory
    init_from: str | None = None               # teacher weights (.safetensors); None = the backbone's own init
    backbone: str | None = None                # default: the backbone recorded in the collection
    backbone_options: dict[str, Any] = field(default_factory=dict)
    modes: int = 2
    weighting: Literal["sqrt-snr", "snr", "uniform"] = "sqrt-snr"
    weight_min: float = 1.0
    weight_max: float = 1e4
    loss: Literal["l1", "l2", "pseudo-huber"] = "l1"
    huber_c: float | None = None               # pseudo-Huber c; None: iCT's 0.00054·√(C·H·W)
    final_weight: float | None = None          # replaces w(t_M), the last output's loss weight; None: w(t_M)
    batch_size: int = 64                       # per process and micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 1000                         # linear LR warm-up from lr·1e-3 (reference: 10k)
    lr_decay: Literal["constant", "cosine", "linear"] = "constant"  # after warm-up (reference: constant); to 0 at max_steps
    ema: float = 0.9999
    mixed_precision: Literal["bf16", "fp16", "no"] | None = None  # None: bf16 on GPU, no on CPU
    max_steps: int = 10_000                    # optimizer steps
    baseline: bool = False                     # one-step distillation baseline
    init: Literal["zero", "small"] = "zero"    # temporal layer init ("zero": starts as the teacher)
    seed: int = 0
    save_every: int = 1000
    log_every: int = 10
    keep_checkpoints: int = 2
    trackers: tuple[str, ...] = ()             # accelerate trackers, e.g. ("tensorboard",) or ("wandb",)

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in RESUMABLE_FIELDS + ("out",):
            d.pop(k)
        for k in LATER_FIELDS:
            if d[k] is None:
                d.pop(k)
        return json.loads(json.dumps(d))


# --------------------------------------------------------------------------------------------------
# The loss (pure functions)
# --------------------------------------------------------------------------------------------------
def check_positive(name: str, value: float | None) -> None:
    """Refuse an optional setting that is given but is not a finite number > 0 (None passes)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if value is not None and not ok:
        flag = "--" + name.replace("_", "-")
        raise ValueError(f"{name} ({flag}) must be a finite number > 0, got {value!r}; omit it for the default")


def time_weights(schedule, times: Tensor, weighting: str, w_min: float = 1.0, w_max: float = 1e4,
                 final_weight: float | None = None) -> Tensor:
    """w(t_i): clamp(α/σ) (``sqrt-snr``, the paper), clamp(α²/σ²) (``snr``) or 1 (``uniform``), float64.
    For a PSLD schedule α/σ is that of the data channel, x_t = Φ₀₀x₀ + L₀₀ε_x: Φ₀₀/L₀₀ (``PSLD.x_log_snr``).
    ``final_weight`` (> 0) replaces the last entry, w(t_M), as an absolute weight (not clamped)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    check_positive("final_weight", final_weight)
    t = torch.as_tensor(times, dtype=torch.float64)
    if weighting == "uniform":
        w = torch.ones_like(t)
    else:
        log_snr = schedule.data_log_snr(t)
        ratio = torch.exp(log_snr)  # α/σ = e^λ (λ = log α/σ, schedules.py)
        w = (ratio if weighting == "sqrt-snr" else ratio**2).clamp(w_min, w_max)
    if final_weight is not None:
        w[-1] = final_weight
    return w


def per_time_losses(pred: Tensor, target: Tensor, loss: str = "l1", huber_c: float | None = None) -> Tensor:
    """L_i for each time, (B, M, C, H, W) → (M,), with Δ = pred − target:

    - ``l1``: mean over (B, C, H, W) of |Δ|; ``l2``: of Δ²;
    - ``pseudo-huber`` (iCT, Song & Dhariwal 2023): mean over B of (√(‖Δ_b‖² + c²) − c) / √D, the norm over
      (C, H, W) and D = C·H·W. The 1/√D makes it ‖Δ‖/√D (the RMS error, ≥ the L1 mean) for ‖Δ‖ ≫ c and
      ‖Δ‖²/(2c√D) for ‖Δ‖ ≪ c. ``huber_c`` is c; None: iCT's 0.00054·√D.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    check_positive("huber_c", huber_c)
    diff = (pred.float() - target.float()).transpose(0, 1).flatten(2)  # (M, B, D)
    if loss == "pseudo-huber":
        dim = diff.shape[-1]
        c = HUBER_C_PER_SQRT_DIM * math.sqrt(dim) if huber_c is None else float(huber_c)
        sq = diff.square().sum(-1)
        # √(s + c²) − c = s / (√(s + c²) + c): no cancellation when s ≪ c²
        return (sq / ((sq + c * c).sqrt() + c)).mean(1) / math.sqrt(dim)
    err = diff.abs() if loss == "l1" else diff.square()
    return err.flatten(1).mean(1)


def dsno_loss(pred: Tensor, target: Tensor, weights: Tensor, loss: str = "l1",
              huber_c: float | None = None) -> tuple[Tensor, Tensor]:
    """(L, (L_i)) with L = (1/M) Σ_i w_i L_i (paper eq. 10 with the reference's mean over times)."""
    terms = per_time_losses(pred, target, loss, huber_c)
    return (weights.to(terms) * terms).mean(), terms


def check_decay(decay: str, warmup: int, max_steps: int | None) -> None:
    """Refuse an unknown decay, or a decaying one without decay steps (max_steps must exceed warmup)."""
    if decay not in LR_DECAYS:
        raise ValueError(f"unknown learning-rate decay {decay!r}; valid: {', '.join(LR_DECAYS)}")
    if decay != "constant" and (max_steps is None or max_steps <= warmup):
        raise ValueError(f"a {decay} learning-rate decay needs max_steps > warmup ({warmup}), got {max_steps}; "
                         "raise --max-steps or lower --warmup")


def learning_rate(step: int, lr: float, warmup: int, decay: str = "constant", max_steps: int | None = None) -> float:
    """The learning rate of optimizer step ``step`` (0-based): a linear warm-up from lr·1e-3 to lr over
    ``warmup`` steps (the reference's LinearLR(0.001 → 1)), then ``constant`` (the reference), or a
    ``cosine`` / ``linear`` decay that would reach 0 at step ``max_steps`` (diffusers' get_scheduler shapes)."""
    check_decay(decay, warmup, max_steps)
    if step < warmup:
        return lr * (1e-3 + (1 - 1e-3) * step / warmup)
    if decay == "constant":
        return lr
    p = min(1.0, (step - warmup) / (max_steps - warmup))
    return lr * (0.5 * (1 + math.cos(math.pi * p)) if decay == "cosine" else 1 - p)


class EMA:
    """Exponential moving average of a model's parameters, checkpointed with ``accelerator.save_state``.
    Decay min(decay, (1+n)/(10+n)) after n updates (the usual warm-up, so short runs are not dominated by the
    initialisation; it reaches 0.9999 after ~10^5 updates like the reference's constant decay)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, model.parameters()):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, **{f"shadow.{i}": s for i, s in enumerate(self.shadow)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [state[f"shadow.{i}"].to(self.shadow[i].device) for i in range(len(self.shadow))]


@dataclass
class TrainState:
    """Counters saved with each checkpoint: optimizer steps and micro-batches consumed."""

    step: int = 0
    micro: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "micro": self.micro}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.micro = int(state["step"]), int(state["micro"])


# --------------------------------------------------------------------------------------------------
# Set-up: validation before anything is written
# --------------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    config: TrainConfig
    cache: Any                  # trajectories.TrajectoryCache
    collection: dict            # the collection identity (info["collection"])
    content_sha256: str
    model: DSNO
    weights: Tensor             # (M,) or (1,) float64 loss weights
    mixed_precision: str
    run_info: dict


def build_backbone(config: TrainConfig, collection: dict) -> Backbone:
    """The backbone to train: the collection's teacher architecture unless ``config.backbone`` names another."""
    if config.backbone is None:
        bb = load_backbone(**{**collection["backbone"], **config.backbone_options})
    else:
        bb = load_backbone(config.backbone, **config.backbone_options)
    shape = list(bb.image_shape)
    if shape != list(collection["image_shape"]):
        raise ValueError(
            f"backbone {bb.name!r} takes images of shape {tuple(shape)} but the dataset holds {tuple(collection['image_shape'])}; "
            "use the teacher's backbone configuration (the default) or collect data for this backbone"
        )
    teacher_process = schedule_from_config(collection["schedule"])
    if bb.schedule.prior_config() != teacher_process.prior_config():
        raise ValueError(
            f"the dataset was collected from a {teacher_process.name} teacher but the backbone's schedule is "
            f"{bb.schedule.config()}: DSNO starts from the teacher's prior draw x_T, which this schedule does not "
            f"draw, so the student needs the teacher's {type(teacher_process).__name__} schedule; use the teacher's "
            "backbone configuration"
        )
    if bb.num_classes != collection["num_classes"]:
        raise ValueError(
            f"backbone has {bb.num_classes} classes but the dataset was collected with {collection['num_classes']}; "
            "use the teacher's backbone configuration"
        )
    if config.init_from is not None:
        bb.load_weights(config.init_from)
    return bb


def plan_run(config: TrainConfig) -> RunPlan:
    """Validate the configuration, open the data (building its training cache once) and build the model."""
    from .trajectories import TrajectoryCache, file_sha256

    checks = (("batch_size", config.batch_size), ("grad_accum", config.grad_accum), ("max_steps", config.max_steps),
              ("save_every", config.save_every), ("log_every", config.log_every), ("keep_checkpoints", config.keep_checkpoints))
    for name, v in checks:
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not 0 <= config.ema < 1:
        raise ValueError(f"ema must lie in [0, 1), got {config.ema}")
    if config.loss not in LOSSES:
        raise ValueError(f"unknown loss {config.loss!r}; valid: {', '.join(LOSSES)}")
    check_positive("huber_c", config.huber_c)
    if config.huber_c is not None and config.loss != "pseudo-huber":
        raise ValueError(f"huber_c (--huber-c) applies to the pseudo-huber loss only, not {config.loss!r}; "
                         "drop it or pass --loss pseudo-huber")
    check_positive("final_weight", config.final_weight)
    check_decay(config.lr_decay, config.warmup, config.max_steps)
    if config.mixed_precision not in (*PRECISIONS, None):
        raise ValueError(f"unknown mixed precision {config.mixed_precision!r}; valid: {', '.join(PRECISIONS)}")
    if config.init_from is not None and not Path(config.init_from).is_file():
        raise FileNotFoundError(f"--init-from {config.init_from!r} does not exist; pass the teacher's .safetensors weights")
    from accelerate import PartialState

    with PartialState(cpu=not torch.cuda.is_available()).main_process_first():  # one process converts the dataset, the others then open it
        cache = TrajectoryCache.build(config.data)
    collection = cache.info["collection"]
    torch.manual_seed(config.seed)  # the model's initialisation (temporal layers; the backbone without --init-from)
    if len(cache) < config.batch_size:
        raise ValueError(
            f"the dataset holds {len(cache)} trajectories, fewer than one batch of {config.batch_size}; "
            "collect more or lower --batch-size"
        )
    bb = build_backbone(config, collection)
    model = DSNO(bb, cache.times, modes=config.modes, init=config.init, baseline=config.baseline)
    weights = time_weights(bb.schedule, model.times, config.weighting, config.weight_min, config.weight_max,
                           config.final_weight)
    if config.mixed_precision is None:
        precision = "bf16" if torch.cuda.is_available() else "no"
    else:
        precision = config.mixed_precision
    init_sha = file_sha256(config.init_from) if config.init_from else None  # read the file once
    run_info = {
        "format_version": FORMAT_VERSION,
        "opdiff_version": __version__,
        "train": config.identity(),
        "data_content_sha256": cache.content_sha256,
        "init_from_sha256": init_sha,
        "init_is_teacher": init_sha is not None and init_sha == collection.get("checkpoint_sha256"),
    }
    return RunPlan(config, cache, collection, cache.content_sha256, model, weights, precision, run_info)


def check_run_dir(out: Path, run_info: dict) -> bool:
    """True when ``out`` holds this run (resume), False when it is new or empty; ValueError for another run."""
    info_path = out / RUN_INFO
    if not info_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {str(out)!r} exists and is not an opdiff run directory; choose a new --out")
        return False
    old = json.loads(info_path.read_text())
    keys = ("format_version", "train", "data_content_sha256", "init_from_sha256")
    diff = [k for k in keys if old.get(k) != run_info.get(k)]
    if diff:
        fields = diff
        if "train" in diff:
            fields = [f"train.{k}" for k in run_info["train"] if old.get("train", {}).get(k) != run_info["train"][k]]
            fields += [k for k in diff if k != "train"]
        raise ValueError(
            f"--out {str(out)!r} holds another run (differs in {', '.join(fields)}); choose a new --out "
            "or repeat that run's arguments to resume it"
        )
    return True


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (marked by a COMPLETE file, written after ``save_state``)."""
    done = sorted(p.parent for p in (out / CHECKPOINTS).glob("step_*/COMPLETE"))
    return done[-1] if done else None


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class _Gather:
    """Collate: one fancy-indexed read of the memory-mapped cache per batch (not per example)."""

    def __init__(self, cache, baseline: bool):
        self.cache, self.baseline = cache, baseline

    def __call__(self, idx: list[int]) -> dict[str, Tensor]:
        td = self.cache[torch.as_tensor(idx)]
        traj = td["trajectory"]
        batch = {"trajectory": traj[:, -1:] if self.baseline else traj, "seed": td["seed"]}
        if "label" in td.keys():
            batch["label"] = td["label"]
        return batch


@dataclass
class TrainResult:
    out: Path
    step: int
    resumed_from: int | None
    model_path: Path | None


def train(config: TrainConfig, progress: Callable[[int, int, dict], None] | None = None) -> TrainResult:
    """Train (or resume) the run described by ``config``; ``progress(step, max_steps, metrics)`` is called after
    every optimizer step on the main process. Writes ``model.safetensors`` (EMA weights) and ``config.json`` at
    the end."""
    from .trajectories import example_inputs

    plan = plan_run(config)
    out = Path(config.out)
    resume = check_run_dir(out, plan.run_info)
    accelerator = start_run(out, plan.run_info, resume, mixed_precision=plan.mixed_precision,
                            grad_accum=config.grad_accum, seed=config.seed, trackers=config.trackers)

    model = plan.model
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.999))
    loader = torch.utils.data.DataLoader(
        _Indices(len(plan.cache)), batch_size=config.batch_size, shuffle=True, drop_last=True,
        collate_fn=_Gather(plan.cache, config.baseline),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = EMA(accelerator.unwrap_model(model), config.ema)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, state)

    resumed_from = resume_from_checkpoint(accelerator, out, resume, state)
    if config.trackers:
        accelerator.init_trackers("opdiff-train", config={k: str(v) for k, v in config.identity().items()})

    weights = plan.weights.to(accelerator.device)
    image_shape = tuple(plan.collection["image_shape"])
    schedule = plan.model.backbone.schedule  # draws the teacher's prior (build_backbone checks it)
    unwrapped = accelerator.unwrap_model(model)
    for batch in resumable_batches(accelerator, loader, state, config.max_steps):
        # the collection's noise rule (the process's prior draw)
        x_T, _ = example_inputs(batch["seed"].tolist(), image_shape, schedule=schedule)
        x_T = x_T.to(accelerator.device)
        target = batch["trajectory"].to(torch.float32)
        with accelerator.accumulate(model):
            pred = model(x_T, batch.get("label"))
            loss, terms = dsno_loss(pred, target, weights, config.loss, config.huber_c)
            accelerator.backward(loss)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, config.lr, config.warmup, config.lr_decay, config.max_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        state.micro += 1
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        ema.update(unwrapped)
        metrics = _metrics(accelerator, loss, terms, weights, optimizer)
        if config.trackers and state.step % config.log_every == 0:
            accelerator.log(metrics, step=state.step)
        end_of_step(accelerator, out, state, config, metrics, progress)

    model_path = None
    accelerator.wait_for_everyone()
    _check_in_sync(accelerator, unwrapped)
    if accelerator.is_main_process:
        model_path = _export(unwrapped, ema, out, plan, accelerator.num_processes)
    accelerator.wait_for_everyone()
    if config.trackers:
        accelerator.end_training()
    return TrainResult(out, state.step, resumed_from, model_path)


def _metrics(accelerator, loss: Tensor, terms: Tensor, weights: Tensor, optimizer) -> dict[str, float]:
    """Loss averaged over processes, each time's term L_i and its share of the weighted total."""
    loss = accelerator.reduce(loss.detach(), reduction="mean")
    terms = accelerator.reduce(terms.detach(), reduction="mean")
    weighted = weights.to(terms) * terms
    share = weighted / weighted.sum().clamp_min(1e-30)
    m = {"loss": float(loss), "lr": float(optimizer.param_groups[0]["lr"])}
    for i, (term, s) in enumerate(zip(terms.tolist(), share.tolist())):
        m[f"loss_t{i + 1}"] = term
        m[f"share_t{i + 1}"] = s
    return m


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next ``Accelerator`` in this process starts afresh
    (one process running several trainings: the demo, benchmarks, tests)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def start_run(out: Path, run_info: dict, resume: bool, *, mixed_precision: str, grad_accum: int, seed: int,
              trackers: Sequence[str] = (), check: Callable[[Any], None] | None = None):
    """The Accelerator of a resumable run (seedable sampler, CPU when there is no GPU, checkpoints under ``out``),
    launch-checked; then ``check(accelerator)`` (checks that need the process count), the global seed, and on the
    main process the run directory with its ``run.json`` unless resuming. Shared by the DSNO and teacher trainers."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        cpu=not torch.cuda.is_available(),
        log_with=list(trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed),
    )
    _check_launch(accelerator)
    if check is not None:
        check(accelerator)
    set_seed(seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / RUN_INFO).write_text(json.dumps(run_info, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return accelerator


def resume_from_checkpoint(accelerator, out: Path, resume: bool, state) -> int | None:
    """Load the latest complete checkpoint of ``out`` (when resuming) into everything registered with
    ``accelerator`` and cut metrics.jsonl back to it; returns the step resumed from (None: a fresh start)."""
    resumed_from = None
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        resumed_from = state.step
    if accelerator.is_main_process:
        _truncate_metrics(out / METRICS_FILE, state.step)
    return resumed_from


def resumable_batches(accelerator, loader, state, max_steps: int):
    """The loader's batches from micro-step ``state.micro`` on, epoch after epoch, until the caller's
    ``state.step`` reaches ``max_steps``: with the seedable sampler, epoch e is the same permutation in every
    run and ``skip_first_batches`` lands on the batch the interrupted run would have drawn next."""
    per_epoch = len(loader)
    while state.step < max_steps:
        epoch, skip = divmod(state.micro, per_epoch)
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            yield batch
            if state.step >= max_steps:
                return


def end_of_step(accelerator, out: Path, state, config, metrics: dict, progress) -> None:
    """After an optimizer step: log every ``config.log_every`` steps (and the last), report progress (main
    process) and checkpoint every ``config.save_every`` steps (and the last)."""
    last = state.step == config.max_steps
    if accelerator.is_main_process:
        if state.step % config.log_every == 0 or last:
            _append_metrics(out / METRICS_FILE, state.step, metrics)
        if progress is not None:
            progress(state.step, config.max_steps, metrics)
    if state.step % config.save_every == 0 or last:
        _save_checkpoint(accelerator, out, state.step, config.keep_checkpoints)


def _append_metrics(path: Path, step: int, metrics: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed (they will be logged again, identically)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _save_checkpoint(accelerator, out: Path, step: int, keep: int) -> None:
    path = out / CHECKPOINTS / f"step_{step:08d}"
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (path / "COMPLETE").write_text(f"{step}\n")
        done = sorted(p.parent for p in (out / CHECKPOINTS).glob("step_*/COMPLETE"))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _check_launch(accelerator) -> None:
    """Refuse to start when the launcher started more processes than Accelerate joined (each would train alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate joined {accelerator.num_processes}: each process would "
            "train alone; on CPU launch with ACCELERATE_USE_CPU=1"
        )


def _check_in_sync(accelerator, model: DSNO) -> None:
    """All processes must end with the same weights (DDP averages gradients); a silent failure to synchronise
    (e.g. ``torchrun`` on CPU without ACCELERATE_USE_CPU=1) would otherwise export one rank's private model."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not bool((sums == sums[0]).all()):
        raise RuntimeError(
            f"the {accelerator.num_processes} processes ended with different weights (checksums {sums.tolist()}): "
            "gradients were not synchronised; on CPU launch with ACCELERATE_USE_CPU=1"
        )


def _export(model: DSNO, ema: EMA, out: Path, plan: RunPlan, num_processes: int = 1) -> Path:
    """EMA weights → ``model.safetensors`` (DSNO config in its metadata) and a human-readable ``config.json``."""
    final = copy.deepcopy(model).float().cpu().eval()
    ema.copy_to(final)
    path = out / MODEL_FILE
    tmp = out / (MODEL_FILE + ".tmp")
    final.save(tmp)
    tmp.replace(path)
    info = {
        **plan.run_info,
        "model": final.config(),
        "collection": dict(plan.collection),  # the dataset's identity: teacher, solver, grid, seeds, labels, …
        "ema_updates": ema.updates,
        "num_processes": num_processes,
        "parameters": final.parameter_report() | {"injection_points": len(final.injection_points)},
    }
    (out / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return path


def load_run(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[DSNO, dict]:
    """The trained model (EMA weights) and ``config.json`` of a run directory; safetensors only."""
    run_dir = Path(run_dir)
    path = run_dir / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(run_dir)!r} holds no {MODEL_FILE}; it is not a finished `opdiff train` run (resume it to finish)"
        )
    config_path = run_dir / CONFIG_FILE
    info = json.loads(config_path.read_text()) if config_path.is_file() else {}
    version = info.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"run {str(run_dir)!r} has format_version {version}; this opdiff reads {FORMAT_VERSION}")
    return DSNO.load(path, map_location=map_location), info


def steps_per_epoch(num: int, batch_size: int, num_processes: int = 1, grad_accum: int = 1) -> float:
    """Optimizer steps per pass over ``num`` trajectories (for planning max_steps)."""
    return math.floor(num / (batch_size * num_processes)) / grad_accum
