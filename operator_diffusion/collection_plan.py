"""What a collection is: ``CollectConfig`` (what to collect from a teacher), validated against the teacher into a
``CollectionPlan`` (``plan_collection``: the solver grid, the output times and the identity recorded in the
collection's info; equal identities mean equal data). Validation only: nothing here writes; precision "auto"
reads the output folder's info (``resolve_precision``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
from torch import Tensor

from .collection_store import read_info, shard_name
from .provenance import file_sha256, weights_sha256
from .schedules import GRID_KINDS, PSLD, DiffusionProcess, Schedule, VPLinear, time_grid
from .seeds import check_seed, label_mode
from .solvers import available_solvers, solve, solver_info
from .solvers.base import lower_order_final_default
from .teacher_solve import PRECISIONS, TARGETS, Target, choose_precision

if TYPE_CHECKING:
    from .backbones import Backbone
    from .prompts import PromptTable

__all__ = [
    "CollectConfig",
    "CollectionPlan",
    "check_deterministic",
    "indices_of_times",
    "noise_rule",
    "output_indices",
    "plan_collection",
    "resolve_precision",
    "solver_nfe",
    "with_defaults",
]

NOISE_RULE = VPLinear().noise_rule()  # the VP teachers' rule (each process states its own: ``noise_rule``)
PSLD_NOISE_RULE = PSLD().noise_rule()
TIME_KINDS = ("uniform", "quadratic")
DTYPES = ("float16", "float32")
AUTO_PRECISION = "auto"  # measure both on this machine (choose_precision); resolved before the identity is built

# CLI and library defaults: each process's own (``DiffusionProcess.default_solver``, ``default_steps`` and
# ``default_solver_options``; how they were chosen: docs/collect.md), on the DEFAULT_GRID.
DEFAULT_SOLVER = Schedule.default_solver
DEFAULT_STEPS = Schedule.default_steps
DEFAULT_GRID = "quadratic"
PSLD_DEFAULT_SOLVER = PSLD.default_solver
PSLD_DEFAULT_STEPS = PSLD.default_steps
PSLD_DEFAULT_OPTIONS = dict(PSLD.default_solver_options)

TimeKind = Literal["uniform", "quadratic"]


@dataclass(frozen=True)
class CollectConfig:
    """What to collect from a teacher. Everything but ``batch_size`` and ``compile`` is part of the dataset's
    identity (both change only float round-off: see ``collection._collect_shard``)."""

    num: int  # number of trajectories
    solver: str | None = None  # None: the process's default_solver and its options
    steps: int | None = None  # solver steps (the grid has steps+1 times); None: its default_steps
    grid: str | None = None  # time_grid kind of the solver grid; None: DEFAULT_GRID
    times: int = 4  # M outputs (DSNO's reference: 4)
    time_kind: TimeKind = "quadratic"  # output placement; the reference's CIFAR choice
    time_list: tuple[float, ...] | None = None  # explicit output times (grid points); overrides times/time_kind
    target: Target = "denoised"  # DSNO trains on the teacher's x̂_0 predictions
    dtype: Literal["float16", "float32"] = "float16"  # fp16 halves the reference's fp32 storage
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # the teacher network's arithmetic (bf16: autocast; solver
    # stays fp32); auto: measured (``resolve_precision``)
    seed: int = 0  # example k uses seed + k
    shard_size: int = 1000  # examples per parquet shard (~25 MB at 4×3×32×32 fp16)
    labels: str | int | tuple[int, ...] | None = None  # "random", one class, or a list: seed s gets list[s % len]
    guidance: float | None = None  # classifier-free guidance scale (needs a null label, or prompts)
    prompts: tuple[str, ...] | None = None  # text-conditioned teachers: example k takes prompt k mod len (``prompts``)
    negative_prompt: str | None = None  # the guided ε's null branch for prompts; None: the empty prompt ""
    solver_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # trajectories per solve; changes float round-off only
    compile: bool = False  # the teacher under torch.compile (``compilation``); changes float round-off only


def with_defaults(config: CollectConfig, schedule: DiffusionProcess) -> CollectConfig:
    """``config`` with its unset solver, steps and grid filled in for the teacher's ``schedule`` (the PSLD
    default solver brings its options too, under any options given)."""
    solver, options = config.solver, dict(config.solver_options)
    if solver is None:
        solver = schedule.default_solver
        options = {**dict(schedule.default_solver_options), **options}
    steps = config.steps if config.steps is not None else schedule.default_steps
    return replace(config, solver=solver, steps=steps, grid=config.grid or DEFAULT_GRID, solver_options=options)


@dataclass(frozen=True)
class CollectionPlan:
    """A validated collection: the solver grid, output indices and the identity recorded in the info."""

    config: CollectConfig  # with the defaults filled in (``with_defaults``)
    ts: Tensor  # (steps+1,) float64 solver grid
    indices: tuple[int, ...]  # M grid indices of the outputs, increasing (times decreasing)
    identity: dict[str, Any]  # JSON-normalised; equal identities mean equal data
    precision_choice: dict | None = None  # how precision "auto" was resolved (``resolve_precision``); not identity
    checkpoint_path: str | None = None  # where the teacher's weights came from (absolute); provenance, not identity
    prompts: "PromptTable | None" = None  # a text-conditioned teacher's prompt table (its identity: "prompts")
    teacher_source: dict | None = None  # ``Backbone.source()``: load_backbone options that reload the weights

    @property
    def num_shards(self) -> int:
        return math.ceil(self.config.num / self.config.shard_size)

    def shard_range(self, k: int) -> range:
        """Example indices of shard k: [k·S, min((k+1)·S, num))."""
        s = self.config.shard_size
        return range(k * s, min((k + 1) * s, self.config.num))

    def shard_path(self, out_dir: Path, k: int) -> Path:
        return Path(out_dir) / shard_name(k, self.num_shards)


def output_indices(steps: int, m: int, kind: TimeKind = "quadratic") -> list[int]:
    """Grid indices of M outputs: i ↦ round(steps·u_i), u_i = i/M (uniform) or 1 − (1 − i/M)² (quadratic,
    DSNO's CIFAR choice), i = 1..M, rounded half up; the last output is the grid's end t_min."""
    if kind not in TIME_KINDS:
        raise ValueError(f"unknown output time kind {kind!r}; valid: {', '.join(TIME_KINDS)} (or give a time list)")
    if m < 2:
        raise ValueError(f"need at least 2 output times, got {m}")
    if steps < m:
        raise ValueError(f"{steps} solver steps cannot hold {m} distinct output times; use --steps >= {m}")
    u = [i / m if kind == "uniform" else 1 - (1 - i / m) ** 2 for i in range(1, m + 1)]
    idx = [math.floor(steps * v + 0.5) for v in u]
    if len(set(idx)) < m:
        raise ValueError(f"{m} {kind} output times collide on a {steps}-step grid (indices {idx}); raise --steps")
    return idx


def indices_of_times(ts: Tensor, times: Sequence[float]) -> list[int]:
    """Grid indices of explicit output times, each equal to a grid time to 1e-9 relative (no interpolation)."""
    if len(times) < 2:
        raise ValueError(f"need at least 2 output times, got {len(times)}")
    out = []
    for t in times:
        j = int(torch.argmin((ts - float(t)).abs()))
        if abs(float(ts[j]) - float(t)) > 1e-9 * abs(float(ts[j])):
            near = ", ".join(f"{float(ts[i]):.10g} (index {i})" for i in (j - 1, j, j + 1) if 0 <= i < len(ts))
            raise ValueError(
                f"output time {float(t):.10g} is not a point of the solver grid; nearest grid times: {near}"
            )
        out.append(j)
    if len(set(out)) < len(out):
        raise ValueError(f"output times must be distinct grid points, got indices {out}")
    if 0 in out:
        raise ValueError(
            f"output time {float(ts[0]):.6g} is the start t_max (x_T is regenerated from the seed, never stored)"
        )
    return sorted(out)


def solver_nfe(
    schedule: DiffusionProcess, ts: Tensor, solver: str, indices: Sequence[int], target: Target, options: dict
) -> int:
    """Network evaluations per trajectory of ``solver`` on grid ``ts`` recording ``indices`` (a denoised
    target at the last index costs one more), by a dry run on a free ε; also validates the solver options."""
    # one item with two channels: a valid α/σ image and a valid PSLD state (x, m) alike
    out = solve(
        lambda x, t, **kw: torch.zeros_like(x),
        torch.zeros(1, 2, dtype=torch.float64),
        schedule,
        ts,
        solver,
        record=list(indices),
        record_denoised=target == "denoised",
        **options,
    )
    return out.nfe


def check_deterministic(solver: str, schedule: DiffusionProcess, use: str) -> None:
    """Refuse a stochastic solver (PSLD's reverse-SDE samplers) for ``use``: its output is not a function of x_T."""
    if solver_info(solver, schedule).stochastic:
        deterministic = [n for n in available_solvers(schedule) if not solver_info(n, schedule).stochastic]
        raise ValueError(
            f"solver {solver!r} is stochastic: its trajectories are not a function of the seed's noise, and {use}; "
            f"choose a deterministic one: {', '.join(deterministic)}"
        )


def noise_rule(schedule: DiffusionProcess) -> str:
    """The per-seed noise rule of a teacher on ``schedule`` (recorded in the collection identity)."""
    return schedule.noise_rule()


def plan_collection(
    backbone: "Backbone",
    config: CollectConfig,
    checkpoint: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> CollectionPlan:
    """Validate ``config`` against the teacher and build the plan; raises ValueError on bad input.
    Precision "auto" is resolved after the validation and before the identity is built (``resolve_precision``:
    the precision recorded in ``out_dir``'s collection, else a measurement on ``device``), so the identity
    always holds "fp32" or "bf16"; the plan's ``precision_choice`` says how."""
    c = with_defaults(config, backbone.schedule)
    for name, v, lo in (
        ("num", c.num, 1),
        ("shard_size", c.shard_size, 1),
        ("batch_size", c.batch_size, 1),
        ("steps", c.steps, 1),
    ):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    check_seed(c.seed, c.num, "seed")
    check_collection_size(backbone, c, out_dir)  # before the grid or any array is allocated
    for name, v, valid in (
        ("target", c.target, TARGETS),
        ("dtype", c.dtype, DTYPES),
        ("grid", c.grid, GRID_KINDS),
        ("precision", c.precision, (*PRECISIONS, AUTO_PRECISION)),
    ):
        if v not in valid:
            raise ValueError(f"unknown {name} {v!r}; valid: {', '.join(valid)}")
    spec = solver_info(c.solver, backbone.schedule)
    check_deterministic(c.solver, backbone.schedule, "DSNO learns a deterministic map from it")
    ts = time_grid(backbone.schedule, c.steps, c.grid)
    if c.time_list is not None:
        indices = indices_of_times(ts, c.time_list)
    else:
        indices = output_indices(c.steps, c.times, c.time_kind)
    options = {**spec.options, **c.solver_options}
    if "lower_order_final" in options:  # the identity records what ran: None (on below 15 steps) resolved
        options["lower_order_final"] = lower_order_final_default(options["lower_order_final"], c.steps)
    nfe = solver_nfe(backbone.schedule, ts, c.solver, indices, c.target, c.solver_options)
    check_guidance(c.guidance)
    if backbone.takes_prompts or c.prompts is not None or c.negative_prompt is not None:
        table = prompt_table(backbone, c)
        labels = None
    else:
        table = None
        labels = label_mode(c.labels, backbone.num_classes, c.guidance, backbone.null_label)
    precision, choice = resolve_precision(backbone, c, out_dir, device)
    c = replace(c, precision=precision)
    identity = {
        "backbone": backbone.config(),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint is not None else None,
        "weights_sha256": weights_sha256(backbone),
        "image_shape": list(backbone.image_shape),
        "num_classes": backbone.num_classes,
        "schedule": backbone.schedule.config(),
        "solver": c.solver,
        "solver_options": options,
        "steps": c.steps,
        "grid": c.grid,
        "nfe_per_trajectory": nfe,
        "time_kind": "list" if c.time_list is not None else c.time_kind,
        "output_indices": list(indices),
        "output_times": [float(ts[i]) for i in indices],
        "target": c.target,
        "dtype": c.dtype,
        "precision": c.precision,
        "seed": c.seed,
        "noise": noise_rule(backbone.schedule),
        "num": c.num,
        "shard_size": c.shard_size,
        "labels": labels,
        "guidance": None if c.guidance is None else float(c.guidance),
    }
    if table is not None:
        identity["prompts"] = table.identity()
    path = None if checkpoint is None else str(Path(checkpoint).resolve())
    return CollectionPlan(
        c, ts, tuple(indices), json.loads(json.dumps(identity)), choice, path, table, backbone.source()
    )


GRID_COPIES = 8  # float64 arrays of steps+1 times alive while a grid is built and solved on (a generous bound)
SOLVER_STATES = 8  # states of a batch a solver holds besides the M recorded outputs (x, ε history, x̂_0, temporaries)
SHARD_COPIES = 3  # a shard's trajectories in memory at once: the batches, their concatenation, the Arrow columns


def check_collection_size(backbone: "Backbone", c: CollectConfig, out_dir: str | os.PathLike | None) -> None:
    """Bound the size inputs by what the machine holds, before anything is allocated or written (ValueError naming
    the flag): the solver grid (steps+1 float64 times, ``GRID_COPIES`` of them), a batch's solver states
    (batch_size × (M + ``SOLVER_STATES``) float32 states; the network's own activations come on top), a shard in
    memory (shard_size trajectories, ``SHARD_COPIES`` times) against available memory, and the trajectories still
    to be written against the free disk at ``out_dir``."""
    from .resources import check_disk, check_memory

    m = len(c.time_list) if c.time_list is not None else c.times
    m = min(m, c.steps + 1) if isinstance(m, int) and m > 0 else 1  # more times than grid points: refused below
    state = math.prod(getattr(backbone, "state_shape", backbone.image_shape))
    trajectory = m * math.prod(backbone.image_shape) * (2 if c.dtype == "float16" else 4)
    check_memory((c.steps + 1) * 8 * GRID_COPIES, f"--steps {c.steps} (its solver grid)", "lower --steps")
    check_memory(
        c.batch_size * (m + SOLVER_STATES) * state * 4,
        f"--batch-size {c.batch_size} (its solver states)",
        "lower --batch-size",
    )
    check_memory(
        min(c.shard_size, c.num) * trajectory * SHARD_COPIES,
        f"--shard-size {c.shard_size} (one shard in memory)",
        "lower --shard-size",
    )
    if out_dir is not None:
        data = Path(out_dir) / "data"
        written = sum(f.stat().st_size for f in data.glob("train-*.parquet")) if data.is_dir() else 0
        check_disk(
            c.num * trajectory - written,
            out_dir,
            f"--num {c.num} ({trajectory:,} bytes per trajectory)",
            "lower --num, or choose an --out with more free space",
        )


def check_guidance(guidance: float | None) -> None:
    """Refuse a guidance scale that is not a finite number >= 0 (None: unguided)."""
    if guidance is None:
        return
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number >= 0, got {guidance!r}")
    if guidance < 0:
        raise ValueError(
            f"guidance {guidance} is below 0: classifier-free guidance takes W >= 0 (1: the conditional model, 0: the "
            "unconditional one, > 1: stronger guidance; Stable Diffusion uses 7.5)"
        )


def prompt_table(backbone: "Backbone", config: CollectConfig) -> "PromptTable":
    """The prompt table of a text-conditioned teacher's collection (each distinct prompt encoded once), after
    checking that the backbone takes prompts, that there are some, and that no class labels are asked for."""
    from .prompts import PromptTable

    if not backbone.takes_prompts:
        raise ValueError(f"backbone {backbone.name!r} takes no text prompts: drop --prompts and --negative-prompt")
    if config.labels is not None:
        raise ValueError(f"backbone {backbone.name!r} is conditioned on text prompts, not class labels: drop --labels")
    if not config.prompts:
        raise ValueError(
            f"backbone {backbone.name!r} is text-conditioned: pass the prompts (--prompts FILE, one prompt per line)"
        )
    if any(not isinstance(p, str) or not p.strip() for p in config.prompts):
        raise ValueError("prompts must be non-empty strings")
    return PromptTable.build(backbone, config.prompts, config.negative_prompt or "")


def resolve_precision(
    backbone: "Backbone",
    config: CollectConfig,
    out_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> tuple[str, dict | None]:
    """The concrete precision ("fp32"/"bf16") of ``config`` and how it was found: its own when it is not
    "auto" (record None); for "auto", the precision recorded in ``out_dir``'s collection when the folder holds
    one (so that resuming, on this machine or another that would measure otherwise, matches; record
    ``{"precision", "source": "collection"}``), else ``choose_precision`` at ``config``'s batch size."""
    if config.precision != AUTO_PRECISION:
        return config.precision, None
    info = read_info(out_dir) if out_dir is not None else None
    recorded = (info or {}).get("collection", {}).get("precision")
    if recorded in PRECISIONS:
        return recorded, {"precision": recorded, "source": "collection"}
    return choose_precision(backbone, device, config.batch_size, guidance=config.guidance)
