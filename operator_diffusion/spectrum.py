"""Temporal power spectrum of probability-flow ODE trajectories (DSNO paper, Appendix A.1).

Why DSNO keeps few Fourier modes: a trajectory x(t) sampled at N uniform times t_i with spacing Δ
(period T = NΔ) has the discrete Fourier transform (eq. 12) and power spectrum (eq. 13)

    X_j = Σ_{i=0}^{N−1} x(t_i) e^{−2πi·ji/N},        S_j = (2Δ²/T) X_j X_j^*,   j = 0 … ⌊N/2⌋,

at frequency j/T; S is averaged over pixels, channels and trajectories (with the min/max over
trajectories as a band). The paper indexes i = 1 … N; the shift by one sample only multiplies X_j by a
phase, so S_j is the same. The mean over time is *not* removed: mode 0 is the time-average of the
trajectory, the first mode a DSNO temporal layer keeps, so "J modes" here means rfft modes 0 … J−1,
exactly what ``--modes J`` keeps.

Energy: with the weights w_j = ½ at j = 0 and at j = N/2 (N even), else 1 (eq. 13's factor 2 counts
the mirrored negative frequency, which modes 0 and N/2 do not have), Parseval gives exactly

    Σ_j w_j S_j = Δ Σ_i x(t_i)²,

so ``energy_fraction[J−1]`` = Σ_{j<J} w_j S̄_j / Σ_j w_j S̄_j is the share of Σ_i x(t_i)² that the
first J modes hold, and 1 − energy_fraction[J−1] is the relative squared L2 error of truncating every
trajectory to those J modes.

    traj = dense_trajectories(backbone.eps_fn, backbone.schedule, x_T, n_points=1000)
    spec = power_spectrum(traj.values, traj.dt)
    modes_for_energy(spec, 0.99)       # the recommended --modes for training
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .oracles import GaussianMixtureOracle, GaussianOracle
from .schedules import Schedule, VPLinear, time_grid
from .solvers import solve
from .solvers.base import EpsFn

__all__ = [
    "WHAT",
    "ORACLE_KINDS",
    "REPORT_FILES",
    "PowerSpectrum",
    "Trajectories",
    "energy_weights",
    "per_trajectory_spectrum",
    "spectrum_from_per_trajectory",
    "power_spectrum",
    "modes_for_energy",
    "uniform_times",
    "refine_grid",
    "dense_trajectories",
    "exact_trajectories",
    "toy_oracle",
    "sample_prior",
    "check_spectrum_size",
    "report_paths",
    "spectrum_report",
]

What = Literal["state", "denoised"]
WHAT: tuple[str, ...] = ("state", "denoised")
ORACLE_KINDS: tuple[str, ...] = ("gaussian", "mixture")
REPORT_FILES: tuple[str, ...] = ("spectrum.csv", "spectrum.json", "spectrum.png")
Oracle = GaussianOracle | GaussianMixtureOracle


# --------------------------------------------------------------------------------------------------
# The spectrum (eqs. 12–13)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerSpectrum:
    """S_j of eq. 13 for the rfft modes j = 0 … ⌊N/2⌋ (all tensors float64 on the CPU).

    ``frequencies``: j/T, T = NΔ; ``mean``: S̄_j averaged over coordinates and trajectories;
    ``min``/``max``: over trajectories, each first averaged over its coordinates; ``energy_fraction``:
    cumulative share of the energy in modes 0 … j (see the module docstring); ``per_trajectory``: (N_traj, J).
    """

    frequencies: Tensor
    mean: Tensor
    min: Tensor
    max: Tensor
    energy_fraction: Tensor
    per_trajectory: Tensor
    dt: float
    n_points: int

    @property
    def period(self) -> float:
        """T = NΔ, the period of the periodic extension the DFT assumes."""
        return self.n_points * self.dt

    @property
    def num_modes(self) -> int:
        return len(self.mean)

    @property
    def num_trajectories(self) -> int:
        return len(self.per_trajectory)


def energy_weights(n_points: int) -> Tensor:
    """w_j: 1, but ½ at j = 0 and at the Nyquist mode j = N/2 (N even), so that Σ_j w_j S_j = Δ Σ_i x_i²."""
    w = torch.ones(n_points // 2 + 1, dtype=torch.float64)
    w[0] = 0.5
    if n_points % 2 == 0:
        w[-1] = 0.5
    return w


def per_trajectory_spectrum(trajectories: Tensor, dt: float) -> Tensor:
    """S_j = (2Δ²/T)|X_j|² (eq. 13, T = NΔ) averaged over the coordinates of each trajectory.

    ``trajectories``: (N_traj, N, ...) at N uniform times with spacing ``dt``; returns (N_traj, ⌊N/2⌋+1)
    float64 on the CPU. The FFT runs in float64 on the input's device."""
    if trajectories.dim() < 2:
        raise ValueError(
            f"trajectories must have shape (num_trajectories, num_times, ...), got {tuple(trajectories.shape)}"
        )
    n_traj, n = trajectories.shape[:2]
    if n < 2:
        raise ValueError(f"a spectrum needs at least 2 time points, got {n}")
    if not (math.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive time step, got {dt!r}")
    x = trajectories.detach().to(torch.float64).reshape(n_traj, n, -1)  # (N_traj, N, D)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("trajectories contain NaN/Inf: the teacher diverged; check the model and the solver")
    power = torch.fft.rfft(x, dim=1).abs().pow(2).mean(2)  # (N_traj, J): |X_j|² averaged over coordinates
    return (2 * dt**2 / (n * dt) * power).cpu()


def spectrum_from_per_trajectory(per_trajectory: Tensor, dt: float, n_points: int) -> PowerSpectrum:
    """Summarise (N_traj, J) per-trajectory spectra (e.g. concatenated over batches) into a PowerSpectrum."""
    s = torch.as_tensor(per_trajectory, dtype=torch.float64)
    if s.dim() != 2 or s.shape[1] != n_points // 2 + 1 or len(s) == 0:
        raise ValueError(
            f"per_trajectory must have shape (num_trajectories ≥ 1, {n_points // 2 + 1}), got {tuple(s.shape)}"
        )
    mean = s.mean(0)
    energy = torch.cumsum(energy_weights(n_points) * mean, 0)
    if not float(energy[-1]) > 0:
        raise ValueError("the trajectories carry no energy (all zero): there is no spectrum to normalise")
    return PowerSpectrum(
        frequencies=torch.arange(len(mean), dtype=torch.float64) / (n_points * dt),
        mean=mean,
        min=s.min(0).values,
        max=s.max(0).values,
        energy_fraction=energy / energy[-1],
        per_trajectory=s,
        dt=float(dt),
        n_points=int(n_points),
    )


def power_spectrum(trajectories: Tensor, dt: float) -> PowerSpectrum:
    """Appendix A.1's spectrum of ``trajectories`` (N_traj, N, ...) sampled every ``dt`` (eqs. 12–13)."""
    return spectrum_from_per_trajectory(per_trajectory_spectrum(trajectories, dt), dt, trajectories.shape[1])


def modes_for_energy(spectrum: PowerSpectrum, fraction: float = 0.99) -> int:
    """The smallest J such that rfft modes 0 … J−1 hold ``fraction`` of the energy (relative slack 1e-12,
    so that a spectrum built to hold exactly that fraction is not missed by round-off)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction!r}")
    reached = spectrum.energy_fraction >= fraction * (1 - 1e-12)
    return int(torch.nonzero(reached)[0, 0]) + 1


# --------------------------------------------------------------------------------------------------
# Dense trajectories
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectories:
    """``values``: (N_traj, n_points, ...) at ``times`` (n_points, float64, from t_max down to t_min, uniform);
    ``what``: "state" (x(t)) or "denoised" (x̂_0(x(t), t)); ``nfe``: network evaluations spent (0 if exact)."""

    times: Tensor
    values: Tensor
    what: str
    nfe: int

    @property
    def dt(self) -> float:
        """Δ, the (uniform) spacing of ``times``."""
        return float(self.times[0] - self.times[-1]) / (len(self.times) - 1)


def uniform_times(
    schedule: Schedule, n_points: int, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """n_points uniform times from ``t_start`` (default t_max) down to ``t_end`` (default t_min), float64."""
    if not isinstance(n_points, int) or n_points < 2:
        raise ValueError(f"n_points must be an integer ≥ 2, got {n_points!r}")
    return time_grid(schedule, n_points - 1, "uniform", t_start, t_end)


def refine_grid(schedule: Schedule, ts: Tensor, steps_per_interval: int) -> Tensor:
    """Split every interval of ``ts`` into ``steps_per_interval`` steps uniform in log-SNR λ (the variable in
    which the solvers' integrands are smooth); the original times stay exact, at indices multiple of it."""
    if not isinstance(steps_per_interval, int) or steps_per_interval < 1:
        raise ValueError(f"steps_per_interval must be an integer ≥ 1, got {steps_per_interval!r}")
    ts = torch.as_tensor(ts, dtype=torch.float64)
    if steps_per_interval == 1:
        return ts
    lam = schedule.log_snr(ts)
    u = torch.arange(steps_per_interval, dtype=torch.float64) / steps_per_interval
    fine = schedule.t_from_log_snr(lam[:-1, None] + u * (lam[1:] - lam[:-1])[:, None])  # (n−1, k)
    fine[:, 0] = ts[:-1]  # pin the coarse times exactly
    return torch.cat([fine.reshape(-1), ts[-1:]])


def _check_what(what: str) -> None:
    if what not in WHAT:
        raise ValueError(f"unknown trajectory quantity {what!r}; valid: {', '.join(WHAT)}")


def dense_trajectories(
    eps_fn: EpsFn,
    schedule: Schedule,
    x_T: Tensor,
    n_points: int = 1000,  # Appendix A.1 samples at 1000 Hz over T = 1, enough to avoid aliasing
    solver: str = "deis",  # tAB-DEIS order 3: third order with exact coefficients
    steps_per_interval: int = 1,  # solver steps between two consecutive output times
    extra_args: dict[str, Any] | None = None,
    what: What = "state",
    **solver_options,
) -> Trajectories:
    """The teacher's PF-ODE trajectories from ``x_T`` at ``n_points`` uniform times t_max → t_min, solved by
    opdiff's ``solve(..., record=...)`` on the uniform grid refined by ``refine_grid``."""
    _check_what(what)
    times = uniform_times(schedule, n_points)
    grid = refine_grid(schedule, times, steps_per_interval)
    record = list(range(0, len(grid), steps_per_interval))
    out = solve(
        eps_fn,
        x_T,
        schedule,
        grid,
        solver,
        extra_args=extra_args,
        record=record,
        record_denoised=what == "denoised",
        **solver_options,
    )
    values = out.states if what == "state" else out.denoised
    return Trajectories(times, values, what, out.nfe)


def exact_trajectories(oracle: Oracle, x_T: Tensor, n_points: int = 1000, what: What = "state") -> Trajectories:
    """The exact teacher: ``GaussianOracle``'s closed-form flow, or ``GaussianMixtureOracle``'s float64
    DOP853 reference flow, at ``n_points`` uniform times t_max → t_min (float64)."""
    _check_what(what)
    times = uniform_times(oracle.schedule, n_points)
    x_T = x_T.to(torch.float64)
    if isinstance(oracle, GaussianOracle):
        states = torch.stack([oracle.flow(x_T, float(times[0]), float(t)) for t in times], 1)  # (B, n, ...)
    elif isinstance(oracle, GaussianMixtureOracle):
        states = oracle.flow(x_T, times).transpose(0, 1)  # (n, B, ...) -> (B, n, ...)
    else:
        raise TypeError(
            f"exact trajectories need a GaussianOracle or GaussianMixtureOracle, got {type(oracle).__name__}"
        )
    if what == "state":
        return Trajectories(times, states, what, 0)
    b = len(x_T)
    flat = states.reshape(b * n_points, *x_T.shape[1:])  # (B, n, ...) -> (B·n, ...)
    denoised = oracle.denoise(flat, times.repeat(b)).reshape(states.shape)
    return Trajectories(times, denoised, what, 0)


def toy_oracle(kind: str, dim: int, seed: int = 0, schedule: Schedule | None = None) -> Oracle:
    """The exact teachers of ``opdiff spectrum --oracle``, drawn from ``seed``, in ``dim`` dimensions, with
    data on the scale of images in [−1, 1]:

    ``gaussian``: N(μ, diag s²), μ_d ~ U(−0.5, 0.5), s_d ~ U(0.1, 0.5);
    ``mixture``: 8 components, weights ~ U(0.5, 1.5), means ~ U(−1, 1)^dim, isotropic stds ~ U(0.05, 0.2)."""
    if kind not in ORACLE_KINDS:
        raise ValueError(f"unknown oracle {kind!r}; valid: {', '.join(ORACLE_KINDS)}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"oracle dimension must be a positive integer, got {dim!r}")
    schedule = VPLinear() if schedule is None else schedule
    g = torch.Generator().manual_seed(seed)

    def u(lo: float, hi: float, *shape: int) -> Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float64)

    if kind == "gaussian":
        return GaussianOracle(schedule, mean=u(-0.5, 0.5, dim), std=u(0.1, 0.5, dim))
    k = 8
    return GaussianMixtureOracle(schedule, weights=u(0.5, 1.5, k), means=u(-1.0, 1.0, k, dim), stds=u(0.05, 0.2, k))


def sample_prior(oracle: Oracle, n: int, generator: torch.Generator | None = None) -> Tensor:
    """n exact samples of the oracle's marginal at t_max: x_T = α_T x_0 + σ_T z, x_0 ~ data (float64)."""
    t = torch.tensor(oracle.schedule.t_max, dtype=torch.float64)
    x0 = oracle.sample(n, generator=generator)
    z = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
    return oracle.schedule.alpha(t) * x0 + oracle.schedule.sigma(t) * z


GRID_COPIES = 4  # float64 arrays of the refined grid's times alive while it is built (λ, u, the fine grid, the cat)


def check_spectrum_size(
    num: int,
    points: int,
    batch: int,
    steps_per_interval: int,
    values: int | None,
    itemsize: int,
    values_flag: str | None = None,
) -> None:
    """Bound the size inputs of a spectrum by the memory available, before anything is drawn or solved (ValueError
    naming the flags; issue 16, item 15). Lower bounds: the refined solver grid (float64 times), the x_T draws
    (``num`` × ``values`` of ``itemsize`` bytes), one batch of trajectories (``points`` states each, with the
    float64 copy the FFT takes) and the per-trajectory spectra (``num`` × (``points``//2 + 1) float64).
    ``values``: the numbers in one state (None: not known yet, counted as 1, a bound that holds for any teacher);
    ``values_flag``: the flag that sets it, if any (``--dim`` of an oracle)."""
    from .resources import check_memory

    v = values or 1
    each = f" of {v:,} values each" if values else " even at one value each"
    more = f" or {values_flag}" if values_flag else ""
    grid = (points - 1) * steps_per_interval + 1
    check_memory(
        grid * 8 * GRID_COPIES,
        f"--points {points} × --steps-per-interval {steps_per_interval} (a solver grid of {grid:,} times)",
        "lower --points or --steps-per-interval",
    )
    check_memory(num * v * itemsize, f"--num {num} (its x_T draws{each})", f"lower --num{more}")
    check_memory(
        min(batch, num) * points * v * (itemsize + 8),
        f"--batch {batch} × --points {points} (one batch of trajectories{each})",
        f"lower --batch or --points{more}",
    )
    check_memory(
        num * (points // 2 + 1) * 8, f"--num {num} × --points {points} (the spectra)", "lower --num or --points"
    )


# --------------------------------------------------------------------------------------------------
# Report: CSV, JSON and PNG
# --------------------------------------------------------------------------------------------------
def report_paths(out_dir: str | Path) -> dict[str, Path]:
    """The files ``spectrum_report`` writes into ``out_dir``, by name."""
    return {name: Path(out_dir) / name for name in REPORT_FILES}


def _summary(spectrum: PowerSpectrum, energy: float) -> dict[str, Any]:
    return {
        "format": "opdiff-spectrum/1",
        "definition": "S_j = (2 dt^2 / T) |X_j|^2, X_j = sum_i x(t_i) exp(-2 pi i j i / N), T = N dt "
        "(DSNO Appendix A.1, eqs. 12-13); mean not removed; energy of mode j = w_j S_j, "
        "w_0 = w_{N/2} = 1/2, else 1",
        "n_points": spectrum.n_points,
        "dt": spectrum.dt,
        "period": spectrum.period,
        "num_trajectories": spectrum.num_trajectories,
        "energy": energy,
        "recommended_modes": modes_for_energy(spectrum, energy),
        "modes_for_energy": {str(f): modes_for_energy(spectrum, f) for f in (0.9, 0.99, 0.999)},
    }


def spectrum_report(
    spectrum: PowerSpectrum,
    out_dir: str | Path,
    energy: float = 0.99,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_plot_modes: int | None = None,
) -> dict[str, Path]:
    """Write spectrum.csv (one row per mode), spectrum.json (summary, ``metadata`` and the arrays) and
    spectrum.png (mean S_j with the min/max band, and the energy left outside J modes) into ``out_dir``.

    Refuses (FileExistsError, before writing anything) to replace existing files unless ``overwrite``."""
    paths = report_paths(out_dir)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); pass overwrite=True to replace")
    paths["spectrum.csv"].parent.mkdir(parents=True, exist_ok=True)
    columns = {
        "mode": torch.arange(spectrum.num_modes),
        "frequency": spectrum.frequencies,
        "mean": spectrum.mean,
        "min": spectrum.min,
        "max": spectrum.max,
        "energy_fraction": spectrum.energy_fraction,
    }
    with paths["spectrum.csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        writer.writerows(zip(*(c.tolist() for c in columns.values())))
    summary = _summary(spectrum, energy)
    doc = {**summary, "metadata": metadata or {}, **{k: v.tolist() for k, v in columns.items() if k != "mode"}}
    paths["spectrum.json"].write_text(json.dumps(doc, indent=2) + "\n")
    _plot(spectrum, summary["recommended_modes"], energy, paths["spectrum.png"], max_plot_modes)
    return paths


def _plot(spectrum: PowerSpectrum, modes: int, energy: float, path: Path, max_modes: int | None) -> None:
    """Two panels: mean S_j (log) with the min/max band over trajectories, and 1 − energy_fraction (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(spectrum.num_modes, max_modes or max(32, 4 * modes))
    j = torch.arange(shown).numpy()
    tiny = torch.finfo(torch.float64).tiny

    def positive(v: Tensor):
        return v[:shown].clamp_min(tiny).numpy()

    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_s.fill_between(j, positive(spectrum.min), positive(spectrum.max), alpha=0.3, label="min–max over trajectories")
    ax_s.plot(j, positive(spectrum.mean), marker=".", label="mean")
    ax_s.set(
        yscale="log",
        xlabel=f"frequency mode j (frequency j/T, T = {spectrum.period:.4g})",
        ylabel="power $S_j$",
        title=f"power spectrum ({spectrum.num_trajectories} trajectories, N = {spectrum.n_points})",
    )
    ax_s.legend()
    left = (1 - spectrum.energy_fraction[:shown]).clamp_min(1e-16).numpy()
    ax_e.plot(j + 1, left, marker=".")
    ax_e.axhline(1 - energy, color="gray", linestyle="--", label=f"1 − {energy:g}")
    ax_e.axvline(modes, color="red", linestyle=":", label=f"recommended --modes {modes}")
    ax_e.set(
        yscale="log",
        xlabel="modes kept J (rfft modes 0 … J−1)",
        ylabel="energy outside the first J modes",
        title="energy not captured by J modes",
    )
    ax_e.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
