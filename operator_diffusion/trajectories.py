"""Trajectory datasets: the teacher's PF-ODE solutions at M output times, as Hugging Face datasets.

A collection is a folder in the Hub layout, written by ``collect``::

    README.md                          dataset card (YAML: configs, features) + a description
    opdiff_collection.json             format version, the collection's identity config, provenance
    data/train-00000-of-00025.parquet  shard k holds examples [k·S, min((k+1)·S, num))

Example k starts from the teacher process's prior draw (``DiffusionProcess.prior``, its ``noise_rule``
recorded in the identity): for VP x_T = ``torch.randn(C, H, W, generator=torch.Generator().manual_seed(seed + k))``,
σ_max times that for VE/EDM (CPU, float32; a random label is drawn from the same generator after the noise),
so x_T is never stored
and the data depend neither on the batch size nor on the number of processes. Each row holds
``trajectory`` (M, C, H, W) in float16 (or float32) — the teacher's x̂_0 predictions (DSNO's targets,
``target="denoised"``) or its states x(t_i) (``target="state"``) at the output times t_1 > … > t_M, all
points of the solver grid (no interpolation) — plus ``seed`` and, for class-conditional teachers, ``label``.

PSLD teachers (``schedules.PSLD``) solve in phase space: example k starts from the prior draw
z_T = ``PSLD.prior((1, C, H, W), generator=torch.Generator().manual_seed(seed + k), dtype=torch.float32)[0]``
of shape (2C, H, W) (``PSLD.noise_rule``: x first, then m, so the x half is the VP rule's x_T), only the
deterministic PSLD solvers collect, and what is stored still has the data's C channels: the x̂_0 predictions,
or the x half of the states z(t_i).

``load_collection`` opens a collection (a folder or a Hub id) with ``datasets``; ``TrajectoryCache``
converts it once into a memory-mapped ``tensordict.TensorDict`` for training (shuffled reads from Arrow
are several times slower; see docs/benchmarks.md).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .provenance import file_sha256, versions, weights_sha256
from .runs import read_json, write_atomic
from .schedules import GRID_KINDS, PSLD, DiffusionProcess, Schedule, VPLinear, time_grid
from .seeds import check_seed, example_inputs, label_mode  # noqa: F401  (example_inputs: re-exported)
from .solvers import NonFiniteError, available_solvers, solve, solver_info
from .solvers.base import lower_order_final_default

if TYPE_CHECKING:  # heavy imports stay lazy
    import datasets
    from tensordict import TensorDict

    from .backbones import Backbone

__all__ = [
    "CollectConfig",
    "CollectionPlan",
    "CollectResult",
    "CollectionMismatchError",
    "NonFiniteTrajectoryError",
    "TrajectoryCache",
    "choose_precision",
    "collect",
    "collection_status",
    "content_hash",
    "load_collection",
    "output_indices",
    "plan_collection",
    "push_to_hub",
    "read_info",
    "record_trajectories",
    "resolve_precision",
    "time_calls",
]

FORMAT_VERSION = 1
INFO_NAME = "opdiff_collection.json"
CARD_NAME = "README.md"
DATA_DIR = "data"
SHARD_GLOB = f"{DATA_DIR}/train-*.parquet"
NOISE_RULE = VPLinear().noise_rule()  # the VP teachers' rule (each process states its own: ``noise_rule``)
PSLD_NOISE_RULE = PSLD().noise_rule()
TIME_KINDS = ("uniform", "quadratic")
TARGETS = ("denoised", "state")
DTYPES = ("float16", "float32")
PRECISIONS = ("fp32", "bf16")  # the teacher network's arithmetic during collection (what the identity records)
AUTO_PRECISION = "auto"  # measure both on this machine (choose_precision); resolved before the identity is built
BF16_MARGIN = 0.10  # "auto" takes bf16 only when it needs at most (1 - margin) of fp32's time per evaluation
REFERENCE_STEPS_STORED = 17  # the reference DSNO code stored 16 x̂_0 and x_T per CIFAR trajectory, in float32

# CLI and library defaults: each process's own (``DiffusionProcess.default_solver``, ``default_steps`` and
# ``default_solver_options``; how they were chosen: docs/collect.md), on the DEFAULT_GRID.
DEFAULT_SOLVER = Schedule.default_solver
DEFAULT_STEPS = Schedule.default_steps
DEFAULT_GRID = "quadratic"
PSLD_DEFAULT_SOLVER = PSLD.default_solver
PSLD_DEFAULT_STEPS = PSLD.default_steps
PSLD_DEFAULT_OPTIONS = dict(PSLD.default_solver_options)

TimeKind = Literal["uniform", "quadratic"]
Target = Literal["denoised", "state"]
Progress = Callable[[int], None]


class CollectionMismatchError(ValueError):
    """The output folder holds another collection (or other files); ``fields`` names what differs."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


class NonFiniteTrajectoryError(NonFiniteError):
    """The teacher returned NaN/Inf; ``seeds`` are the affected examples' seeds (``items`` too)."""

    def __init__(self, message: str, step: int, t: float, seeds: list[int]):
        super().__init__(message, step, t, seeds)
        self.seeds = seeds


# --------------------------------------------------------------------------------------------------
# Configuration and plan (validation only: nothing here writes; precision "auto" reads the output folder's info)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CollectConfig:
    """What to collect from a teacher. Everything but ``batch_size`` is part of the dataset's identity
    (the batch size changes only float round-off: see ``_collect_shard``)."""

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
    guidance: float | None = None  # classifier-free guidance scale (needs a null label)
    solver_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64  # trajectories per solve; changes float round-off only


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


def item_shape(identity: dict) -> tuple[int, ...]:
    """(M, C, H, W) of one stored trajectory."""
    return (len(identity["output_indices"]), *identity["image_shape"])


def shard_name(k: int, n: int) -> str:
    return f"{DATA_DIR}/train-{k:05d}-of-{n:05d}.parquet"


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
    path = None if checkpoint is None else str(Path(checkpoint).resolve())
    return CollectionPlan(c, ts, tuple(indices), json.loads(json.dumps(identity)), choice, path, backbone.source())


# --------------------------------------------------------------------------------------------------
# Teacher solves
# --------------------------------------------------------------------------------------------------
def record_trajectories(
    eps_fn,
    x: Tensor,
    schedule: DiffusionProcess,
    ts: Tensor,
    indices: Sequence[int],
    solver: str,
    target: Target = "denoised",
    extra_args: dict | None = None,
    **options,
) -> Tensor:
    """(B, M, ...) teacher outputs at grid ``indices``: x̂_0(x(t_i), t_i) (``denoised``; at the last grid
    index this is denoise_to_zero's sample) or the states x(t_i) (``state``), from one ``solve``.
    PSLD: the data's C channels either way — x̂_0, or the x half of the states z(t_i)."""
    out = solve(
        eps_fn,
        x,
        schedule,
        ts,
        solver,
        extra_args=extra_args,
        record=list(indices),
        record_denoised=target == "denoised",
        check_finite=True,
        **options,
    )
    if target == "denoised":
        return out.denoised
    return schedule.data_part(out.states, dim=2)  # (B, M, state channels, ...) -> the data's (B, M, C, ...)


@dataclass(frozen=True)
class EpsFunction:
    """The teacher's ε on a device, with classifier-free guidance applied when asked for."""

    eps_fn: Callable[..., Tensor]
    schedule: DiffusionProcess
    device: torch.device

    @classmethod
    def from_backbone(
        cls, backbone: "Backbone", guidance: float | None, device, precision: str = "fp32"
    ) -> "EpsFunction":
        from .prediction import autocast_eps, classifier_free_guidance

        backbone.to(device).eval()
        device = torch.device(device)
        eps_fn = backbone.eps_fn
        if precision == "bf16":
            eps_fn = autocast_eps(eps_fn, device.type, torch.bfloat16)
        if guidance is not None:
            eps_fn = classifier_free_guidance(eps_fn, float(guidance), backbone.null_label)
        return cls(eps_fn, backbone.schedule, device)


def default_device() -> torch.device:
    """CUDA when available, else the CPU: where the teacher runs unless told otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_calls(
    calls: dict[str, Callable[[], Any]],
    repeats: int = 3,
    sync: Callable[[], Any] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    settled: Callable[[dict[str, float]], bool] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each of ``calls``: one warm-up call each, then up to ``repeats`` rounds that
    call each once in turn (interleaved, so that load from other work falls on all alike), fewer when
    ``settled(medians so far)`` says so after a round; ``sync`` (e.g. ``torch.cuda.synchronize``) runs
    before each clock reading."""
    sync = sync or (lambda: None)
    for fn in calls.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync()
            start = timer()
            fn()
            sync()
            samples[name].append(timer() - start)
        medians = {name: statistics.median(v) for name, v in samples.items()}
        if settled is not None and settled(medians):
            break
    return medians


def choose_precision(
    backbone: "Backbone",
    device: str | torch.device | None = None,
    batch_size: int = 64,
    *,
    guidance: float | None = None,
    repeats: int = 3,
    margin: float = BF16_MARGIN,
    measure: Callable[[dict[str, Callable[[], Any]]], dict[str, float]] | None = None,
) -> tuple[str, dict]:
    """Time the teacher's ε (as collection runs it: ``EpsFunction.from_backbone``, guidance included) on one batch
    of the collection's shape in fp32 and under bf16 autocast, on ``device`` (default: ``default_device()``),
    and pick "bf16" only when it takes at most (1 − ``margin``) of fp32's time per evaluation: bf16 can be
    ~1.6× faster on CPUs with AVX-512 BF16 and on GPUs (not always: docs/collect.md) and is ~10× slower on
    AVX2-only CPUs, so measure, never assume.
    ``measure`` (default ``time_calls`` with ``repeats``) maps the two zero-argument calls to seconds each;
    the default stops after the first round when bf16 takes twice fp32's time (AVX2 CPUs: no need to time
    a 10× slower call again), so it costs 2 warm-up calls and 2–6 timed ones.
    Returns (precision, record): the record holds the choice, the seconds per evaluation of each precision,
    the batch size, device, CPU capability and margin (what the collection's info keeps)."""
    device = torch.device(device) if device is not None else default_device()
    labels = "random" if backbone.num_classes else None
    x, y = example_inputs(range(batch_size), backbone.image_shape, labels, backbone.num_classes, backbone.schedule)
    x = x.to(device)
    t = torch.full((batch_size,), 0.5 * (backbone.schedule.t_min + backbone.schedule.t_max), device=device)
    extra = {} if y is None else {"labels": y.to(device)}
    eps = {p: EpsFunction.from_backbone(backbone, guidance, device, p).eps_fn for p in PRECISIONS}
    calls = {p: (lambda f=f: f(x, t, **extra)) for p, f in eps.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    with torch.inference_mode():
        seconds = (
            measure(calls)
            if measure is not None
            else time_calls(calls, repeats, sync, settled=lambda m: m["bf16"] >= 2 * m["fp32"])
        )
    seconds = {p: float(seconds[p]) for p in PRECISIONS}
    chosen = "bf16" if seconds["bf16"] <= (1 - margin) * seconds["fp32"] else "fp32"
    record = {
        "precision": chosen,
        "source": "measured",
        "seconds_per_eval": seconds,
        "batch_size": batch_size,
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "margin": margin,
    }
    if device.type == "cuda":
        record["cuda_device"] = torch.cuda.get_device_name(device)
    return chosen, record


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


def solve_examples(teacher: EpsFunction, plan: CollectionPlan, examples: range) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored trajectories (B, M, C, H, W) in the storage dtype and labels for a range of example indices."""
    cfg, ident = plan.config, plan.identity
    seeds = [cfg.seed + k for k in examples]
    x, labels = example_inputs(seeds, ident["image_shape"], ident["labels"], ident["num_classes"], teacher.schedule)
    extra = None if labels is None else {"labels": labels.to(teacher.device)}
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
    return stored, None if labels is None else labels.numpy()


# --------------------------------------------------------------------------------------------------
# Storage: card, info, shards
# --------------------------------------------------------------------------------------------------
def features(identity: dict) -> "datasets.Features":
    """The dataset schema: trajectory Array4D (M, C, H, W), seed, and label for conditional teachers."""
    import datasets

    feats = {"trajectory": datasets.Array4D(item_shape(identity), identity["dtype"]), "seed": datasets.Value("int64")}
    if identity["num_classes"]:
        feats["label"] = datasets.Value("int64")
    return datasets.Features(feats)


def read_info(path: str | os.PathLike) -> dict | None:
    """The collection info of a folder, or None if it holds none."""
    p = Path(path) / INFO_NAME
    return read_json(p, "restore it from a copy, or collect again into a new folder") if p.is_file() else None


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old → new' for every (nested, dotted) identity field that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} → {_short(b)}")
    return out


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def check_output_dir(out_dir: Path, plan: CollectionPlan) -> bool:
    """Refuse a folder that holds another collection or foreign files; True if it holds this collection."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CollectionMismatchError(f"output path {str(out_dir)!r} is a file; choose a new --out folder", ["out"])
    info = read_info(out_dir)
    if info is None:
        foreign = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.is_dir() else []
        if foreign:
            raise CollectionMismatchError(
                f"output folder {str(out_dir)!r} is not empty and holds no opdiff collection "
                f"({', '.join(sorted(foreign)[:3])}); "
                "choose a new --out",
                ["out"],
            )
        return False
    if info.get("format_version") != FORMAT_VERSION:
        raise CollectionMismatchError(
            f"{str(out_dir)!r} holds a collection of format {info.get('format_version')!r} (this opdiff writes "
            f"{FORMAT_VERSION}); choose a new --out",
            ["format_version"],
        )
    diff = identity_diff(info["collection"], plan.identity)
    if diff:
        raise CollectionMismatchError(
            f"{str(out_dir)!r} holds a different collection ({'; '.join(diff[:6])}{' …' if len(diff) > 6 else ''}); "
            "resuming needs the same arguments: choose a new --out for this one",
            [d.split(":")[0] for d in diff],
        )
    return True


def dataset_card(info: dict) -> str:
    """README.md: YAML front matter (configs/data_files, features, split size) and a description."""
    import datasets
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    ident = info["collection"]
    card = DatasetCardData(tags=["opdiff", "diffusion-trajectories", "dsno"])
    split = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=ident["num"])})
    DatasetInfosDict({"default": datasets.DatasetInfo(features=features(ident), splits=split)}).to_dataset_card_data(
        card
    )
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": SHARD_GLOB}]}}).to_dataset_card_data(card)
    return f"---\n{card.to_yaml()}\n---\n\n{_card_text(info)}"


def _card_text(info: dict) -> str:
    ident = info["collection"]
    bb = ident["backbone"]
    times = ", ".join(f"{t:.6g} (grid index {i})" for t, i in zip(ident["output_times"], ident["output_indices"]))
    label = (
        ""
        if ident["labels"] is None
        else f" and `label` (int64; labels: {ident['labels']}, guidance: {ident['guidance']})"
    )
    options = ", ".join(f"{k}={v!r}" for k, v in ident["solver_options"].items()) or "no options"
    what = "x̂_0 predictions of the teacher" if ident["target"] == "denoised" else "states x(t_i) of the teacher's ODE"
    arithmetic = {"fp32": "float32", "bf16": "bf16 autocast (ε̂ cast back to float32 for the solver)"}[
        ident.get("precision", "fp32")
    ]
    choice = info.get("precision_choice")
    if choice is not None:
        sec = choice["seconds_per_eval"]
        arithmetic += (
            f", chosen by `--precision auto`: {sec['fp32'] * 1e3:.3g} ms in fp32 vs {sec['bf16'] * 1e3:.3g} ms"
            f" in bf16 per network evaluation at batch {choice['batch_size']} on {choice['device']}"
            f" (CPU capability {choice['cpu_capability']})"
        )
    return f"""# Teacher trajectories for operator learning (DSNO)

{ident["num"]:,} probability-flow ODE trajectories of the diffusion model `{bb.get("name")}` (image shape
{"×".join(map(str, ident["image_shape"]))}, schedule `{ident["schedule"].get("name")}`), collected with
opdiff {info["opdiff_version"]} (`opdiff collect`).

- Solver: `{ident["solver"]}` ({options}), {ident["steps"]} steps on a `{ident["grid"]}` grid,
  {ident["nfe_per_trajectory"]} network evaluations per trajectory; teacher network in {arithmetic}.
- Stored per example: `trajectory` ({len(ident["output_times"])}, {", ".join(map(str, ident["image_shape"]))}) in
  {ident["dtype"]}, the {what} at the output times t = {times}; `seed` (int64){label}.
- Noise: example k has seed {ident["seed"]} + k and {ident["noise"]}. x_T is not stored: regenerate it from the seed.
- Weights: checkpoint sha256 `{ident["checkpoint_sha256"]}`, state-dict sha256 `{ident["weights_sha256"]}`.

The full configuration is in `{INFO_NAME}`.

```python
from operator_diffusion.trajectories import load_collection, TrajectoryCache
ds, info = load_collection("path/or/hub-id")      # a datasets.Dataset and this card's configuration
cache = TrajectoryCache.build("path")             # memory-mapped TensorDict for training
```
"""


def write_metadata(out_dir: Path, plan: CollectionPlan) -> dict:
    """Write the info, then the card, then the data folder — all before any shard (``push_to_hub`` keeps an
    existing card). The info comes first so that a folder is never ours without it; an existing info of
    the same collection keeps its creation time."""
    old = read_info(out_dir)
    info = old or {
        "format_version": FORMAT_VERSION,
        "collection": plan.identity,
        "opdiff_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if old is None and plan.precision_choice is not None and plan.precision_choice["source"] == "measured":
        info["precision_choice"] = plan.precision_choice  # provenance of "auto", outside the identity
    if old is None and plan.checkpoint_path is not None:
        info["teacher_checkpoint"] = plan.checkpoint_path  # where bench and sample --teacher find the weights again
    if old is None and plan.teacher_source is not None:  # how they rebuild a teacher that loads its own weights
        info["teacher_source"] = plan.teacher_source
    out_dir.mkdir(parents=True, exist_ok=True)
    if old is None:
        write_atomic(out_dir / INFO_NAME, json.dumps(info, indent=2) + "\n")
    if not (out_dir / CARD_NAME).is_file():
        write_atomic(out_dir / CARD_NAME, dataset_card(info))
    (out_dir / DATA_DIR).mkdir(exist_ok=True)
    return info


def _arrow_array4d(values: np.ndarray, ext_type) -> "Any":
    """The Array4D extension array of (N, M, C, H, W) values: nested list offsets over the flat buffer."""
    import pyarrow as pa

    storage = pa.array(values.reshape(-1))
    for d in range(values.ndim - 1, 0, -1):  # innermost list first
        n_lists = int(np.prod(values.shape[:d]))
        offsets = np.arange(n_lists + 1, dtype=np.int32) * values.shape[d]
        storage = pa.ListArray.from_arrays(pa.array(offsets), storage)
    return pa.ExtensionArray.from_storage(ext_type, storage)


def write_shard(
    path: Path,
    feats: "datasets.Features",
    trajectory: np.ndarray,
    seeds: np.ndarray,
    labels: np.ndarray | None,
    provenance: dict | None = None,
) -> None:
    """Write one shard to a hidden temporary name and rename it atomically when complete; ``provenance``
    (batch size, device, torch version: what decides the float round-off) goes in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = feats.arrow_schema
    if provenance is not None:
        schema = schema.with_metadata({**schema.metadata, b"opdiff": json.dumps(provenance).encode()})
    columns = [_arrow_array4d(trajectory, schema.field("trajectory").type), pa.array(seeds, pa.int64())]
    if labels is not None:
        columns.append(pa.array(labels, pa.int64()))
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), tmp)
    os.replace(tmp, path)


def read_shard(path: Path, shape: Sequence[int]) -> dict[str, np.ndarray]:
    """A shard's columns as numpy, trajectories (N, *shape) in the stored dtype (no float32 upcast). Works
    whether or not ``datasets`` registered its Array4D extension type with pyarrow (storage: nested lists)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    arr = table.column("trajectory").combine_chunks()
    arr = getattr(arr, "storage", arr)
    while hasattr(arr.type, "value_type"):  # list<list<…<float16>>> → the flat values, offsets respected
        arr = arr.flatten()
    out = {
        "trajectory": arr.to_numpy(zero_copy_only=False).reshape(len(table), *shape),
        "seed": table.column("seed").to_numpy(),
    }
    if "label" in table.column_names:
        out["label"] = table.column("label").to_numpy()
    return out


def shard_complete(path: Path, rows: int) -> bool:
    """A shard is complete when its (atomically renamed) file exists and reads back ``rows`` rows."""
    import pyarrow.parquet as pq

    try:
        return path.is_file() and pq.read_metadata(path).num_rows == rows
    except Exception:  # a damaged file is incomplete and gets rewritten
        return False


# --------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------
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
    teacher = EpsFunction.from_backbone(backbone, config.guidance, device, plan.identity["precision"])
    feats = features(plan.identity)
    written, skipped = [], []
    for k in range(p, plan.num_shards, n):
        path, rows = plan.shard_path(out, k), plan.shard_range(k)
        if shard_complete(path, len(rows)):
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


def _collect_shard(
    teacher: EpsFunction, plan: CollectionPlan, feats, path: Path, rows: range, progress: Progress | None
) -> None:
    """Solve a shard's examples in batches composed within the shard ([start, start+B), …) and write it.

    The composition fixes the float round-off: CPU GEMM/conv kernels (and cuDNN) give results that differ
    in the last bits with the batch size, so the stored bits are reproducible for a given batch size and
    device (resume, any number of processes), and agree to about one float16 ulp across batch sizes."""
    bs = plan.config.batch_size
    trajs, labels = [], []
    for b0 in range(rows.start, rows.stop, bs):
        batch = range(b0, min(b0 + bs, rows.stop))
        traj, lab = solve_examples(teacher, plan, batch)
        trajs.append(traj)
        labels.append(lab)
        if progress is not None:
            progress(len(batch))
    seeds = np.arange(rows.start, rows.stop, dtype=np.int64) + plan.config.seed
    provenance = {"batch_size": bs, "device": str(teacher.device), **versions()}
    write_shard(
        path, feats, np.concatenate(trajs), seeds, None if labels[0] is None else np.concatenate(labels), provenance
    )


# --------------------------------------------------------------------------------------------------
# Reading, verification, sharing
# --------------------------------------------------------------------------------------------------
def _require_info(path: Path) -> dict:
    info = read_info(path)
    if info is None:
        raise FileNotFoundError(
            f"{str(path)!r} holds no opdiff collection (no {INFO_NAME}); create one with `opdiff collect`"
        )
    return info


def _shard_paths(path: Path, info: dict) -> list[tuple[Path, int]]:
    """(path, expected rows) of every shard of the collection in ``path``."""
    ident = info["collection"]
    num, size = ident["num"], ident["shard_size"]
    n = math.ceil(num / size)
    return [(path / shard_name(k, n), min(size, num - k * size)) for k in range(n)]


def collection_status(path: str | os.PathLike) -> dict:
    """Info plus progress: complete shards and examples, stored bytes per trajectory (raw and on disk),
    and the reference code's per-trajectory bytes (17 float32 steps) for comparison."""
    path = Path(path)
    info = _require_info(path)
    ident = info["collection"]
    shards = _shard_paths(path, info)
    done = [(p, r) for p, r in shards if shard_complete(p, r)]
    examples = sum(r for _, r in done)
    pixels = int(np.prod(ident["image_shape"]))
    return {
        "info": info,
        "num_shards": len(shards),
        "complete_shards": len(done),
        "complete_examples": examples,
        "complete": len(done) == len(shards),
        "bytes_per_trajectory": int(np.prod(item_shape(ident))) * np.dtype(ident["dtype"]).itemsize,
        "disk_bytes_per_trajectory": sum(p.stat().st_size for p, _ in done) / examples if examples else None,
        "reference_bytes_per_trajectory": REFERENCE_STEPS_STORED * pixels * 4,
    }


def _require_complete(path: Path) -> dict:
    status = collection_status(path)
    if not status["complete"]:
        raise ValueError(
            f"collection {str(path)!r} is incomplete ({status['complete_shards']} of {status['num_shards']} shards); "
            "finish it by re-running the same `opdiff collect` command"
        )
    return status["info"]


def iter_shards(path: str | os.PathLike):
    """The shards' columns (``read_shard``) of a complete collection, in example order."""
    path = Path(path)
    info = _require_complete(path)
    for p, _ in _shard_paths(path, info):
        yield read_shard(p, item_shape(info["collection"]))


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over the trajectories (stored bytes), seeds and labels in example order (each column
    hashed on its own, then the three digests): independent of shard size, batch size and processes."""
    cols = {"trajectory": hashlib.sha256(), "seed": hashlib.sha256(), "label": hashlib.sha256()}
    for shard in iter_shards(path):
        for name, h in cols.items():
            if name in shard:
                h.update(np.ascontiguousarray(shard[name]).tobytes())
    return hashlib.sha256(
        ("opdiff-trajectories/1:" + ":".join(h.hexdigest() for h in cols.values())).encode()
    ).hexdigest()


def _local_dir(dir_or_hub_id: str | os.PathLike) -> tuple[Path, bool]:
    """A local folder for a collection: the folder itself, or a Hub dataset's snapshot (downloaded)."""
    p = Path(dir_or_hub_id)
    if p.exists():
        return p, False
    text = str(dir_or_hub_id)
    if isinstance(dir_or_hub_id, Path) or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"{text!r} is neither a folder nor a Hub dataset id (namespace/name); "
            "pass the folder written by `opdiff collect`"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(dir_or_hub_id), repo_type="dataset")), True


def load_collection(dir_or_hub_id: str | os.PathLike, cache_dir: str | None = None) -> tuple["datasets.Dataset", dict]:
    """(train split as a ``datasets.Dataset``, info dict) of a complete collection, local or on the Hub."""
    import datasets

    path, _ = _local_dir(dir_or_hub_id)
    info = _require_complete(path)
    # explicit shard paths: `load_dataset(folder)` keys its Arrow cache on the folder's name and card, so two
    # collections in folders of the same name (e.g. two runs' "data") would share one cache entry
    files = [str(p.resolve()) for p, _ in _shard_paths(path, info)]
    return datasets.load_dataset("parquet", data_files={"train": files}, split="train", cache_dir=cache_dir), info


def push_to_hub(path: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Upload a complete collection as a Hub dataset: card and info first, then the shards. Returns the URL."""
    from huggingface_hub import HfApi

    path = Path(path)
    _require_complete(path)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[CARD_NAME, INFO_NAME],
        commit_message="opdiff collection: card and info",
    )
    api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[SHARD_GLOB],
        commit_message="opdiff collection: shards",
    )
    return f"https://huggingface.co/datasets/{repo_id}"


# --------------------------------------------------------------------------------------------------
# Training cache
# --------------------------------------------------------------------------------------------------
CACHE_META = "opdiff_cache.json"
CACHE_FORMAT = "opdiff-trajectory-cache/2"  # raw little-endian arrays read with numpy.memmap: nothing is unpickled
CACHE_TENSORS = "tensors"


def default_cache_dir(dataset_dir: Path, from_hub: bool, name: str) -> Path:
    """``DIR/.opdiff-cache`` for a local collection; ``trajectories/…`` under the cache root (``$OPDIFF_CACHE``,
    else ~/.cache/opdiff) for the Hub."""
    from .settings import cache_root

    if not from_hub:
        return dataset_dir / ".opdiff-cache"
    return cache_root() / "trajectories" / name.replace("/", "--")


def _cache_columns(ident: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each cached column's dtype and shape, from the collection's identity alone (never from the cache)."""
    n = ident["num"]
    cols = {
        "trajectory": (np.dtype(ident["dtype"]).newbyteorder("<"), (n, *item_shape(ident))),
        "seed": (np.dtype("<i8"), (n,)),
    }
    if ident["num_classes"]:
        cols["label"] = (np.dtype("<i8"), (n,))
    return cols


def shards_fingerprint(path: Path, info: dict) -> str:
    """A cheap fingerprint of a collection: its identity and every shard's name, size and modification time.
    The content hash is recomputed only when it changes."""
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p, _ in _shard_paths(path, info)]
    blob = json.dumps({"identity": info["collection"], "shards": stat}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TrajectoryCache:
    """A collection as memory-mapped arrays (``trajectory`` in the stored dtype, ``seed``, ``label``) in a
    TensorDict, tagged with the collection's content hash. ``cache[idx]`` gathers a batch as an in-memory
    TensorDict. The arrays are raw files whose dtypes and shapes come from the collection's identity, opened with
    ``numpy.memmap``: loading a cache never unpickles, so a cache folder that travels with a dataset cannot run
    code."""

    path: Path
    data: "TensorDict"
    info: dict
    content_sha256: str

    @classmethod
    def build(cls, dataset: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "TrajectoryCache":
        """Convert a complete collection once, or reuse the cache: when its shards' fingerprint (identity, names,
        sizes, mtimes) is unchanged, without re-hashing; else when the content hash is unchanged. Rebuilt when
        stale."""
        path, from_hub = _local_dir(dataset)
        info = _require_complete(path)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(path, from_hub, str(dataset))
        fingerprint = shards_fingerprint(path, info)
        meta = _read_cache_meta(cache)
        if meta is None or meta.get("fingerprint") != fingerprint:
            digest = content_hash(path)
            if meta is not None and meta.get("content_sha256") == digest:
                write_atomic(cache / CACHE_META, json.dumps({**meta, "fingerprint": fingerprint}, indent=2))
            else:
                _write_cache(path, info, cache, digest, fingerprint)
        return replace(cls.load(cache), info=info)  # the collection's info as it is now (provenance may change)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "TrajectoryCache":
        """Open a cache written by ``build`` (no check against the collection: ``build`` does that)."""
        from tensordict import TensorDict

        cache = Path(cache_dir)
        meta = _read_cache_meta(cache)
        if meta is None:
            raise FileNotFoundError(
                f"{str(cache)!r} holds no trajectory cache of this opdiff; create it with TrajectoryCache.build(DIR)"
            )
        columns = _cache_columns(meta["info"]["collection"])
        tensors = {}
        for name, (dtype, shape) in columns.items():
            file = cache / CACHE_TENSORS / f"{name}.bin"
            expected = dtype.itemsize * math.prod(shape)
            if not file.is_file() or file.stat().st_size != expected:
                raise ValueError(
                    f"trajectory cache file {str(file)!r} is missing or has the wrong size; delete {str(cache)!r} "
                    "and it is rebuilt from the collection"
                )
            # copy-on-write: writable views for torch, and the file is never changed
            tensors[name] = torch.from_numpy(np.memmap(file, dtype=dtype, mode="c", shape=shape))
        n = columns["seed"][1][0]
        return cls(cache, TensorDict(tensors, batch_size=[n]), meta["info"], meta["content_sha256"])

    def __len__(self) -> int:
        return int(self.data.batch_size[0])

    def __getitem__(self, idx) -> "TensorDict":
        return self.data[idx]

    @property
    def times(self) -> Tensor:
        """The M output times t_1 > … > t_M (float64)."""
        return torch.tensor(self.info["collection"]["output_times"], dtype=torch.float64)

    @property
    def indices(self) -> list[int]:
        return list(self.info["collection"]["output_indices"])


def _read_cache_meta(cache: Path) -> dict | None:
    """The cache's JSON metadata when it is a cache of this format, else None."""
    meta_path = cache / CACHE_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None


def _write_cache(path: Path, info: dict, cache: Path, digest: str, fingerprint: str) -> None:
    """Fill memory-mapped arrays shard by shard (never the whole set in memory); the meta file goes last."""
    tmp = cache / ".tensors.tmp"
    for stale in (tmp, cache / CACHE_TENSORS, cache / CACHE_META):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    tmp.mkdir(parents=True)
    columns = _cache_columns(info["collection"])
    arrays = {
        name: np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)
        for name, (dtype, shape) in columns.items()
    }
    start = 0
    for shard in iter_shards(path):
        stop = start + len(shard["seed"])
        for name, values in shard.items():
            arrays[name][start:stop] = values
        start = stop
    for a in arrays.values():
        a.flush()
    del arrays
    os.replace(tmp, cache / CACHE_TENSORS)
    meta = {"format": CACHE_FORMAT, "content_sha256": digest, "fingerprint": fingerprint, "info": info}
    write_atomic(cache / CACHE_META, json.dumps(meta, indent=2))
