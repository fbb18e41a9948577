"""`opdiff bench`: DSNO Table 1 for the user's own teacher — how close one-NFE DSNO, the one-step baseline
and the training-free solvers at k NFE come to the teacher's reference solution on held-out seeds.

Every method estimates the same quantity for each seed: the collection's training target at DSNO's last
time t_M (the teacher's x̂_0(x(t_M), t_M) for ``target=denoised``, the state x(t_M) for ``target=state``),
x_T drawn by the collection's noise rule. A solver charged k NFE makes k network evaluations that all advance
the solution: k steps ending at the state x(t_M), or (``SolverChoice.to_zero``, diffusers' last step to σ = 0)
k − 1 steps of a k-step grid and x̂_0 at the last evaluation. Each solver runs on its own grid and options
(``SOLVER_DEFAULTS``, or tuned per NFE on disjoint seeds), and every row reports its compute beside its NFE.

Teacher-match error (the paper's "teacher" comparison): on images clipped to [-1, 1],
RMSE = √(mean over seeds, channels and pixels of (x − x_ref)²) and PSNR = 10 log10(2² / MSE) dB (peak-to-peak
range 2). FID against a reference image set when one is given (``operator_diffusion.fid``).

A PSLD teacher: x_T is the phase-space z_T, every method's image is the data (x) part, and the solvers are the
deterministic PSLD integrators (``PSLD_DEFAULT_SOLVERS`` by default; a stochastic one is refused).

The stage: ``plan_bench(BenchConfig)`` checks and resolves everything into a frozen ``BenchSetup``, ``run_bench``
runs it and ``BenchResult.save`` writes bench.md and bench.json (`opdiff bench`, the demo and the ablations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .configs import BENCH_NUM, DEFAULT_NFES, BenchConfig
from .sampling import SampleBatch, TeacherSolver, collect_batches, dsno_batches, teacher_batches
from .schedules import GRID_KINDS, PSLD, Schedule
from .seeds import (  # noqa: F401  (the held-out seed rules, re-exported)
    TUNE_NUM,
    check_held_out,
    check_tune_seeds,
    default_tune_seeds,
    training_seeds,
)

# The solvers a bench compares by default are the process's (``DiffusionProcess.bench_solvers``); for PSLD the
# deterministic integrators from the plain to the most accurate (docs/benchmarks.md, "psld").
DEFAULT_SOLVERS = Schedule.bench_solvers
PSLD_DEFAULT_SOLVERS = PSLD.bench_solvers
BENCH_FILES = ("bench.md", "bench.json")  # what ``BenchResult.save`` writes
PSNR_RANGE = 2.0  # images in [-1, 1]


@dataclass(frozen=True)
class SolverChoice:
    """The grid and options a solver runs with in a bench row."""

    grid: str
    options: dict = field(default_factory=dict)
    to_zero: bool = False  # diffusers' last step to σ = 0 (returns x̂_0 at the last evaluation) instead of x(t_end)

    def describe(self) -> str:
        return ", ".join(
            [f"{self.grid} grid"]
            + [f"{k}={v}" for k, v in self.options.items()]
            + (["last step to σ = 0"] if self.to_zero else [])
        )

    def __hash__(self) -> int:  # options is a dict: hash its items (choices key the tuning tables)
        return hash((self.grid, tuple(sorted(self.options.items())), self.to_zero))

    @classmethod
    def of(cls, record: dict) -> "SolverChoice":
        """The choice a ``tune_solvers`` table record was scored with (its grid, options and ending)."""
        return cls(record["grid"], dict(record["options"]), bool(record["to_zero"]))


# Each solver's own default grid and options in a bench of an α/σ teacher (``FAMILY_DEFAULTS``): the best single
# choice over 3–15 NFE,
# measured on the shipped digits teacher on tuning seeds (docs/benchmarks.md, "solver-grids"; reproduce with
# `python -m operator_diffusion.benchmarks solver-grids`). Multistep solvers take lower-order final steps below
# 15 steps by their own default (``lower_order_final=None``, as diffusers). A solver not listed runs on logsnr.
SOLVER_DEFAULTS: dict[str, SolverChoice] = {
    "ddim": SolverChoice("uniform"),
    "deis": SolverChoice("quadratic", {"order": 3, "lower_order_final": False}),
    "ipndm": SolverChoice("quadratic", {"order": 3}),
    "dpmpp-2m": SolverChoice("quadratic", {"lower_order_final": False}, to_zero=True),
    "dpmpp-3m": SolverChoice("quadratic", {"lower_order_final": False}, to_zero=True),
    "unipc": SolverChoice("quadratic", {"order": 2, "lower_order_final": False}, to_zero=True),  # order 2 beats 3 here
    "heun": SolverChoice("edm", {}, to_zero=True),
    "lambda-ddim": SolverChoice("uniform"),  # not measured: DDIM's (λ = 0 is DDIM)
}
# The option variants `--tune` tries for each solver (crossed with every grid the schedule takes).
TUNE_OPTIONS: dict[str, tuple[dict, ...]] = {
    "deis": tuple({"order": o, "lower_order_final": f} for o in (1, 2, 3) for f in (None, False)),
    "ipndm": tuple({"order": o, "lower_order_final": f} for o in (2, 3, 4) for f in (None, False)),
    "dpmpp-2m": ({"lower_order_final": None}, {"lower_order_final": False}),
    "dpmpp-3m": tuple({"exact_third_order": e, "lower_order_final": f} for e in (False, True) for f in (None, False)),
    "unipc": tuple(
        {"order": o, "variant": v, "lower_order_final": f}
        for o in (1, 2, 3)
        for v in ("bh1", "bh2")
        for f in (None, False)
    ),
    "heun": ({"final_euler": False}, {"final_euler": True}),
    "lambda-ddim": tuple({"lam": lam} for lam in (-0.5, 0.0, 0.5, 1.0)),
}
# Per solver family (``DiffusionProcess.solver_family``): the per-solver defaults and tuning variants, and the grid of
# a solver not listed. PSLD integrators were not tuned per solver: they run on the caller's ``fallback_grid``.
FAMILY_DEFAULTS: dict[str, tuple[dict[str, SolverChoice], dict[str, tuple[dict, ...]], str | None]] = {
    "alpha-sigma": (SOLVER_DEFAULTS, TUNE_OPTIONS, "logsnr"),
    "psld": ({}, {}, None),
}


@dataclass
class BenchRow:
    """One method at one budget. ``nfe``: network evaluations per sample; ``depth``: sequential network passes
    (DSNO: 1, on B·M items); ``compute``: measured seconds per image over one teacher evaluation's seconds per
    image at the same batch (about M for DSNO, about ``nfe`` for a solver)."""

    method: str
    nfe: int
    rmse: float
    psnr: float
    seconds: float
    images_per_s: float
    fid: float | None = None
    detail: str = ""
    depth: int = 0
    compute: float = float("nan")
    seconds_per_image: float = float("nan")
    kind: str = ""  # reference | model | denoiser | solver
    median_rmse: float = float("nan")  # the median over seeds of each seed's RMSE (``per_seed_rmse``)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str, nfe: int | None = None) -> BenchRow:
        hits = [r for r in self.rows if r.method == method and (nfe is None or r.nfe == nfe)]
        if not hits:
            raise KeyError(f"no row {method!r} at NFE {nfe}")
        return hits[0]

    def to_json(self) -> str:
        return json.dumps({"meta": self.meta, "rows": [asdict(r) for r in self.rows]}, indent=2)

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``bench.md`` (``report``) and ``bench.json`` into ``folder``; returns their paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        md, js = (folder / f for f in BENCH_FILES)
        md.write_text(self.report() + "\n")
        js.write_text(self.to_json() + "\n")
        return [md, js]

    def report(self, with_verdict: bool = True) -> str:
        """The table with a header saying what was compared, on which machine, and how to reproduce it, then
        (``with_verdict``) each model's ``verdict``."""
        m = self.meta
        grids = (
            "each solver on its own grid and options (the detail column)"
            if m.get("grid") is None
            else f"solvers on the `{m['grid']}` grid"
        )
        tuned = (
            f"; grids and options tuned per NFE on {m['tune']['num']} other seeds ({m['tune']['seeds']})"
            if m.get("tune")
            else ""
        )
        lines = [
            f"Teacher-match error on {m['num']} held-out seeds ({m.get('seeds', '?')}) against the teacher's reference "
            f"solution ({m['reference']}, {m['reference_nfe']} NFE) of the collection's `{m['target']}` target at "
            f"t = {m['t_end']:.4g}; {grids}{tuned}. Every solver evaluation advances the solution: a solver ends "
            f"at x(t = {m['t_end']:.4g}), or, with its last step to σ = 0 (as diffusers), returns x̂₀ at its last "
            "evaluation. RMSE on images in [-1, 1], pooled over the seeds, and the median of the seeds' own RMSEs "
            "(a few badly matched seeds can dominate the pooled number); PSNR with peak-to-peak 2.",
        ]
        if m.get("eval_seconds_per_image"):
            lines.append(
                f"Compute: seconds per image at batch {m['batch_size']} and its ratio to one teacher evaluation "
                f"({1e6 * m['eval_seconds_per_image']:.1f} µs per image at that batch, measured in this run). "
                "Depth: sequential network passes."
            )
        if m.get("fid"):
            lines.append(
                f"FID against {m['fid']['reference']} ({m['fid']['n_reference']} images, features "
                f"{m['fid']['extractor']})."
            )
        if m.get("command"):
            lines.append(f"Command: `{m['command']}`")
        if m.get("machine"):
            lines.append(f"Machine: {m['machine']}; device {m['device']}.")
        text = "\n\n".join(lines) + "\n\n" + self.to_markdown()
        said = [line for r in self.rows if r.kind == "model" and with_verdict for line in verdict(self, r.method)]
        return text + ("\n\n" + "\n".join(f"- {line}" for line in said) if said else "")

    def to_markdown(self) -> str:
        has_fid = any(r.fid is not None for r in self.rows)
        head = (
            "| method | NFE | depth | compute (× 1 eval) | s/image | RMSE ↓ | median seed RMSE ↓ | PSNR (dB) ↑ |"
            + (" FID ↓ |" if has_fid else "")
            + " detail |"
        )
        sep = "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if has_fid else "") + "---|"
        lines = [head, sep]
        for r in self.rows:
            fid = (f" {r.fid:.3f} |" if r.fid is not None else " – |") if has_fid else ""
            psnr = "∞" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
            lines.append(
                f"| {r.method} | {r.nfe} | {r.depth} | {r.compute:.2f} | {r.seconds_per_image:.2e} | {r.rmse:.5f} | "
                f"{r.median_rmse:.5f} | {psnr} |{fid} {r.detail} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------
def per_seed_rmse(x: Tensor, reference: Tensor, clip: bool = True) -> Tensor:
    """Each sample's own RMSE against its reference, (B,) float64 (images clipped to [-1, 1]; latents with
    ``clip=False``). Their median says what a typical seed gets; the pooled RMSE (``teacher_match``) is the root
    of their mean square, which a few badly matched seeds can dominate."""
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(reference.shape)}")
    a, b = x.double(), reference.double()
    if clip:
        a, b = a.clamp(-1, 1), b.clamp(-1, 1)
    return (a - b).square().flatten(1).mean(1).sqrt()


def psnr_db(mse: float) -> float:
    """PSNR in dB of a mean squared error on images in [-1, 1] (peak-to-peak ``PSNR_RANGE``)."""
    return math.inf if mse == 0 else 10.0 * math.log10(PSNR_RANGE**2 / mse)


def teacher_match(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """(RMSE, PSNR in dB) of images ``x`` against ``reference``, both clipped to [-1, 1] (module docstring)."""
    mse = float(per_seed_rmse(x, reference).square().mean())
    return math.sqrt(mse), psnr_db(mse)


def latent_rmse(x: Tensor, reference: Tensor) -> float:
    """RMSE of latents ``x`` against ``reference``, unclipped (latents are not pixels in [-1, 1])."""
    return float(per_seed_rmse(x, reference, clip=False).square().mean().sqrt())


def steps_for_nfe(
    schedule,
    solver: str,
    nfe: int,
    grid: str,
    t_end: float,
    target: str,
    options: dict | None = None,
    to_zero: bool = False,
) -> int | None:
    """The number of grid steps at which ``solver`` spends exactly ``nfe`` evaluations (None if no count does)."""
    for steps in range(2 if to_zero else 1, nfe + 2):
        spend = TeacherSolver(solver, steps, grid, t_end, target, dict(options or {}), to_zero).nfe(schedule)
        if spend == nfe:
            return steps
        if spend > nfe:
            return None
    return None


def default_solvers(schedule) -> tuple[str, ...]:
    """The solvers a bench compares by default: the teacher process's ``bench_solvers``."""
    return schedule.bench_solvers


def denoiser_batches(
    backbone, seeds: Sequence[int], labels, batch_size: int, device, guidance: float | None = None, prompts=None
) -> Any:
    """The teacher's one-shot x̂_0(x_T, t_max) (1 NFE), as (B, 1, C, H, W) batches (PSLD: from z_T, C channels);
    with ``prompts`` (``sampling.sample_prompts``) guided as in ``teacher_batches``, a latent teacher's decoded."""
    from .prediction import denoised_from_eps
    from .sampling import decode_outputs, seed_conditioning, seed_inputs
    from .teacher_solve import EpsFunction

    nulls = None if prompts is None else prompts.null_inputs()
    teacher = EpsFunction.from_backbone(backbone, guidance, device, null_inputs=nulls)
    t = torch.tensor(teacher.schedule.t_max, dtype=torch.float64)
    for chunk, x, y in seed_inputs(seeds, backbone, labels, batch_size, device):
        tt = t.to(device).expand(len(chunk))
        extra = {} if y is None else {"labels": y}
        extra.update(seed_conditioning(prompts, chunk, device))
        with torch.inference_mode():
            x0 = denoised_from_eps(teacher.eps_fn(x, tt, **extra), x, tt, teacher.schedule)
        out = x0[:, None].float().cpu()
        yield SampleBatch(chunk, None if y is None else y.cpu(), out, [float(t)], decode_outputs(backbone, out))


def solver_choice(
    solver: str, schedule, grid: str | None = None, options: dict | None = None, fallback_grid: str = "quadratic"
) -> SolverChoice:
    """The grid and options ``solver`` runs with: its family's defaults (``FAMILY_DEFAULTS``: ``SOLVER_DEFAULTS``
    for α/σ teachers), else ``fallback_grid`` (PSLD teachers, whose integrators take uniform or quadratic grids),
    with ``grid`` and ``options`` overriding."""
    defaults, _, unlisted = FAMILY_DEFAULTS[schedule.solver_family]
    base = defaults.get(solver, SolverChoice(unlisted or fallback_grid))
    options = dict(options or {})
    to_zero = bool(options.pop("to_zero", base.to_zero))  # not a solve() option: how the run ends
    return SolverChoice(grid or base.grid, {**base.options, **options}, to_zero)


def tune_candidates(solver: str, schedule, grid: str | None = None, options: dict | None = None) -> list[SolverChoice]:
    """What ``--tune`` tries for ``solver``: every grid the schedule takes (or just ``grid``) crossed with the
    option variants of ``TUNE_OPTIONS`` and both endings (x(t_end), or the last step to σ = 0); ``options`` given
    by the user are kept fixed (``to_zero`` among them fixes the ending)."""
    grids = [grid] if grid else [g for g in GRID_KINDS if g in schedule.grid_kinds]
    variants = FAMILY_DEFAULTS[schedule.solver_family][1].get(solver, ({},))
    out: list[SolverChoice] = []
    for g in grids:
        for v in variants:
            for ending in (False, True):
                fixed = {**v, "to_zero": ending, **(options or {})}  # a user's to_zero fixes the ending
                choice = SolverChoice(g, fixed, bool(fixed.pop("to_zero")))
                if choice not in out:
                    out.append(choice)
    return out


def verdict(result: "BenchResult", model: str = "DSNO") -> list[str]:
    """Plain sentences comparing ``model`` (one pass) with the solvers at equal sequential depth and at equal
    compute, saying where it loses. Compute is the rows' measured ratio to one teacher evaluation."""
    try:
        m = result.row(model)
    except KeyError:
        return []
    solvers = [r for r in result.rows if r.kind == "solver"]
    if not solvers:
        return []
    lines = []
    best_at: dict[int, BenchRow] = {}
    for r in solvers:
        if r.nfe not in best_at or r.rmse < best_at[r.nfe].rmse:
            best_at[r.nfe] = r
    nfes = sorted(best_at)
    beaten = [k for k in nfes if best_at[k].rmse > m.rmse]
    loses = [k for k in nfes if best_at[k].rmse <= m.rmse]
    if not loses:
        lines.append(
            f"Equal depth: {model} (1 pass, RMSE {m.rmse:.4f}) beats the best solver at every benched NFE "
            f"(up to {nfes[-1]}: {best_at[nfes[-1]].method} {best_at[nfes[-1]].rmse:.4f})."
        )
    else:
        k = loses[0]
        won = (
            f"beats the best solver up to {max(x for x in beaten if x < k)} NFE"
            if any(x < k for x in beaten)
            else "beats no solver"
        )
        lines.append(
            f"Equal depth: {model} (1 pass, RMSE {m.rmse:.4f}) {won}; it loses from {k} NFE on, where "
            f"{best_at[k].method} reaches {best_at[k].rmse:.4f}"
            + (
                f" (at {nfes[-1]} NFE: {best_at[nfes[-1]].method} {best_at[nfes[-1]].rmse:.4f})"
                if nfes[-1] != k
                else ""
            )
            + "."
        )
    if math.isfinite(m.compute):
        # a solver at k NFE costs k teacher evaluations (its measured row time adds only overhead, which is noisy on
        # shared machines): counting it as k is the conservative side for DSNO
        affordable = [r for r in solvers if r.nfe <= m.compute]
        if affordable:
            b = min(affordable, key=lambda r: r.rmse)
            word = "beats" if m.rmse < b.rmse else "loses to"
            lines.append(
                f"Equal compute: one {model} pass costs {m.compute:.2f}× a teacher evaluation (measured); within "
                f"that compute the best solver is {b.method} at {b.nfe} NFE (RMSE {b.rmse:.4f}): {model} "
                f"{word} it ({m.rmse / b.rmse:.2f}× its error)."
            )
        else:
            lines.append(
                f"Equal compute: one {model} pass costs {m.compute:.2f}× a teacher evaluation, less than any "
                "benched solver row."
            )
    for k in (5, 10):
        if k in best_at:
            lines.append(
                f"Against the best solver at {k} NFE ({best_at[k].method}, {best_at[k].detail}): "
                f"{m.rmse / best_at[k].rmse:.2f}× its error."
            )
    return lines


def teacher_eval_seconds(backbone, batch: int, device, guidance: float | None = None, repeats: int = 5) -> float:
    """Seconds per image of one teacher evaluation ε̂(x, t) at ``batch`` images (median of ``repeats`` after a
    warm-up, ``teacher_solve.time_calls``): the unit of the bench's compute column."""
    from .teacher_solve import EpsFunction, time_calls

    # conditioning inputs beyond labels (prompt embeddings): zeros of their shapes, as in choose_precision
    cond = {k: torch.zeros(batch, *s, device=device) for k, s in backbone.conditioning_shapes.items()}
    teacher = EpsFunction.from_backbone(backbone, guidance, device, null_inputs={k: v[0] for k, v in cond.items()})
    x = torch.randn(batch, *backbone.state_shape, device=device)
    t = torch.full(
        (batch,), 0.5 * (teacher.schedule.t_max + teacher.schedule.t_min), dtype=torch.float32, device=device
    )
    extra = {} if not backbone.num_classes else {"labels": torch.zeros(batch, dtype=torch.long, device=device)}
    extra.update(cond)
    with torch.inference_mode():
        seconds = time_calls({"eval": lambda: teacher.eps_fn(x, t, **extra)}, repeats, _sync(device))
    return seconds["eval"] / batch


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchSetup:
    """What `run_bench` compares, resolved by ``plan_bench`` from a ``BenchConfig`` (or built directly from
    objects in memory, as the solver-grid study does); ``fid`` is a callable pixels → FID (None: no FID column).

    Solvers run on their own ``SOLVER_DEFAULTS`` grid and options unless ``grid`` (all solvers) or
    ``solver_grids`` / ``solver_options`` (per solver) say otherwise; with ``tune_seeds`` each solver's grid and
    options are chosen per NFE among ``tune_candidates`` by RMSE on those seeds, which must be disjoint from
    ``seeds`` (and from ``training_seeds``). ``meta`` goes into the result's meta; ``warnings`` are what the plan
    found worth saying (the caller prints them)."""

    teacher: Any  # Backbone
    reference: TeacherSolver
    seeds: list[int]
    labels: Any = None
    solvers: Sequence[str] | None = None  # None: default_solvers(teacher.schedule)
    nfes: Sequence[int] = DEFAULT_NFES
    grid: str | None = None  # one grid for every solver (None: each solver's own)
    models: dict[str, Any] = field(default_factory=dict)  # name -> DSNO (1 forward pass each)
    fid: Callable[[Any], float] | None = None
    batch_size: int = 256
    device: str = "cpu"
    guidance: float | None = None
    solver_grids: dict[str, str] = field(default_factory=dict)
    solver_options: dict[str, dict] = field(default_factory=dict)
    tune_seeds: list[int] | None = None
    training_seeds: tuple[range, ...] = ()
    fallback_grid: str = "quadratic"  # PSLD teachers' solver grid (the collection's)
    prompts: Any = None  # text-conditioned teachers: sampling.sample_prompts (seed s takes prompt s mod P)
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


class FIDComputeError(ValueError):
    """The FID of a bench row could not be computed from its pixels (a usage error: the reference does not fit)."""


def plan_bench(config: BenchConfig) -> BenchSetup:
    """Resolve ``config`` into a ``BenchSetup``, checking everything before anything runs: the output folder, the
    device, the runs (a bare checkpoint is refused; the baseline must make images of the DSNO run's shape), the
    held-out seeds (``seeds.resolve_seeds``) and tuning seeds, the teacher and its reference solution, the solvers
    with their grids and options, and the FID reference. ValueError says what to change."""
    from .provenance import machine, resolve_device
    from .sampling import open_run, run_solver, run_teacher, sample_prompts
    from .seeds import parse_labels, parse_seeds, resolve_seeds, seeds_text

    c, notes = config, []
    if c.out is not None:
        out = Path(c.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {str(out)!r} is a file, not a folder")
        existing = [str(out / f) for f in BENCH_FILES if (out / f).exists()]
        if existing and not c.overwrite:
            raise ValueError(f"{', '.join(existing)} already exist(s); pass --overwrite or choose another --out")
    dev = resolve_device(c.device)
    if c.grid is not None and c.grid not in GRID_KINDS:
        raise ValueError(f"unknown --grid {c.grid!r}; valid: {', '.join(GRID_KINDS)}")
    model, info = open_run(c.run, dev, "the DSNO run", c.offline)
    if not info:
        raise ValueError(
            f"{str(c.run)!r} is a bare checkpoint; bench needs the run folder (it records the teacher and its data)"
        )
    models = {"DSNO": model} if not model.baseline else {"one-step baseline": model}
    infos = (info,)
    if c.baseline is not None:
        base, binfo = open_run(c.baseline, dev, "the baseline run", c.offline)
        if tuple(base.backbone.image_shape) != tuple(model.backbone.image_shape):
            raise ValueError(
                f"the baseline makes images of shape {base.backbone.image_shape}, the DSNO run "
                f"{model.backbone.image_shape}"
            )
        if binfo.get("data_content_sha256") != info.get("data_content_sha256"):
            notes.append("the baseline was trained on other data than the DSNO run")
        models["one-step baseline" if base.baseline else "second model"] = base
        infos = (info, binfo)
    seed_list = resolve_seeds(c.seeds, c.num, BENCH_NUM, info, infos)
    held = [training_seeds(i) for i in infos]
    tune_list = None
    if c.tune:
        tune_list = parse_seeds(c.tune_seeds) if c.tune_seeds is not None else default_tune_seeds(seed_list)
        check_tune_seeds(tune_list, seed_list, held)
    coll = info["collection"]
    try:
        label_mode = parse_labels(c.labels, model.backbone.num_classes)
        reference = run_solver(info, c.reference_solver, c.reference_steps, c.reference_grid, c.reference_options)
        teacher = run_teacher(info, c.teacher_checkpoint)
        reference.nfe(teacher.schedule)
        prompt_table = sample_prompts(teacher, list(c.prompts), (coll.get("prompts") or {}).get("negative_prompt", ""))
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        raise ValueError(f"cannot set up the teacher: {e}") from None
    solvers = list(default_solvers(teacher.schedule) if c.solvers is None else c.solvers)
    _check_solvers(c, teacher.schedule, solvers, reference.t_end, coll["grid"])
    fid, fid_meta = (None, None) if c.ref is None else _fid_of_reference(c, dev, notes)
    meta = {
        "run": str(c.run),
        "seeds": seeds_text(c.seeds, seed_list),
        "machine": machine(),
        "command": None,  # the caller's command line, when it has one
        "fid": fid_meta,
        "baseline": None if c.baseline is None else str(c.baseline),
    }
    return BenchSetup(
        teacher,
        reference,
        seed_list,
        label_mode,
        solvers,
        c.nfes,
        c.grid,
        models,
        fid,
        c.batch_size,
        dev,
        coll.get("guidance"),
        dict(c.solver_grids),
        {k: dict(v) for k, v in c.solver_options.items()},
        tune_list,
        tuple(held),
        coll["grid"],
        prompts=prompt_table,
        meta=meta,
        warnings=tuple(notes),
    )


def _check_solvers(c: BenchConfig, schedule, solvers: list[str], t_end: float, fallback_grid: str) -> None:
    """Every solver is the teacher process's, every per-solver grid and option names one of them, and each
    choice runs (deterministic, on a grid the schedule takes; PSLD: uniform or quadratic)."""
    from .solvers import available_solvers

    valid = available_solvers(schedule)  # a PSLD teacher has its own solvers
    unknown = [s for s in solvers if s not in valid]
    if unknown:
        raise ValueError(
            f"unknown --solvers {', '.join(unknown)} for the {schedule.name} teacher; valid: {', '.join(valid)}"
        )
    for name, g in c.solver_grids.items():
        if name not in solvers or g not in GRID_KINDS:
            raise ValueError(
                f"bad --solver-grid {f'{name}={g}'!r}: give SOLVER=GRID with SOLVER among --solvers "
                f"({', '.join(solvers)}) and GRID among {', '.join(GRID_KINDS)}"
            )
    for name in c.solver_options:
        if name not in solvers:
            raise ValueError(
                f"bad --solver-options {name!r}: give SOLVER:KEY=VALUE[,KEY=VALUE] with SOLVER among --solvers "
                f"({', '.join(solvers)}), e.g. unipc:order=2"
            )
    try:
        for name in solvers:
            choice = solver_choice(
                name, schedule, c.grid or c.solver_grids.get(name), c.solver_options.get(name), fallback_grid
            )
            TeacherSolver(name, 1, choice.grid, t_end, "state", choice.options).nfe(schedule)
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad --solvers/--grid/--solver-grid/--solver-options: {e}") from None


def _fid_of_reference(c: BenchConfig, device: str, notes: list[str]) -> tuple[Callable[[Any], float], dict]:
    """The FID column's closure pixels → FID against ``c.ref`` (its statistics computed or loaded once), and the
    meta that describes it."""
    from . import fid as F

    try:
        extractor = F.load_extractor(c.feature_extractor, c.inception_path, device, c.offline or None)
        ref_stats = F.reference_stats(c.ref, extractor, c.ref_num, cache_dir=c.cache_dir, device=device)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"cannot set up FID: {e}") from None
    warn = F.small_sample_warning(ref_stats, "the reference")
    if warn:
        notes.append(warn)

    def fid(pixels) -> float:
        try:
            return F.fid_of_pixels(pixels, ref_stats, extractor, device=device)
        except ValueError as e:
            raise FIDComputeError(f"cannot compute FID: {e}") from None

    return fid, {"reference": c.ref, "extractor": extractor.id, "n_reference": ref_stats.n}


def _sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if str(device).startswith("cuda") else None


def _row_solver(su: BenchSetup, solver: str, nfe: int, choice: SolverChoice) -> TeacherSolver | None:
    """The solver run that spends exactly ``nfe`` evaluations, all of them advancing the solution: ending at the
    state x(t_end), or (``to_zero``) with diffusers' last step to σ = 0."""
    t_end = su.reference.t_end
    steps = steps_for_nfe(su.teacher.schedule, solver, nfe, choice.grid, t_end, "state", choice.options, choice.to_zero)
    return (
        None
        if steps is None
        else TeacherSolver(solver, steps, choice.grid, t_end, "state", dict(choice.options), choice.to_zero)
    )


def tune_solvers(
    su: BenchSetup, solvers: Sequence[str], progress: Callable[[str, int, int], None] | None = None
) -> tuple[dict[tuple[str, int], SolverChoice], list[dict]]:
    """Each (solver, NFE)'s best ``tune_candidates`` by RMSE against the reference on ``su.tune_seeds`` only;
    returns the choices and every candidate's tuning RMSE (for the record)."""
    from .solvers import NonFiniteError

    seeds = list(su.tune_seeds or [])
    check_tune_seeds(seeds, su.seeds, su.training_seeds)
    ref, _ = collect_batches(
        teacher_batches(
            su.teacher, seeds, su.reference, su.labels, su.batch_size, su.device, su.guidance, prompts=su.prompts
        ),
        len(seeds),
    )
    choices: dict[tuple[str, int], SolverChoice] = {}
    table: list[dict] = []
    for solver in solvers:
        cands = tune_candidates(
            solver, su.teacher.schedule, su.grid or su.solver_grids.get(solver), su.solver_options.get(solver)
        )
        for nfe in su.nfes:
            best = None
            for k, choice in enumerate(cands):
                run = _row_solver(su, solver, nfe, choice)
                if run is None:
                    continue
                try:
                    out, _ = collect_batches(
                        teacher_batches(
                            su.teacher, seeds, run, su.labels, su.batch_size, su.device, su.guidance, prompts=su.prompts
                        ),
                        len(seeds),
                    )
                except NonFiniteError:
                    continue
                x, x_ref = out.outputs[:, -1], ref.outputs[:, -1]
                rmse = teacher_match(x, x_ref)[0] if out.images is None else latent_rmse(x, x_ref)
                table.append(
                    {
                        "solver": solver,
                        "nfe": nfe,
                        "grid": choice.grid,
                        "options": choice.options,
                        "to_zero": choice.to_zero,
                        "rmse": rmse,
                    }
                )
                if best is None or rmse < best[0]:
                    best = (rmse, choice)
                if progress is not None:
                    progress(f"tune {solver} {nfe} NFE", k + 1, len(cands))
            if best is not None:
                choices[(solver, nfe)] = best[1]
    return choices, table


def run_bench(setup: BenchSetup, progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Reference solution, then each model, the one-shot denoiser and each solver at each NFE; one row each."""
    from .images import to_uint8

    su, n = setup, len(setup.seeds)
    sync = _sync(su.device)
    target, t_end = su.reference.target, su.reference.t_end
    solvers = list(default_solvers(su.teacher.schedule) if su.solvers is None else su.solvers)
    check_held_out(su.seeds, su.training_seeds)
    tuned, tune_table = tune_solvers(su, solvers, progress) if su.tune_seeds is not None else ({}, [])
    eval_s = teacher_eval_seconds(su.teacher, min(su.batch_size, n), su.device, su.guidance)

    def run(label: str, batches) -> tuple[SampleBatch, float]:
        return collect_batches(batches, n, None if progress is None else (lambda d, t: progress(label, d, t)), sync)

    def add(method: str, nfe: int, depth: int, batch: SampleBatch, seconds: float, detail: str, kind: str) -> None:
        # each seed's RMSE: of the images, or of a latent teacher's latents (not clipped)
        own = per_seed_rmse(batch.outputs[:, -1], ref.outputs[:, -1], clip=batch.images is None)
        mse = float(own.square().mean())
        rmse, median = math.sqrt(mse), float(own.median())
        # PSNR of the images: the samples themselves, or a latent teacher's decoded images
        psnr = psnr_db(mse) if batch.images is None else teacher_match(batch.images[:, -1], ref.images[:, -1])[1]
        fid = None if su.fid is None else float(su.fid(to_uint8(batch.pixels[:, -1])))
        rows.append(
            BenchRow(
                method,
                nfe,
                rmse,
                psnr,
                seconds,
                n / seconds,
                fid,
                detail,
                depth,
                seconds / n / eval_s,
                seconds / n,
                kind,
                median,
            )
        )

    rows: list[BenchRow] = []
    ref_nfe = su.reference.nfe(su.teacher.schedule)
    ref, ref_s = run(
        "reference",
        teacher_batches(
            su.teacher, su.seeds, su.reference, su.labels, su.batch_size, su.device, su.guidance, prompts=su.prompts
        ),
    )
    add("teacher reference", ref_nfe, ref_nfe, ref, ref_s, su.reference.describe(), "reference")
    for name, model in su.models.items():
        times = [float(t) for t in model.times]
        if abs(times[-1] - t_end) > 1e-9 * max(1.0, t_end):
            raise ValueError(f"{name}'s last output time {times[-1]:g} differs from the reference's {t_end:g}")
        # the sample only (frame-pruned): what one-step sampling computes, and what the row is charged
        batch, s = run(
            name,
            dsno_batches(model, su.seeds, su.labels, None, su.batch_size, su.device, frames=[-1], prompts=su.prompts),
        )
        add(
            name,
            1,
            1,
            batch,
            s,
            f"one forward pass on {len(times)} frames" if len(times) > 1 else "one forward pass",
            "model",
        )
    if target == "denoised" and 1 in su.nfes:
        batch, s = run(
            "denoiser",
            denoiser_batches(
                su.teacher, su.seeds, su.labels, su.batch_size, su.device, su.guidance, prompts=su.prompts
            ),
        )
        add("teacher x̂₀(x_T)", 1, 1, batch, s, "the teacher's one-shot denoiser", "denoiser")
    for solver in solvers:
        fixed = solver_choice(
            solver,
            su.teacher.schedule,
            su.grid or su.solver_grids.get(solver),
            su.solver_options.get(solver),
            su.fallback_grid,
        )
        for nfe in su.nfes:
            ts = _row_solver(su, solver, nfe, tuned.get((solver, nfe), fixed))
            if ts is None:
                continue
            batch, s = run(
                f"{solver} {nfe} NFE",
                teacher_batches(
                    su.teacher, su.seeds, ts, su.labels, su.batch_size, su.device, su.guidance, prompts=su.prompts
                ),
            )
            add(solver, nfe, nfe, batch, s, ts.describe(), "solver")
    meta = {
        "num": n,
        "target": target,
        "t_end": t_end,
        "reference": su.reference.describe(),
        "reference_nfe": ref_nfe,
        "grid": su.grid,
        "device": str(su.device),
        "batch_size": min(su.batch_size, n),
        "eval_seconds_per_image": eval_s,
        **su.meta,
    }
    if su.tune_seeds is not None:
        meta["tune"] = {
            "num": len(su.tune_seeds),
            "seeds": f"{min(su.tune_seeds)}-{max(su.tune_seeds)}",
            "candidates": tune_table,
        }
    return BenchResult(rows, meta)
