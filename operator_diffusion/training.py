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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from . import __version__
from .adapter import DSNO
from .backbones import Backbone, load_backbone
from .runs import (  # noqa: F401  (re-exported: the trainers' shared run plumbing, formerly defined here)
    CHECKPOINTS,
    EMA,
    LR_DECAYS,
    METRICS_FILE,
    PRECISIONS,
    RUN_INFO,
    Indices,
    NonFiniteLossError,
    TrainState,
    check_decay,
    check_finite_loss,
    check_in_sync,
    check_run_dir,
    check_run_numbers,
    count_micro_step,
    end_of_step,
    latest_checkpoint,
    learning_rate,
    micro_seed,
    optimizer_step,
    read_json,
    reset_accelerate_state,
    resumable_batches,
    resume_from_checkpoint,
    start_run,
    trainable_parameters,
    write_atomic,
)
from .schedules import schedule_from_config

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
from .configs import (  # noqa: E402, F401  (the config lives in the torch-free configs module; re-exported)
    HUBER_C_PER_SQRT_DIM,
    INIT_SCRATCH,
    LATER_FIELDS,
    LOSSES,
    RESUMABLE_FIELDS,
    WEIGHTINGS,
    TrainConfig,
    check_positive,
)


# --------------------------------------------------------------------------------------------------
# The loss (pure functions)
# --------------------------------------------------------------------------------------------------
def time_weights(
    schedule, times: Tensor, weighting: str, w_min: float = 1.0, w_max: float = 1e4, final_weight: float | None = None
) -> Tensor:
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


def dsno_loss(
    pred: Tensor, target: Tensor, weights: Tensor, loss: str = "l1", huber_c: float | None = None
) -> tuple[Tensor, Tensor]:
    """(L, (L_i)) with L = (1/M) Σ_i w_i L_i (paper eq. 10 with the reference's mean over times)."""
    terms = per_time_losses(pred, target, loss, huber_c)
    return (weights.to(terms) * terms).mean(), terms


# --------------------------------------------------------------------------------------------------
# Set-up: validation before anything is written
# --------------------------------------------------------------------------------------------------
@dataclass
class RunPlan:
    config: TrainConfig
    cache: Any  # trajectory_cache.TrajectoryCache
    collection: dict  # the collection identity (info["collection"])
    content_sha256: str
    model: DSNO
    weights: Tensor  # (M,) or (1,) float64 loss weights
    mixed_precision: str
    run_info: dict
    init_from: str | None = None  # the weights it starts from, resolved (``resolve_init_from``)
    init_source: dict | None = None  # or the collection's ``teacher_source`` they were loaded from
    prompts: Any = None  # prompts.PromptTable of a text-conditioned collection (its embeddings condition the student)
    trainable_parameters: int | None = None  # the values that train (``finetune.freeze``; the rest stays the teacher's)


def build_backbone(config: TrainConfig, collection: dict, init_from: str | None = None) -> Backbone:
    """The backbone to train: the collection's teacher architecture unless ``config.backbone`` names another."""
    if config.backbone is None:
        bb = load_backbone(**{**collection["backbone"], **config.backbone_options})
    else:
        bb = load_backbone(config.backbone, **config.backbone_options)
    shape = list(bb.image_shape)
    if shape != list(collection["image_shape"]):
        raise ValueError(
            f"backbone {bb.name!r} takes images of shape {tuple(shape)} but the dataset holds "
            f"{tuple(collection['image_shape'])}; "
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
    if init_from is not None:
        bb.load_weights(init_from)
    return bb


WEIGHT_FILES = (
    "teacher.safetensors",
    "diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
)


def weights_in_directory(folder: Path, flag: str = "--init-from") -> str:
    """The weights file of a model folder given as ``--init-from DIR`` (or ``flag``): an ``opdiff teacher train``
    run's ``teacher.safetensors``, or a diffusers model or pipeline folder's ``diffusion_pytorch_model.safetensors``."""
    found = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    if len(found) != 1:
        what = "several weight files" if found else "no weights file"
        raise FileNotFoundError(
            f"{flag} {str(folder)!r} is a folder with {what} ({', '.join(WEIGHT_FILES)} looked for); "
            "pass the .safetensors file itself"
        )
    return str(found[0])


def resolve_init_from(config: TrainConfig, info: dict) -> tuple[str | None, str | None]:
    """The weights a run starts from and their sha256 when already known (else None): ``config.init_from``;
    ``"scratch"``: none (the backbone's initialisation); None: the collection's teacher — the file with its
    checkpoint's sha256 (``sampling.find_teacher_checkpoint``: the path the collection recorded, the shipped
    teachers; found by that hash, so it is not hashed again), or none when the collection's backbone config loads
    the teacher's weights itself; another ``--backbone`` starts from its own initialisation."""
    from .sampling import find_teacher_checkpoint

    if config.init_from == INIT_SCRATCH:
        return None, None
    if config.init_from is not None or config.backbone is not None:
        return config.init_from, None
    want = info["collection"].get("checkpoint_sha256")
    if want is None:
        return None, None
    found = find_teacher_checkpoint(
        {"collection": info["collection"], "teacher_checkpoint": info.get("teacher_checkpoint")}
    )
    if found is None:
        where = info.get("teacher_checkpoint") or "a file the collection did not record"
        raise FileNotFoundError(
            f"the collection's teacher weights (sha256 {want[:12]}…, from {where}) are not found, and training starts "
            "from them by default; pass --init-from PATH (the teacher's .safetensors), or --init-from scratch"
        )
    return found, want


def load_teacher_source(bb: Backbone, config: TrainConfig, info: dict) -> dict | None:
    """Start ``bb`` from the collection's teacher when that teacher loads its own weights (a diffusers model folder
    or Hub id: ``info["teacher_source"]``, checked against the collection's weights hash) and the run takes the
    default start (no --init-from, no other --backbone); returns the source used, or None."""
    from .sampling import teacher_from_source

    source = info.get("teacher_source")
    if source is None or config.init_from is not None or config.backbone is not None:
        return None
    if info["collection"].get("checkpoint_sha256") is not None:  # the teacher is a file (resolve_init_from)
        return None
    teacher, why = teacher_from_source(info)
    if teacher is None:
        raise FileNotFoundError(
            f"the collection's teacher weights are not found ({why}), and training starts from them by default; "
            "pass --init-from PATH (the teacher's .safetensors, or its model folder), or --init-from scratch"
        )
    try:
        bb.network.load_state_dict(teacher.network.state_dict())
    except RuntimeError as e:
        raise ValueError(
            f"the backbone options change the teacher's architecture, so it cannot start from the teacher's weights "
            f"({' '.join(str(e).split())[:200]}); drop those options, or pass --init-from scratch"
        ) from None
    return source


def plan_run(config: TrainConfig) -> RunPlan:
    """Validate the configuration, open the data (building its training cache once) and build the model."""
    from .finetune import add_lora, freeze
    from .provenance import file_sha256
    from .trajectory_cache import TrajectoryCache

    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "fp16 mixed precision needs a CUDA GPU (on CPU it would silently train in fp32); "
            "use --mixed-precision bf16 or no"
        )
    if config.init_from not in (None, INIT_SCRATCH) and Path(config.init_from).is_dir():
        config = dataclasses.replace(config, init_from=weights_in_directory(Path(config.init_from)))
    if config.init_from not in (None, INIT_SCRATCH) and not Path(config.init_from).is_file():
        raise FileNotFoundError(
            f"--init-from {config.init_from!r} does not exist; pass the teacher's .safetensors weights"
        )
    from accelerate import PartialState

    with PartialState(
        cpu=not torch.cuda.is_available()
    ).main_process_first():  # one process converts the dataset, the others then open it
        cache = TrajectoryCache.build(config.data)
    collection = cache.info["collection"]
    check_batch_memory(config, collection)
    torch.manual_seed(config.seed)  # the model's initialisation (temporal layers; the backbone without --init-from)
    if len(cache) < config.batch_size:
        raise ValueError(
            f"the dataset holds {len(cache)} trajectories, fewer than one batch of {config.batch_size}; "
            "collect more or lower --batch-size"
        )
    init_from, init_sha = resolve_init_from(config, cache.info)
    prompts = collection_prompts(config.data, collection)
    bb = build_backbone(config, collection, init_from)
    init_source = load_teacher_source(bb, config, cache.info) if init_from is None else None
    model = DSNO(
        bb,
        cache.times,
        modes=config.modes,
        placement=None if config.baseline else config.placement_selectors,
        init=config.init,
        baseline=config.baseline,
        output_skip=None if config.output_skip is None else output_skip_from_data(cache, bb, config.baseline),
    )
    if config.lora_rank is not None:
        add_lora(model, config.lora_rank, config.lora_targets)
    trainable = freeze(model, config.trainable, lora=config.lora_rank is not None)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    weights = time_weights(
        bb.schedule, model.times, config.weighting, config.weight_min, config.weight_max, config.final_weight
    )
    if config.mixed_precision is None:
        precision = "bf16" if torch.cuda.is_available() else "no"
    else:
        precision = config.mixed_precision
    if init_from is not None and init_sha is None:
        init_sha = file_sha256(init_from)
    run_info = {
        "format_version": FORMAT_VERSION,
        "opdiff_version": __version__,
        "train": config.identity(),
        "data_content_sha256": cache.content_sha256,
        "init_from_sha256": init_sha,
        "init_is_teacher": init_source is not None
        or (init_sha is not None and init_sha == collection.get("checkpoint_sha256")),
    }
    return RunPlan(
        config,
        cache,
        collection,
        cache.content_sha256,
        model,
        weights,
        precision,
        run_info,
        init_from,
        init_source,
        prompts,
        trainable,
    )


SKIP_FIT_NUM = 4096  # trajectories the output skip is fitted on (the first ones: deterministic, cheap)


def output_skip_from_data(cache, backbone: Backbone, baseline: bool, num: int = SKIP_FIT_NUM) -> Tensor:
    """``adapter.fit_output_skip`` on the collection's first ``num`` trajectories and their prior draws (the
    collection's noise rule); the baseline's one output: the last time's row."""
    from .adapter import fit_output_skip
    from .seeds import example_inputs

    td = cache[torch.arange(min(num, len(cache)))]
    x_T, _ = example_inputs(td["seed"].tolist(), backbone.image_shape, schedule=backbone.schedule)
    targets = td["trajectory"]
    return fit_output_skip(backbone.schedule.data_part(x_T), targets[:, -1:] if baseline else targets)


BATCH_COPIES = (
    6  # float32 arrays of a batch's B·M items alive in a step: x_T per frame, prediction, target, error, grads
)


def check_batch_memory(config: TrainConfig, collection: dict) -> None:
    """Bound --batch-size by memory: a step holds B × M items (one per output time), ``BATCH_COPIES`` float32
    arrays of them (a lower bound: the network's activations come on top), on each process."""
    from .resources import check_batch_memory as check

    m = 1 if config.baseline else len(collection["output_times"])
    detail = f"{config.batch_size * m:,} items of {m} output times per step"
    check(config.batch_size, m * math.prod(collection["image_shape"]), BATCH_COPIES, detail)


def collection_prompts(data: str, collection: dict):
    """The prompt table of a text-conditioned collection (checked against its identity's sha256), else None."""
    if "prompts" not in collection:
        return None
    from .collection_store import local_dir
    from .prompts import PromptTable

    folder, _ = local_dir(data)
    return PromptTable.load(folder / collection["prompts"]["file"], collection["prompts"]["sha256"])


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
class GatherBatch:
    """Collate: one fancy-indexed read of the memory-mapped cache per batch (not per example)."""

    def __init__(self, cache, baseline: bool):
        self.cache, self.baseline = cache, baseline

    def __call__(self, idx: list[int]) -> dict[str, Tensor]:
        td = self.cache[torch.as_tensor(idx)]
        traj = td["trajectory"]
        batch = {"trajectory": traj[:, -1:] if self.baseline else traj, "seed": td["seed"]}
        for name in ("label", "prompt"):
            if name in td.keys():
                batch[name] = td[name]
        return batch


@dataclass
class TrainResult:
    out: Path
    step: int
    resumed_from: int | None
    model_path: Path | None


def train(
    config: TrainConfig, progress: Callable[[int, int, dict], None] | None = None, plan: RunPlan | None = None
) -> TrainResult:
    """Train (or resume) the run described by ``config`` (its ``plan_run``, when not given); ``progress(step,
    max_steps, metrics)`` is called after every optimizer step on the main process. Writes ``model.safetensors``
    (EMA weights) and ``config.json`` at the end."""
    from .seeds import example_inputs

    plan = plan_run(config) if plan is None else plan
    out = Path(config.out)
    resume = check_run_dir(out, plan.run_info)
    accelerator = start_run(
        out,
        plan.run_info,
        resume,
        mixed_precision=plan.mixed_precision,
        grad_accum=config.grad_accum,
        seed=config.seed,
        trackers=config.trackers,
    )

    model = plan.model
    model.train()
    # frozen parameters (--trainable) get no optimizer state and no gradients
    optimizer = torch.optim.Adam(trainable_parameters(model), lr=config.lr, betas=(0.9, 0.999))
    loader = torch.utils.data.DataLoader(
        Indices(len(plan.cache)),
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=GatherBatch(plan.cache, config.baseline),
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
        # dropout's draws are a function of the micro-step: a resumed run repeats the uninterrupted one exactly
        torch.manual_seed(micro_seed("opdiff-train", config.seed, accelerator.process_index, state.micro))
        # the collection's noise rule (the process's prior draw)
        x_T, _ = example_inputs(batch["seed"].tolist(), image_shape, schedule=schedule)
        x_T = x_T.to(accelerator.device)
        target = batch["trajectory"].to(torch.float32)
        cond = batch_conditioning(plan.prompts, batch, accelerator.device)
        with accelerator.accumulate(model):
            pred = model(x_T, batch.get("label"), **cond)
            loss, terms = dsno_loss(pred, target, weights, config.loss, config.huber_c)
            accelerator.backward(loss)
            optimizer_step(optimizer, state, config)
        if not count_micro_step(accelerator, state):
            continue
        ema.update(unwrapped)
        metrics = _metrics(accelerator, loss, terms, weights, optimizer)
        check_finite_loss(metrics["loss"], state.step, out)  # the loss averaged over processes: all stop together
        if config.trackers and state.step % config.log_every == 0:
            accelerator.log(metrics, step=state.step)
        end_of_step(accelerator, out, state, config, metrics, progress)

    model_path = None
    accelerator.wait_for_everyone()
    check_in_sync(accelerator, unwrapped)
    if accelerator.is_main_process:
        model_path = _export(unwrapped, ema, out, plan, accelerator.num_processes)
    accelerator.wait_for_everyone()
    if config.trackers:
        accelerator.end_training()
    return TrainResult(out, state.step, resumed_from, model_path)


def batch_conditioning(prompts, batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    """The conditioning inputs beyond labels of a training batch: its prompts' stored embeddings (every frame of an
    example gets its example's, in DSNO.forward); none for a collection without prompts."""
    if prompts is None:
        return {}
    return {k: v.to(device) for k, v in prompts.inputs(batch["prompt"]).items()}


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


def _export(model: DSNO, ema: EMA, out: Path, plan: RunPlan, num_processes: int = 1) -> Path:
    """EMA weights → ``model.safetensors`` (DSNO config in its metadata) and a human-readable ``config.json``."""
    from .finetune import merge_lora

    final = copy.deepcopy(model).float().cpu().eval()
    ema.copy_to(final)
    merge_lora(final.network)  # LoRA runs: the adapters folded into the weights, the plain DSNO layout
    path = out / MODEL_FILE
    tmp = out / (MODEL_FILE + ".tmp")
    final.save(tmp)
    tmp.replace(path)
    info = {
        **plan.run_info,
        "model": final.config(),
        "collection": dict(plan.collection),  # the dataset's identity: teacher, solver, grid, seeds, labels, …
        "teacher_checkpoint": plan.cache.info.get("teacher_checkpoint"),  # the file the collection's weights came from
        "teacher_source": plan.cache.info.get("teacher_source"),  # how a teacher that loads its own weights rebuilds
        "ema_updates": ema.updates,
        "num_processes": num_processes,
        "parameters": final.parameter_report()
        | {"injection_points": len(final.injection_points), "trainable_parameters": plan.trainable_parameters},
    }
    write_atomic(out / CONFIG_FILE, json.dumps(info, indent=2) + "\n")
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
    info = read_json(config_path, "restore it from a copy, or train the run again") if config_path.is_file() else {}
    version = info.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"run {str(run_dir)!r} has format_version {version}; this opdiff reads {FORMAT_VERSION}")
    return DSNO.load(path, map_location=map_location), info


def steps_per_epoch(num: int, batch_size: int, num_processes: int = 1, grad_accum: int = 1) -> float:
    """Optimizer steps per pass over ``num`` trajectories (for planning max_steps)."""
    return math.floor(num / (batch_size * num_processes)) / grad_accum
