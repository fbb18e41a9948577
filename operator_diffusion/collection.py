"""The collect stage: ``collect`` solves a teacher's probability-flow ODE for every example of a
``CollectionPlan`` and writes the collection, shard by shard, resumable, over any number of processes.

Example k starts from the teacher process's prior draw (``DiffusionProcess.prior``, its ``noise_rule``
recorded in the identity): for VP x_T = ``torch.randn(C, H, W, generator=torch.Generator().manual_seed(seed + k))``,
σ_max times that for VE/EDM (CPU, float32; a random label is drawn from the same generator after the noise),
so x_T is never stored
and the data depend neither on the batch size nor on the number of processes.

PSLD teachers (``schedules.PSLD``) solve in phase space: example k starts from the prior draw
z_T = ``PSLD.prior((1, C, H, W), generator=torch.Generator().manual_seed(seed + k), dtype=torch.float32)[0]``
of shape (2C, H, W) (``PSLD.noise_rule``: x first, then m, so the x half is the VP rule's x_T), only the
deterministic PSLD solvers collect, and what is stored still has the data's C channels: the x̂_0 predictions,
or the x half of the states z(t_i).

The stage's other modules: ``collection_plan`` (config, plan, identity), ``teacher_solve`` (the teacher's ε and
its solves, precision "auto"), ``collection_store`` (the folder: info, card, shards, hash, Hub) and
``trajectory_cache`` (the training cache).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .collection_plan import AUTO_PRECISION, CollectConfig, CollectionPlan, plan_collection
from .collection_store import (
    check_output_dir,
    features,
    read_info,
    shard_complete,
    shard_damage,
    write_metadata,
    write_shard,
)
from .compilation import runs_compiled
from .provenance import versions
from .seeds import example_inputs
from .solvers import NonFiniteError
from .teacher_solve import EpsFunction, default_device, record_trajectories

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = [
    "CollectResult",
    "NonFiniteTrajectoryError",
    "collect",
    "solve_examples",
]

Progress = Callable[[int], None]


class NonFiniteTrajectoryError(NonFiniteError):
    """The teacher returned NaN/Inf; ``seeds`` are the affected examples' seeds (``items`` too)."""

    def __init__(self, message: str, step: int, t: float, seeds: list[int]):
        super().__init__(message, step, t, seeds)
        self.seeds = seeds


def example_conditions(plan: CollectionPlan, examples: range) -> dict[str, np.ndarray]:
    """The per-example columns beyond labels: a text-conditioned collection's prompt rows and guidance scales W
    (1.0 when unguided: the conditional ε); none otherwise."""
    if plan.prompts is None:
        return {}
    w = 1.0 if plan.config.guidance is None else float(plan.config.guidance)
    rows = plan.prompts.rows(examples).numpy()
    return {"prompt": rows, "guidance": np.full(len(rows), w, dtype=np.float32)}


def solve_examples(
    teacher: EpsFunction, plan: CollectionPlan, examples: range
) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """Stored trajectories (B, M, C, H, W) in the storage dtype, labels and the other per-example columns
    (``example_conditions``) for a range of example indices."""
    cfg, ident = plan.config, plan.identity
    seeds = [cfg.seed + k for k in examples]
    x, labels = example_inputs(seeds, ident["image_shape"], ident["labels"], ident["num_classes"], teacher.schedule)
    conditions = example_conditions(plan, examples)
    extra = {} if labels is None else {"labels": labels.to(teacher.device)}
    if plan.prompts is not None:  # the stored float16 embeddings, as training will see them
        extra.update({k: v.to(teacher.device) for k, v in plan.prompts.inputs(conditions["prompt"]).items()})
    try:
        with torch.inference_mode():
            traj = record_trajectories(
                teacher.eps_fn,
                x.to(teacher.device),
                teacher.schedule,
                plan.ts,
                plan.indices,
                cfg.solver,
                cfg.target,
                extra,
                **cfg.solver_options,
            )
    except NonFiniteError as e:
        bad = [seeds[i] for i in e.items]
        raise NonFiniteTrajectoryError(
            f"the teacher returned NaN/Inf at step {e.step} (t={e.t:.6g}) for the examples with seeds {bad[:20]}"
            f"{' …' if len(bad) > 20 else ''}; check the backbone and its checkpoint (completed shards are kept)",
            e.step,
            e.t,
            bad,
        ) from None
    stored = traj.to(getattr(torch, cfg.dtype)).cpu().numpy()
    return stored, None if labels is None else labels.numpy(), conditions


@dataclass(frozen=True)
class CollectResult:
    """``written``/``skipped``: shards this process wrote or found complete; ``missing``: shards still
    absent when it finished (other processes' share, in independent-jobs mode); ``precision_choice``: how
    precision "auto" was resolved (``resolve_precision``; None for a concrete precision)."""

    out_dir: Path
    info: dict
    written: tuple[int, ...]
    skipped: tuple[int, ...]
    missing: tuple[int, ...]
    precision_choice: dict | None = None

    @property
    def complete(self) -> bool:
        return not self.missing


def _process_layout(process_index: int | None, num_processes: int | None):
    """(index, count, state): explicit values (independent jobs, no barriers) or accelerate's PartialState."""
    if process_index is not None and num_processes is not None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in 0..{num_processes - 1}, got {process_index}")
        return process_index, num_processes, None
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state


def collect(
    backbone: "Backbone",
    out_dir: str | os.PathLike,
    config: CollectConfig | CollectionPlan,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: Progress | None = None,
) -> CollectResult:
    """Solve the teacher's PF-ODE for ``config.num`` examples and write the collection to ``out_dir``.

    Resumable: complete shards are skipped and the others (re)written; the result is bit-identical to an
    uninterrupted run with the same batch size and device. Process p of N writes shards p, p+N, …; by default p and N
    come from ``accelerate.PartialState()``, whose main process writes the card and info first and verifies every
    shard at the end. Explicit ``process_index``/``num_processes`` mean independent jobs (no barriers).
    The backbone is moved to ``device`` (default: CUDA when available) and put in eval mode.
    ``checkpoint`` (the file the weights came from) is hashed into the identity; ``progress(n)`` is
    called with the number of trajectories done (or found done) after each batch. ``config`` may be a
    plan already made by ``plan_collection`` for this backbone. Precision "auto" adopts the precision of
    the collection already in ``out_dir``, else is measured on ``device`` (``resolve_precision``); under
    accelerate the main process decides and the others adopt what it recorded.
    Bad input raises ValueError before anything is written.
    """
    out = Path(out_dir)
    p, n, state = _process_layout(process_index, num_processes)
    if device is None:
        device = state.device if state is not None else default_device()
    writes_metadata = state is None or state.is_main_process

    def make_plan() -> CollectionPlan:
        if isinstance(config, CollectionPlan):
            return config
        return plan_collection(backbone, config, checkpoint, out_dir=out, device=device)

    # other processes resolve "auto" after the barrier, from the info the main process wrote
    deferred = not writes_metadata and not isinstance(config, CollectionPlan) and config.precision == AUTO_PRECISION
    plan = None if deferred else make_plan()
    if writes_metadata:
        check_output_dir(out, plan)
        write_metadata(out, plan)
    if state is not None:
        state.wait_for_everyone()
    if not writes_metadata:  # after the barrier: the main process has written the info
        plan = make_plan() if deferred else plan
        check_output_dir(out, plan)
    config = plan.config
    nulls = None if plan.prompts is None else plan.prompts.null_inputs()
    precision = plan.identity["precision"]
    teacher = EpsFunction.from_backbone(backbone, config.guidance, device, precision, nulls, config.compile)
    feats = features(plan.identity)
    written, skipped = [], []
    for k in range(p, plan.num_shards, n):
        path, rows = plan.shard_path(out, k), plan.shard_range(k)
        if shard_complete(path, len(rows)) and not _damaged(path):
            skipped.append(k)
            if progress is not None:
                progress(len(rows))
            continue
        _collect_shard(teacher, plan, feats, path, rows, progress)
        written.append(k)
    if state is not None:
        state.wait_for_everyone()
    missing = [
        k for k in range(plan.num_shards) if not shard_complete(plan.shard_path(out, k), len(plan.shard_range(k)))
    ]
    if state is not None and missing:
        raise RuntimeError(
            f"collection {str(out)!r} is incomplete after all processes finished: shards {missing[:10]} missing"
        )
    return CollectResult(out, read_info(out), tuple(written), tuple(skipped), tuple(missing), plan.precision_choice)


def _damaged(path: Path) -> bool:
    """True (with a one-line warning) when a complete shard's sha256 is not the one recorded at write time: it is
    rewritten."""
    why = shard_damage(path)
    if why is not None:
        warnings.warn(f"{why}: rewriting it", stacklevel=3)
    return why is not None


def _collect_shard(
    teacher: EpsFunction, plan: CollectionPlan, feats, path: Path, rows: range, progress: Progress | None
) -> None:
    """Solve a shard's examples in batches composed within the shard ([start, start+B), …) and write it.

    The composition fixes the float round-off: CPU GEMM/conv kernels (and cuDNN) give results that differ
    in the last bits with the batch size, so the stored bits are reproducible for a given batch size and
    device (resume, any number of processes), and agree to about one float16 ulp across batch sizes."""
    bs = plan.config.batch_size
    trajs, labels, conditions = [], [], []
    for b0 in range(rows.start, rows.stop, bs):
        batch = range(b0, min(b0 + bs, rows.stop))
        traj, lab, cond = solve_examples(teacher, plan, batch)
        trajs.append(traj)
        labels.append(lab)
        conditions.append(cond)
        if progress is not None:
            progress(len(batch))
    seeds = np.arange(rows.start, rows.stop, dtype=np.int64) + plan.config.seed
    provenance = {
        "batch_size": bs,
        "device": str(teacher.device),
        "compiled": runs_compiled(teacher.eps_fn),
        **versions(),
    }
    columns = {k: np.concatenate([c[k] for c in conditions]) for k in conditions[0]}
    write_shard(
        path,
        feats,
        np.concatenate(trajs),
        seeds,
        None if labels[0] is None else np.concatenate(labels),
        provenance,
        columns,
    )
