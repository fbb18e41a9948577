"""What the trainers share (``opdiff train`` for DSNO and ``opdiff teacher train``): a run directory with its
``run.json`` identity, the Accelerator of a resumable run with its launch and sync checks, the learning-rate
schedule, the EMA, the step counters, exact resume (seeded sampler, skipped batches, checkpoints marked
COMPLETE, metrics cut back), and the example-index dataset the samplers draw from."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .configs import (  # noqa: F401  (re-exported: the run plumbing's checks live with the configs)
    LR_DECAYS,
    MIXED_PRECISIONS,
    RUN_COUNTS,
    check_decay,
    check_run_numbers,
)

__all__ = [
    "RUN_INFO",
    "METRICS_FILE",
    "CHECKPOINTS",
    "PRECISIONS",
    "LR_DECAYS",
    "check_decay",
    "learning_rate",
    "EMA",
    "TrainState",
    "check_run_dir",
    "latest_checkpoint",
    "Indices",
    "reset_accelerate_state",
    "start_run",
    "resume_from_checkpoint",
    "resumable_batches",
    "end_of_step",
    "check_launch",
    "check_in_sync",
    "write_atomic",
    "micro_seed",
    "check_run_numbers",
    "count_micro_step",
    "optimizer_step",
    "trainable_parameters",
    "NonFiniteLossError",
    "check_finite_loss",
    "CHECKPOINT_HASHES",
    "CheckpointError",
    "DamagedCheckpointError",
    "complete_checkpoints",
    "verify_checkpoint",
]

RUN_INFO = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
PRECISIONS = MIXED_PRECISIONS  # Accelerate's mixed_precision


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss is not finite: nothing was exported, the last good checkpoint is kept."""


def check_finite_loss(loss: float, step: int, out: Path) -> None:
    """Raise ``NonFiniteLossError`` naming the step and the last good checkpoint when ``loss`` is NaN or ±inf
    (before that step is checkpointed or anything is exported)."""
    if math.isfinite(loss):
        return
    last = latest_checkpoint(out)
    kept = f"the last good checkpoint ({last.name}) is kept" if last is not None else "no checkpoint was written"
    raise NonFiniteLossError(
        f"the loss is {loss} at step {step}: training stopped and exported nothing; {kept}. Lower --lr, or "
        "check the data for NaN or inf"
    )


def micro_seed(tag: str, seed: int, process: int, micro: int) -> int:
    """The torch seed of one micro-step: a hash of (trainer, run seed, process index, micro-step). Seeding every
    micro-step with it makes the random draws inside a step (dropout, noise, flips) a function of the step alone,
    so a resumed run draws what the uninterrupted one drew."""
    digest = hashlib.sha256(f"{tag}:{seed}:{process}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")  # hidden: a folder listing or a shard glob never sees it
    tmp.write_text(text)
    tmp.replace(path)


RUN_JSON_FIX = "restore it from a copy, or train into a new --out"


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; a damaged file is a ValueError naming it, what is wrong and ``fix`` (what to do)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is damaged (not valid JSON: {e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    return data


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


def optimizer_step(optimizer, state, config) -> None:
    """Step the optimizer at this step's learning rate (``learning_rate``) and clear the gradients; inside
    gradient accumulation Accelerate's wrapped optimizer skips the step until the gradients sync."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(state.step, config.lr, config.warmup, config.lr_decay, config.max_steps)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def count_micro_step(accelerator, state) -> bool:
    """Count one micro-step; True, with one more optimizer step counted, when its gradients synced."""
    state.micro += 1
    if not accelerator.sync_gradients:
        return False
    state.step += 1
    return True


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that train (``requires_grad``; ``finetune.freeze`` clears it for the frozen ones): what the
    optimizer steps and the EMA averages."""
    return [p for p in model.parameters() if p.requires_grad]


class EMA:
    """Exponential moving average of a model's trainable parameters (those with ``requires_grad``: a frozen one is
    its own average, and keeping no copy of it saves its memory), checkpointed with ``accelerator.save_state``.
    Decay min(decay, (1+n)/(10+n)) after n updates (the usual warm-up, so short runs are not dominated by the
    initialisation; it reaches 0.9999 after ~10^5 updates like the reference's constant decay)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in trainable_parameters(model)]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in trainable_parameters(model)]
        torch._foreach_lerp_(self.shadow, params, 1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, trainable_parameters(model), strict=True):
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


def check_run_dir(out: Path, run_info: dict) -> bool:
    """True when ``out`` holds this run (resume), False when it is new or empty; ValueError for another run."""
    info_path = out / RUN_INFO
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; choose a new --out")
    if not info_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {str(out)!r} exists and is not an opdiff run directory; choose a new --out")
        return False
    old = read_json(info_path, RUN_JSON_FIX)
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


def complete_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of ``out``, oldest first (each marked by a COMPLETE file, written after
    ``save_state`` and its hash manifest)."""
    return sorted(p.parent for p in (out / CHECKPOINTS).glob("step_*/COMPLETE"))


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


CHECKPOINT_HASHES = "SHA256SUMS.json"  # in each checkpoint: {file: {"sha256", "bytes"}} of every file save_state wrote
CHECKPOINT_FIX = "restore the run folder from a copy you trust, or train into a new --out"


class CheckpointError(ValueError):
    """A run folder's checkpoint is refused: a file changed since it was written (its sha256 differs from the one
    recorded at save time), so it is not loaded (``load_state`` unpickles the optimizer and RNG state)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file is truncated or missing (shorter than recorded, or unreadable): the previous checkpoint
    is tried instead."""


def _record_checkpoint_hashes(path: Path) -> None:
    """Write ``CHECKPOINT_HASHES``: the sha256 and size of every file ``save_state`` wrote into ``path``."""
    from .provenance import file_sha256

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name not in ("COMPLETE", CHECKPOINT_HASHES))
    sums = {str(p.relative_to(path)): {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files}
    write_atomic(path / CHECKPOINT_HASHES, json.dumps(sums, indent=1, sort_keys=True) + "\n")


def verify_checkpoint(path: Path, hashed: bool = True) -> None:
    """Check every file of checkpoint ``path`` against the sha256 recorded when it was written, before anything
    in it is unpickled. DamagedCheckpointError when a file is missing or shorter than recorded (a truncation:
    a crash, a full disk, a partial copy); CheckpointError when a file's content differs otherwise, or a file was
    added (changed since written: refused). A checkpoint without a manifest passes when ``hashed`` is False (one
    written before opdiff recorded them) and is refused otherwise."""
    from .provenance import file_sha256

    manifest = path / CHECKPOINT_HASHES
    if not manifest.is_file():
        if hashed:
            raise CheckpointError(
                f"checkpoint {str(path)!r} has no {CHECKPOINT_HASHES} (its files cannot be verified before they are "
                f"unpickled); {CHECKPOINT_FIX}"
            )
        return
    try:
        sums = read_json(manifest, CHECKPOINT_FIX)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    for name, rec in sums.items():
        f = path / name
        if not f.is_file():
            raise DamagedCheckpointError(f"{str(f)!r} is missing")
        size = f.stat().st_size
        if size < rec["bytes"]:
            raise DamagedCheckpointError(f"{str(f)!r} is truncated ({size} of {rec['bytes']} bytes)")
        if size != rec["bytes"] or file_sha256(f) != rec["sha256"]:
            raise CheckpointError(
                f"{str(f)!r} changed since it was written (its sha256 differs from the one recorded at save time), "
                f"so the run is not resumed from it: a changed optimizer or RNG file could run code when loaded; "
                f"{CHECKPOINT_FIX}"
            )
    extra = sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name not in ("COMPLETE", CHECKPOINT_HASHES) and str(p.relative_to(path)) not in sums
    )
    if extra:
        raise CheckpointError(
            f"{str(path / extra[0])!r} was added to the checkpoint after it was written; {CHECKPOINT_FIX}"
        )


class Indices(torch.utils.data.Dataset):
    """The example indices 0..n−1 as a dataset: the samplers shuffle indices, the collate reads the examples."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide state, so that the next ``Accelerator`` in this process starts afresh
    (one process running several trainings: the demo, benchmarks, tests)."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def start_run(
    out: Path,
    run_info: dict,
    resume: bool,
    *,
    mixed_precision: str,
    grad_accum: int,
    seed: int,
    trackers: Sequence[str] = (),
    check: Callable[[Any], None] | None = None,
):
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
    check_launch(accelerator)
    if check is not None:
        check(accelerator)
    set_seed(seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            # checkpoint_hashes: every checkpoint of this run has its hash manifest (verify_checkpoint)
            write_atomic(out / RUN_INFO, json.dumps({**run_info, "checkpoint_hashes": True}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return accelerator


def resume_from_checkpoint(accelerator, out: Path, resume: bool, state) -> int | None:
    """Load the latest complete checkpoint of ``out`` (when resuming) into everything registered with
    ``accelerator`` and cut metrics.jsonl back to it; returns the step resumed from (None: a fresh start).

    Each checkpoint is verified against its hash manifest first (``verify_checkpoint``): a changed file refuses the
    run (CheckpointError), a truncated or unreadable one falls back to the previous complete checkpoint with a
    one-line warning, and DamagedCheckpointError names the file when none is left."""
    import warnings

    resumed_from = None
    hashed = bool(resume and read_json(out / RUN_INFO, RUN_JSON_FIX).get("checkpoint_hashes"))
    damage = None
    for ckpt in reversed(complete_checkpoints(out)) if resume else ():
        try:
            verify_checkpoint(ckpt, hashed)
            try:
                accelerator.load_state(str(ckpt))
            except Exception as e:  # an unhashed (older) checkpoint's damaged file: safetensors, torch, pickle errors
                if (ckpt / CHECKPOINT_HASHES).is_file():
                    raise
                raise DamagedCheckpointError(
                    f"checkpoint {str(ckpt)!r} cannot be loaded ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
                ) from None
        except DamagedCheckpointError as e:
            damage = str(e)
            warnings.warn(f"{damage}: skipping checkpoint {ckpt.name}, resuming from the one before it", stacklevel=2)
            continue
        resumed_from = state.step
        break
    else:
        if damage is not None:
            raise DamagedCheckpointError(
                f"{damage}, and no earlier complete checkpoint is left to resume from; {CHECKPOINT_FIX}"
            )
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
    if accelerator.is_main_process:  # a damaged checkpoint skipped on resume is rewritten: incomplete meanwhile
        for name in ("COMPLETE", CHECKPOINT_HASHES):
            (path / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _record_checkpoint_hashes(path)
        (path / "COMPLETE").write_text(f"{step}\n")
        done = complete_checkpoints(out)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def check_launch(accelerator) -> None:
    """Refuse to start when the launcher started more processes than Accelerate joined (each would train alone)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate joined {accelerator.num_processes}: each process would "
            "train alone; on CPU launch with ACCELERATE_USE_CPU=1"
        )


def check_in_sync(accelerator, model: torch.nn.Module) -> None:
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
