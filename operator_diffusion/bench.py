"""`opdiff bench`: DSNO Table 1 for the user's own teacher — how close one-NFE DSNO, the one-step baseline
and the training-free solvers at k NFE come to the teacher's reference solution on held-out seeds.

Every method estimates the same quantity for each seed: the collection's training target at DSNO's last
time t_M (the teacher's x̂_0(x(t_M), t_M) for ``target=denoised``, the state x(t_M) for ``target=state``),
x_T drawn by the collection's noise rule. A solver's NFE count is the solvers' own (``SolveResult.nfe``), so
with a denoised target it includes the final x̂_0 evaluation (DPM-Solver's ``denoise_to_zero``); at 1 NFE
that leaves no step, and the row is the teacher's one-shot denoiser x̂_0(x_T, T).

Teacher-match error (the paper's "teacher" comparison): on images clipped to [-1, 1],
RMSE = √(mean over seeds, channels and pixels of (x − x_ref)²) and PSNR = 10 log10(2² / MSE) dB (peak-to-peak
range 2). FID against a reference image set when one is given (``operator_diffusion.fid``).

A PSLD teacher: x_T is the phase-space z_T, every method's image is the data (x) part, and the solvers are the
deterministic PSLD integrators (``PSLD_DEFAULT_SOLVERS`` by default; a stochastic one is refused).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .sampling import SampleBatch, TeacherSolver, collect_batches, dsno_batches, teacher_batches

DEFAULT_SOLVERS = ("ddim", "deis", "dpmpp-2m", "unipc")
# PSLD teachers: the deterministic PSLD integrators from the plain to the most accurate (docs/benchmarks.md, "psld")
PSLD_DEFAULT_SOLVERS = ("euler", "lambda-ddim", "rse", "csps-d")
DEFAULT_NFES = (1, 2, 3, 5, 10, 20)
PSNR_RANGE = 2.0  # images in [-1, 1]


@dataclass
class BenchRow:
    method: str
    nfe: int
    rmse: float
    psnr: float
    seconds: float
    images_per_s: float
    fid: float | None = None
    detail: str = ""


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

    def report(self) -> str:
        """The table with a header saying what was compared, on which machine, and how to reproduce it."""
        m = self.meta
        lines = [
            f"Teacher-match error on {m['num']} held-out seeds ({m.get('seeds', '?')}) against the teacher's reference "
            f"solution ({m['reference']}, {m['reference_nfe']} NFE); each method estimates the collection's "
            f"`{m['target']}` target at t = {m['t_end']:.4g}; solvers on the `{m['grid']}` grid. RMSE on images in "
            "[-1, 1]; PSNR with peak-to-peak 2.",
        ]
        if m.get("fid"):
            lines.append(f"FID against {m['fid']['reference']} ({m['fid']['n_reference']} images, features {m['fid']['extractor']}).")
        if m.get("command"):
            lines.append(f"Command: `{m['command']}`")
        if m.get("machine"):
            lines.append(f"Machine: {m['machine']}; device {m['device']}.")
        return "\n\n".join(lines) + "\n\n" + self.to_markdown()

    def to_markdown(self) -> str:
        has_fid = any(r.fid is not None for r in self.rows)
        head = "| method | NFE | RMSE ↓ | PSNR (dB) ↑ |" + (" FID ↓ |" if has_fid else "") + " seconds | images/s | detail |"
        sep = "|---|---:|---:|---:|" + ("---:|" if has_fid else "") + "---:|---:|---|"
        lines = [head, sep]
        for r in self.rows:
            fid = (f" {r.fid:.3f} |" if r.fid is not None else " – |") if has_fid else ""
            psnr = "∞" if math.isinf(r.psnr) else f"{r.psnr:.2f}"
            lines.append(f"| {r.method} | {r.nfe} | {r.rmse:.5f} | {psnr} |{fid} {r.seconds:.2f} | {r.images_per_s:.1f} | {r.detail} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------
def teacher_match(x: Tensor, reference: Tensor) -> tuple[float, float]:
    """(RMSE, PSNR in dB) of images ``x`` against ``reference``, both clipped to [-1, 1] (module docstring)."""
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(reference.shape)}")
    err = x.double().clamp(-1, 1) - reference.double().clamp(-1, 1)
    mse = float(err.square().mean())
    psnr = math.inf if mse == 0 else 10.0 * math.log10(PSNR_RANGE**2 / mse)
    return math.sqrt(mse), psnr


def steps_for_nfe(schedule, solver: str, nfe: int, grid: str, t_end: float, target: str, options: dict | None = None) -> int | None:
    """The number of steps at which ``solver`` spends exactly ``nfe`` evaluations (None if no count does)."""
    for steps in range(1, nfe + 1):
        spend = TeacherSolver(solver, steps, grid, t_end, target, dict(options or {})).nfe(schedule)
        if spend == nfe:
            return steps
        if spend > nfe:
            return None
    return None


def default_solvers(schedule) -> tuple[str, ...]:
    """The solvers a bench compares by default: ``DEFAULT_SOLVERS``, or ``PSLD_DEFAULT_SOLVERS`` for a PSLD teacher."""
    from .schedules import PSLD

    return PSLD_DEFAULT_SOLVERS if isinstance(schedule, PSLD) else DEFAULT_SOLVERS


def denoiser_batches(backbone, seeds: Sequence[int], labels, batch_size: int, device, guidance: float | None = None) -> Any:
    """The teacher's one-shot x̂_0(x_T, t_max) (1 NFE), as (B, 1, C, H, W) batches (PSLD: from z_T, C channels)."""
    from .prediction import denoised_from_eps
    from .sampling import seed_inputs
    from .trajectories import Teacher

    teacher = Teacher.from_backbone(backbone, guidance, device)
    t = torch.tensor(teacher.schedule.t_max, dtype=torch.float64)
    for chunk, x, y in seed_inputs(seeds, backbone, labels, batch_size, device):
        tt = t.to(device).expand(len(chunk))
        extra = {} if y is None else {"labels": y}
        with torch.inference_mode():
            x0 = denoised_from_eps(teacher.eps_fn(x, tt, **extra), x, tt, teacher.schedule)
        yield SampleBatch(chunk, None if y is None else y.cpu(), x0[:, None].float().cpu(), [float(t)])


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------
@dataclass
class BenchSetup:
    """What `run_bench` compares; ``fid`` is a callable pixels → FID (None: no FID column)."""

    teacher: Any                          # Backbone
    reference: TeacherSolver
    seeds: list[int]
    labels: Any = None
    solvers: Sequence[str] | None = None   # None: default_solvers(teacher.schedule)
    nfes: Sequence[int] = DEFAULT_NFES
    grid: str = "quadratic"
    models: dict[str, Any] = field(default_factory=dict)   # name -> DSNO (1 forward pass each)
    fid: Callable[[Any], float] | None = None
    batch_size: int = 256
    device: str = "cpu"
    guidance: float | None = None


def _sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if str(device).startswith("cuda") else None


def run_bench(setup: BenchSetup, progress: Callable[[str, int, int], None] | None = None) -> BenchResult:
    """Reference solution, then each model, the one-shot denoiser and each solver at each NFE; one row each."""
    from .images import to_uint8

    su, n = setup, len(setup.seeds)
    sync = _sync(su.device)
    target, t_end = su.reference.target, su.reference.t_end

    def run(label: str, batches) -> tuple[SampleBatch, float]:
        return collect_batches(batches, n, None if progress is None else (lambda d, t: progress(label, d, t)), sync)

    def add(method: str, nfe: int, batch: SampleBatch, seconds: float, detail: str) -> None:
        x = batch.outputs[:, -1]
        rmse, psnr = teacher_match(x, ref.outputs[:, -1])
        fid = None if su.fid is None else float(su.fid(to_uint8(x)))
        rows.append(BenchRow(method, nfe, rmse, psnr, seconds, n / seconds, fid, detail))

    rows: list[BenchRow] = []
    ref_nfe = su.reference.nfe(su.teacher.schedule)
    ref, ref_s = run("reference", teacher_batches(su.teacher, su.seeds, su.reference, su.labels, su.batch_size, su.device, su.guidance))
    add("teacher reference", ref_nfe, ref, ref_s, su.reference.describe())
    for name, model in su.models.items():
        times = [float(t) for t in model.times]
        if abs(times[-1] - t_end) > 1e-9 * max(1.0, t_end):
            raise ValueError(f"{name}'s last output time {times[-1]:g} differs from the reference's {t_end:g}")
        batch, s = run(name, dsno_batches(model, su.seeds, su.labels, None, su.batch_size, su.device))
        add(name, 1, batch, s, f"one forward pass on {len(times)} frames" if len(times) > 1 else "one forward pass")
    if target == "denoised" and 1 in su.nfes:
        batch, s = run("denoiser", denoiser_batches(su.teacher, su.seeds, su.labels, su.batch_size, su.device, su.guidance))
        add("teacher x̂₀(x_T)", 1, batch, s, "the teacher's one-shot denoiser")
    for solver in default_solvers(su.teacher.schedule) if su.solvers is None else su.solvers:
        for nfe in su.nfes:
            steps = steps_for_nfe(su.teacher.schedule, solver, nfe, su.grid, t_end, target)
            if steps is None:
                continue
            ts = TeacherSolver(solver, steps, su.grid, t_end, target)
            batch, s = run(f"{solver} {nfe} NFE", teacher_batches(su.teacher, su.seeds, ts, su.labels, su.batch_size, su.device, su.guidance))
            add(solver, nfe, batch, s, ts.describe())
    return BenchResult(rows, {"num": n, "target": target, "t_end": t_end, "reference": su.reference.describe(),
                              "reference_nfe": ref_nfe, "grid": su.grid, "device": str(su.device)})
