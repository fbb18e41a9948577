"""Noise schedules x_t = α_t x_0 + σ_t ε and solver time grids.

Every schedule is a frozen dataclass exposing ``alpha``, ``sigma``, ``log_snr`` (λ_t = log α_t/σ_t),
its inverse ``t_from_log_snr`` and ``rho`` (ρ_t = σ_t/α_t = e^{-λ_t}, EDM's σ and DEIS's ρ) on tensors.
Solvers only ever see these functions, so any schedule with α, σ > 0 works with every solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "Schedule",
    "VPLinear",
    "VPCosine",
    "DiscreteVP",
    "EDM",
    "VE",
    "GRID_KINDS",
    "time_grid",
    "schedule_from_config",
    "available_schedules",
]


def _as_tensor(t) -> Tensor:
    """Times as a tensor; Python scalars become float64 so that closed forms keep full precision."""
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


class Schedule:
    """Base class. Subclasses define ``log_alpha`` and ``log_sigma`` (or override the public functions)
    and the valid time range ``[t_min, t_max]`` (``t_max`` is where sampling starts)."""

    name: ClassVar[str] = "schedule"
    t_min: float
    t_max: float

    def log_alpha(self, t) -> Tensor:
        raise NotImplementedError

    def log_sigma(self, t) -> Tensor:
        raise NotImplementedError

    def alpha(self, t) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> Tensor:
        return torch.exp(self.log_sigma(t))

    def log_snr(self, t) -> Tensor:
        """λ_t = log(α_t / σ_t): half the log signal-to-noise ratio, decreasing in t."""
        return self.log_alpha(t) - self.log_sigma(t)

    def rho(self, t) -> Tensor:
        """ρ_t = σ_t / α_t = e^{-λ_t}: the noise level of the rescaled state x/α (EDM's σ)."""
        return torch.exp(-self.log_snr(t))

    def t_from_log_snr(self, log_snr) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """A JSON-serialisable description; ``schedule_from_config`` rebuilds the schedule from it."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}  # type: ignore[arg-type]

    def check_times(self, ts: Tensor, what: str = "time") -> None:
        """Raise ValueError if a time lies outside ``[t_min, t_max]`` (relative slack 1e-9)."""
        lo, hi = self.t_min * (1 - 1e-9), self.t_max * (1 + 1e-9)
        flat = ts.flatten()
        bad = ((flat < lo) | (flat > hi) | ~torch.isfinite(flat)).nonzero()
        if len(bad):
            i = int(bad[0, 0])
            raise ValueError(
                f"{what} {float(flat[i]):.6g} at index {i} is outside the range of the "
                f"{self.name} schedule [{self.t_min:.6g}, {self.t_max:.6g}]; choose times inside it "
                f"(or build the schedule with a wider t_min/t_max)"
            )


def _vp_log_sigma(log_alpha: Tensor) -> Tensor:
    """σ = sqrt(1 − α²) for variance-preserving schedules, computed without cancellation."""
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _vp_log_alpha_from_log_snr(log_snr: Tensor) -> Tensor:
    """For VP: α² = 1/(1 + e^{-2λ}), i.e. log α = −½ softplus(−2λ)."""
    return -0.5 * torch.nn.functional.softplus(-2.0 * log_snr)


@dataclass(frozen=True)
class VPLinear(Schedule):
    """Score-SDE linear VP: β(t) = β_min + t(β_max − β_min), log α_t = −¼t²(β_max−β_min) − ½tβ_min."""

    name: ClassVar[str] = "vp-linear"
    beta_min: float = 0.1  # β(0); the score-SDE / DDPM++ continuous value
    beta_max: float = 20.0  # β(1)
    t_min: float = 1e-3  # sampling ends here (score-SDE's ε for the linear VP)
    t_max: float = 1.0  # sampling starts here

    def log_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t) -> Tensor:
        return _vp_log_sigma(self.log_alpha(t))

    def beta(self, t) -> Tensor:
        return self.beta_min + _as_tensor(t) * (self.beta_max - self.beta_min)

    def t_from_log_snr(self, log_snr) -> Tensor:
        """Closed-form inverse (DPM-Solver's ``inverse_lambda``): solve the quadratic in t."""
        lam = _as_tensor(log_snr)
        d = self.beta_max - self.beta_min
        u = 2.0 * d * torch.nn.functional.softplus(-2.0 * lam)
        return u / ((torch.sqrt(self.beta_min**2 + u) + self.beta_min) * d)


@dataclass(frozen=True)
class VPCosine(Schedule):
    """Improved-DDPM cosine schedule: α_t = cos((t+s)/(1+s)·π/2) / cos(s/(1+s)·π/2)."""

    name: ClassVar[str] = "vp-cosine"
    s: float = 0.008  # offset that keeps β small near t = 0
    t_min: float = 1e-3
    t_max: float = 0.9946  # as DPM-Solver: beyond it α_t → 0 too fast and λ explodes

    def _log_alpha0(self) -> float:
        return math.log(math.cos(self.s / (1 + self.s) * math.pi / 2))

    def log_alpha(self, t) -> Tensor:
        t = _as_tensor(t)
        return torch.log(torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)) - self._log_alpha0()

    def log_sigma(self, t) -> Tensor:
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_log_snr(self, log_snr) -> Tensor:
        log_alpha = _vp_log_alpha_from_log_snr(_as_tensor(log_snr))
        return 2 * (1 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha0())) - self.s


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation with linear extrapolation; ``xp`` increasing."""
    x_ = x.to(xp.dtype)
    idx = torch.searchsorted(xp, x_.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    out = f0 + (x_ - x0) * (f1 - f0) / (x1 - x0)
    return out.to(x.dtype) if x.is_floating_point() else out


@dataclass(frozen=True)
class DiscreteVP(Schedule):
    """A discrete DDPM schedule (ᾱ_n for n = 0..N−1) in continuous time, as DPM-Solver does it:
    step n sits at t_n = (n+1)/N and log α_t is piecewise linear in t between steps."""

    name: ClassVar[str] = "discrete"
    log_alphas: tuple[float, ...] = field(default=(), repr=False)  # ½ log ᾱ_n, n = 0..N−1

    def __post_init__(self):
        if len(self.log_alphas) < 2:
            raise ValueError("DiscreteVP needs at least 2 steps; build it with DiscreteVP.from_betas(betas)")
        la = torch.tensor(self.log_alphas, dtype=torch.float64)
        if not bool(torch.isfinite(la).all()) or not bool((la[1:] < la[:-1]).all()) or not bool((la < 0).all()):
            raise ValueError("DiscreteVP: ᾱ_n must be strictly decreasing and below 1 (betas in (0, 1))")
        n = len(la)
        object.__setattr__(self, "_t", torch.arange(1, n + 1, dtype=torch.float64) / n)
        object.__setattr__(self, "_la", la)

    @classmethod
    def from_betas(cls, betas) -> "DiscreteVP":
        """From the betas of a DDPM checkpoint (e.g. ``torch.linspace(1e-4, 0.02, 1000)``)."""
        b = torch.as_tensor(betas, dtype=torch.float64)
        return cls(log_alphas=tuple((0.5 * torch.cumsum(torch.log1p(-b), 0)).tolist()))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod) -> "DiscreteVP":
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        return cls(log_alphas=tuple((0.5 * torch.log(ac)).tolist()))

    @property
    def num_steps(self) -> int:
        return len(self.log_alphas)

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return 1.0 / self.num_steps

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return 1.0

    def timestep(self, t) -> Tensor:
        """Continuous t → the (fractional) discrete step index n = tN − 1 the network was trained on."""
        return _as_tensor(t) * self.num_steps - 1

    def log_alpha(self, t) -> Tensor:
        return _interp(_as_tensor(t), self._t, self._la)

    def log_sigma(self, t) -> Tensor:
        return _vp_log_sigma(self.log_alpha(t))

    def t_from_log_snr(self, log_snr) -> Tensor:
        log_alpha = _vp_log_alpha_from_log_snr(_as_tensor(log_snr))
        # log α decreases in t: interpolate on the reversed (increasing) table.
        return _interp(log_alpha, self._la.flip(0), self._t.flip(0))

    def config(self) -> dict:
        return {"name": self.name, "log_alphas": list(self.log_alphas)}


@dataclass(frozen=True)
class EDM(Schedule):
    """EDM / variance-exploding: x_σ = x_0 + σ ε with time t = σ (α = 1, σ_t = t, λ = −log t)."""

    name: ClassVar[str] = "edm"
    sigma_min: float = 0.002  # EDM's sampling range
    sigma_max: float = 80.0
    sigma_data: float = 0.5  # for preconditioning in backbones; solvers do not use it

    @property
    def t_min(self) -> float:  # type: ignore[override]
        return self.sigma_min

    @property
    def t_max(self) -> float:  # type: ignore[override]
        return self.sigma_max

    def log_alpha(self, t) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def log_sigma(self, t) -> Tensor:
        return torch.log(_as_tensor(t))

    def t_from_log_snr(self, log_snr) -> Tensor:
        return torch.exp(-_as_tensor(log_snr))


@dataclass(frozen=True)
class VE(EDM):
    """Score-SDE variance-exploding schedule (NCSN++): the EDM parameterisation with σ ∈ [0.01, 50]."""

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0


_SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (VPLinear, VPCosine, DiscreteVP, EDM, VE)}


def available_schedules() -> list[str]:
    return sorted(_SCHEDULES)


def schedule_from_config(config: dict) -> Schedule:
    """Inverse of ``Schedule.config()``."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(available_schedules())}")
    cls = _SCHEDULES[name]
    valid = {f.name for f in fields(cls) if f.init}
    unknown = set(config) - valid
    if unknown:
        raise ValueError(f"unknown {name} schedule parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
    if cls is DiscreteVP:
        return DiscreteVP(log_alphas=tuple(config["log_alphas"]))
    return cls(**config)


GridKind = Literal["uniform", "quadratic", "logsnr", "edm"]
GRID_KINDS: tuple[str, ...] = ("uniform", "quadratic", "logsnr", "edm")


def time_grid(
    schedule: Schedule,
    n: int,
    kind: GridKind = "logsnr",
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """``n`` steps from ``t_start`` (default ``schedule.t_max``) down to ``t_end`` (default ``t_min``):
    n+1 strictly decreasing float64 times.

    kinds: ``uniform`` in t; ``quadratic`` (uniform in √t, DEIS/DPM ``time_quadratic``); ``logsnr``
    (uniform in λ); ``edm`` (Karras et al. eq. 5: uniform in ρ^{1/rho}, ρ = σ/α, rho = 7).
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; valid: {', '.join(GRID_KINDS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")
    t0 = float(schedule.t_max if t_start is None else t_start)
    t1 = float(schedule.t_min if t_end is None else t_end)
    schedule.check_times(torch.tensor([t0, t1], dtype=torch.float64), what="grid end point")
    if not t0 > t1:
        raise ValueError(f"t_start ({t0}) must be greater than t_end ({t1}): sampling runs from noise to data")
    i = torch.arange(n + 1, dtype=torch.float64) / n
    if kind == "uniform":
        ts = t0 + i * (t1 - t0)
    elif kind == "quadratic":
        ts = (math.sqrt(t0) + i * (math.sqrt(t1) - math.sqrt(t0))) ** 2
    elif kind == "logsnr":
        l0, l1 = schedule.log_snr(torch.tensor(t0, dtype=torch.float64)), schedule.log_snr(torch.tensor(t1, dtype=torch.float64))
        ts = schedule.t_from_log_snr(l0 + i * (l1 - l0))
    else:  # edm
        r0, r1 = float(schedule.rho(torch.tensor(t0, dtype=torch.float64))), float(schedule.rho(torch.tensor(t1, dtype=torch.float64)))
        rhos = (r0 ** (1 / rho) + i * (r1 ** (1 / rho) - r0 ** (1 / rho))) ** rho
        ts = schedule.t_from_log_snr(-torch.log(rhos))
    ts = ts.to(torch.float64)
    ts[0], ts[-1] = t0, t1  # pin the end points exactly (no round trip through λ)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{kind} grid with {n} steps on [{t1}, {t0}] is not strictly decreasing; use fewer steps")
    return ts
