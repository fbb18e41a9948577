"""Noise schedules x_t = α_t x_0 + σ_t ε and solver time grids.

Every schedule is a frozen dataclass exposing ``alpha``, ``sigma``, ``log_snr`` (λ_t = log α_t/σ_t),
its inverse ``t_from_log_snr`` and ``rho`` (ρ_t = σ_t/α_t = e^{-λ_t}, EDM's σ and DEIS's ρ) on tensors.
Solvers only ever see these functions, so any schedule with α, σ > 0 works with every solver.

``PSLD`` (Phase Space Langevin Diffusion) is the one process here that is not an α/σ schedule: a
linear SDE on (data, momentum) with 2×2 closed forms for its mean map and covariance. It shares the
time range, ``config()`` and ``check_times`` (``DiffusionProcess``) and has its own solvers.

Every process answers the questions the pipeline asks of it, so no caller checks its type: its prior draw
x_T (``prior``, with the per-seed ``noise_rule`` recorded in collections), its state channels and data part,
the data channel's log-SNR (loss weights), the solver family and defaults its trajectories are solved with,
the grids it takes, the training-time distribution of its teacher (``training_times``), and the U-Net
conditioning c_in and c_noise (EDM's preconditioning, Karras et al. 2022, Table 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

__all__ = [
    "DiffusionProcess",
    "Schedule",
    "VPLinear",
    "VPCosine",
    "DiscreteVP",
    "EDM",
    "VE",
    "PSLD",
    "split",
    "join",
    "apply2",
    "per_item",
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


class DiffusionProcess:
    """What every forward process shares: a registered ``name``, the sampling time range
    ``[t_min, t_max]`` (``t_max`` is where sampling starts), ``config()`` and ``check_times``, and the
    questions callers ask instead of checking the type (the module docstring).
    ``Schedule`` (x_t = α_t x_0 + σ_t ε) and ``PSLD`` (phase space, not an α/σ process) derive from it."""

    name: ClassVar[str] = "process"
    t_min: float
    t_max: float
    # The solver registry its trajectories are solved with (``solvers.available_solvers``) and the grids it takes.
    solver_family: ClassVar[str] = "alpha-sigma"
    grid_kinds: ClassVar[tuple[str, ...]] = ("uniform", "quadratic", "logsnr", "edm")
    predictions: ClassVar[tuple[str, ...]] = ("eps", "x0", "v")  # what a network on it may predict
    predictions_why: ClassVar[str] = ""  # why only those (in the refusal of another)
    # Collection defaults (docs/collect.md) and the solvers a bench compares by default (docs/bench.md).
    default_solver: ClassVar[str] = "unipc"
    default_steps: ClassVar[int] = 49
    default_solver_options: ClassVar[tuple[tuple[str, Any], ...]] = ()
    bench_solvers: ClassVar[tuple[str, ...]] = ("ddim", "deis", "dpmpp-2m", "unipc")

    def state_channels(self, channels: int) -> int:
        """Channels of the state the network sees for data of ``channels`` channels."""
        return channels

    def data_part(self, z: Tensor, dim: int = 1) -> Tensor:
        """The data channels of states ``z`` (channels along ``dim``): the state itself for an α/σ process."""
        return z

    def prior(self, shape, generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> Tensor:
        """A draw x_T of the prior for data of ``shape`` (B, C, ...), returned in the state's shape."""
        raise NotImplementedError

    def noise_rule(self) -> str:
        """How ``prior`` draws example seed s's x_T (recorded in every collection's identity)."""
        raise NotImplementedError

    def prior_config(self) -> dict:
        """What the prior draw depends on: two processes with equal ``prior_config`` draw the same x_T per seed
        (a DSNO student draws its x_T by its own process, so it must equal its teacher's)."""
        raise NotImplementedError

    def data_log_snr(self, t) -> Tensor:
        """λ(t) = log α/σ of the data channel (DSNO's sqrt-SNR loss weight is e^λ)."""
        raise NotImplementedError

    def training_times(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n float32 training times of a denoising teacher on this process: uniform on [t_min, t_max]."""
        u = torch.rand(n, device=device, generator=generator)
        return float(self.t_min) + (float(self.t_max) - float(self.t_min)) * u

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


class Schedule(DiffusionProcess):
    """Base class of the α/σ schedules. Subclasses define ``log_alpha`` and ``log_sigma`` (or override the
    public functions) and the valid time range ``[t_min, t_max]`` (``t_max`` is where sampling starts)."""

    name: ClassVar[str] = "schedule"
    sigma_data: ClassVar[float] = 1.0  # the data std c_in assumes (EDM and VE set 0.5)

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

    # ---- what callers ask (DiffusionProcess) -------------------------------------------------------
    @property
    def prior_std(self) -> float:
        """The standard deviation of the prior draw x_T: 1 for VP (α² + σ² = 1, the marginal at t_max of
        unit-variance data), σ_max for VE/EDM (Karras et al. 2022, Alg. 1; score-SDE's VE sampler)."""
        return 1.0

    def prior(self, shape, generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> Tensor:
        """x_T = ``prior_std`` · N(0, I) of ``shape`` (B, C, ...)."""
        return torch.randn(*shape, generator=generator, dtype=dtype, device=device) * self.prior_std

    def prior_config(self) -> dict:
        return {"prior": "gaussian", "std": self.prior_std}

    def noise_rule(self) -> str:
        draw = "torch.randn(C, H, W, generator=torch.Generator().manual_seed(seed))"
        scale = "" if self.prior_std == 1.0 else f"{self.prior_std!r} * "
        return f"x_T = {scale}{draw} on CPU, float32; then label"

    def data_log_snr(self, t) -> Tensor:
        return self.log_snr(t)

    def denoise(self, x: Tensor, eps: Tensor, t) -> Tensor:
        """Tweedie / DDIM data prediction x̂_0 = (x_t − σ_t ε̂)/α_t (``t`` broadcast over x's trailing dims)."""
        a, s = (per_item(f(t), x) for f in (self.alpha, self.sigma))
        return (x - s * eps) / a

    def perturb(self, x0: Tensor, t, eps: Tensor) -> Tensor:
        """x_t = α_t x_0 + σ_t ε (the forward marginal's reparameterisation)."""
        a, s = (per_item(f(t), x0) for f in (self.alpha, self.sigma))
        return a * x0 + s * eps

    def c_in(self, t) -> Tensor:
        """The network input scale c_in(t) = 1/√(σ_data² α_t² + σ_t²) (EDM's, for data of std ``sigma_data``)."""
        return torch.rsqrt(self.sigma_data**2 * self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def c_noise(self, t) -> Tensor:
        """The time embedding's input c_noise(t): EDM's ¼ log ρ_t = −¼ λ_t (VP schedules override it)."""
        return -0.25 * self.log_snr(t)


def per_item(v: Tensor, x: Tensor) -> Tensor:
    """A per-item coefficient (B,) or scalar, shaped to broadcast over ``x`` (B, ...) in x's dtype."""
    v = _as_tensor(v).to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim())) if v.dim() else v


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

    def c_noise(self, t) -> Tensor:
        """1000 t, the score-SDE / DDPM++ time conditioning of continuous VP models."""
        return 1000.0 * _as_tensor(t)

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

    def c_noise(self, t) -> Tensor:
        """1000 t, as ``VPLinear``."""
        return 1000.0 * _as_tensor(t)

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

    def c_noise(self, t) -> Tensor:
        """The discrete step index (``timestep``), what DDPM networks are conditioned on."""
        return self.timestep(t)

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
    # v = α ε − σ x_0 is defined for variance-preserving schedules (ε̂ = σ x + α v̂ needs α² + σ² = 1)
    predictions: ClassVar[tuple[str, ...]] = ("eps", "x0")
    predictions_why: ClassVar[str] = (
        "v-prediction needs a variance-preserving schedule (α² + σ² = 1); VE and EDM are not"
    )
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

    @property
    def prior_std(self) -> float:
        return float(self.sigma_max)

    # EDM's training distribution: ln σ ~ N(P_mean, P_std²) (Karras et al. 2022, Table 1)
    p_mean: ClassVar[float] = -1.2
    p_std: ClassVar[float] = 1.2

    def training_times(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """σ = exp(P_mean + P_std·n), n ~ N(0, 1) (EDM's log-normal), clamped to [σ_min, σ_max] (the clamp
        moves about 1.7e-5 of the draws onto the ends with EDM's defaults)."""
        z = torch.randn(n, device=device, generator=generator)
        return torch.exp(self.p_mean + self.p_std * z).clamp(float(self.sigma_min), float(self.sigma_max))


@dataclass(frozen=True)
class VE(EDM):
    """Score-SDE variance-exploding schedule (NCSN++): the EDM parameterisation with σ ∈ [0.01, 50]."""

    name: ClassVar[str] = "ve"
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def training_times(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """σ log-uniform on [σ_min, σ_max]: σ = σ_min (σ_max/σ_min)^u, u ~ U(0, 1) (NCSN's geometric noise
        levels, score-SDE's VE training)."""
        u = torch.rand(n, device=device, generator=generator)
        return float(self.sigma_min) * (float(self.sigma_max) / float(self.sigma_min)) ** u


# ----------------------------------------------------------------------------------------------------
# Phase Space Langevin Diffusion
# ----------------------------------------------------------------------------------------------------
def split(z: Tensor) -> tuple[Tensor, Tensor]:
    """A phase-space state (B, 2C, ...) → (x, m), each (B, C, ...): the first C channels are x."""
    if z.dim() < 2 or z.shape[1] % 2:
        raise ValueError(
            f"a PSLD state has an even number of channels along dim 1 (C of x, then C of m), got shape {tuple(z.shape)}"
        )
    x, m = z.chunk(2, dim=1)
    return x, m


def join(x: Tensor, m: Tensor) -> Tensor:
    """(x, m), each (B, C, ...) → the phase-space state (B, 2C, ...)."""
    return torch.cat([x, m], dim=1)


def mat2(a, b, c, d) -> Tensor:
    """The 2×2 matrices [[a, b], [c, d]] from broadcastable entries: shape (..., 2, 2)."""
    a, b, c, d = torch.broadcast_tensors(*(_as_tensor(v) for v in (a, b, c, d)))
    return torch.stack([torch.stack([a, b], -1), torch.stack([c, d], -1)], -2)


def _entry(A: Tensor, i: int, j: int, z: Tensor) -> Tensor:
    """Entry (i, j) of A (shape (2, 2), (B, 2, 2) or (*x.shape, 2, 2)) as a factor broadcasting against z's halves."""
    e = A[..., i, j].to(dtype=z.dtype, device=z.device)
    return e.reshape(e.shape + (1,) * (z.dim() - 1)) if e.dim() == 1 else e


def apply2(A: Tensor, z: Tensor) -> Tensor:
    """A 2×2 matrix acting per coordinate on a phase-space state: (x, m) ↦ (A₀₀x + A₀₁m, A₁₀x + A₁₁m).

    ``A`` is (2, 2) (one matrix for the batch), (B, 2, 2) (one per item) or (B, C, ..., 2, 2) (one per coordinate).
    """
    x, m = split(z)
    a, b, c, d = (_entry(A, i, j, x) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    return join(a * x + b * m, c * x + d * m)


def cholesky2(S: Tensor) -> Tensor:
    """Lower Cholesky factor of 2×2 covariances (..., 2, 2), in closed form."""
    l00 = torch.sqrt(S[..., 0, 0])
    l10 = S[..., 1, 0] / l00
    l11 = torch.sqrt(S[..., 1, 1] - l10**2)
    return mat2(l00, torch.zeros_like(l00), l10, l11)


def inv_transpose2(L: Tensor) -> Tensor:
    """L⁻ᵀ of lower-triangular 2×2 matrices: [[1/l₀₀, −l₁₀/(l₀₀l₁₁)], [0, 1/l₁₁]] (PSLD code ``get_inv_coeff``)."""
    l00, l10, l11 = L[..., 0, 0], L[..., 1, 0], L[..., 1, 1]
    return mat2(1 / l00, -l10 / (l00 * l11), torch.zeros_like(l00), 1 / l11)


@dataclass(frozen=True)
class PSLD(DiffusionProcess):
    """Phase Space Langevin Diffusion (Pandey & Mandt, ICCV 2023, Eq. 6–7), the forward SDE
    dz = F_t z dt + G_t dw on z = (x, m) with, per coordinate,

        F_t = (β(t)/2) [[−Γ, M⁻¹], [−1, −ν]],    G_t G_tᵀ = β(t) diag(Γ, Mν),    M⁻¹ = (Γ − ν)²/4,

    (critical damping), stationary law N(0, diag(1, M)), β(t) = β_min + t(β_max − β_min). Not an α/σ
    schedule: use it with the PSLD solvers of ``solve`` (``available_solvers(PSLD())``), not the VP ones.

    **State layout.** A state z is a tensor (B, 2C, ...): the first C channels are the data x, the last C
    the momentum m (``split``/``join``). Every matrix here is 2×2 and acts on each coordinate's pair
    (x_i, m_i) (``apply2``); functions of times map t of shape (...) to matrices of shape (..., 2, 2).

    **Noise model (HSM, the paper's training mode).** m₀ ~ N(0, κM), so p(z_t | x₀) = N(Φ_t (x₀, 0), Σ_t)
    with Σ_t = ``covariance(t)`` (xx₀ = 0, mm₀ = κM); z_t = μ_t + L_t ε with L_t the lower Cholesky factor
    of Σ_t + numerical_eps·I, and a network predicts ε (2C channels). Defaults: the CIFAR-10 config.
    """

    name: ClassVar[str] = "psld"
    beta_min: float = 8.0  # β(0); the CIFAR-10 config uses a constant β = 8
    beta_max: float = 8.0  # β(1)
    gamma: float = 0.01  # Γ: position-space friction/noise (Γ = 0 is CLD)
    nu: float = 4.01  # ν: momentum-space friction/noise
    kappa: float = 0.04  # HSM initial momentum variance κM
    t_min: float = 1e-3  # sampling ends here (the code's eval eps)
    t_max: float = 1.0  # sampling starts here (T)
    numerical_eps: float = 1e-9  # jitter added to the covariance diagonal before the Cholesky (as the code)

    # What callers ask (DiffusionProcess): PSLD's own integrators on uniform or quadratic grids (no log-SNR),
    # an ε network on all 2C state channels, HSM training below the sampling range (the PSLD code's
    # CIFAR-10 config trains on t ~ U[1e-5, 1]), and conjugate symplectic Euler with λ = −0.25 as the
    # collection default (docs/benchmarks.md, "psld"; first order, hence twice the α/σ default's steps).
    solver_family: ClassVar[str] = "psld"
    grid_kinds: ClassVar[tuple[str, ...]] = ("uniform", "quadratic")
    predictions: ClassVar[tuple[str, ...]] = ("eps",)
    predictions_why: ClassVar[str] = "a PSLD backbone predicts the HSM ε of all 2C state channels"
    default_solver: ClassVar[str] = "csps-d"
    default_steps: ClassVar[int] = 99
    default_solver_options: ClassVar[tuple[tuple[str, Any], ...]] = (("lam", -0.25),)
    bench_solvers: ClassVar[tuple[str, ...]] = ("euler", "lambda-ddim", "rse", "csps-d")
    train_t_min: ClassVar[float] = 1e-5

    def __post_init__(self):
        if not (self.beta_min > 0 and self.beta_max > 0):
            raise ValueError(f"PSLD needs beta_min, beta_max > 0, got {self.beta_min}, {self.beta_max}")
        if self.gamma < 0 or self.nu < 0 or self.gamma == self.nu:
            raise ValueError(
                f"PSLD needs gamma, nu >= 0 and gamma != nu (M⁻¹ = (Γ−ν)²/4 > 0), got {self.gamma}, {self.nu}"
            )
        if not self.kappa > 0:
            raise ValueError(f"PSLD needs kappa > 0 (HSM momentum variance κM), got {self.kappa}")
        if not 0 < self.t_min < self.t_max:
            raise ValueError(f"PSLD needs 0 < t_min < t_max, got {self.t_min}, {self.t_max}")
        if self.numerical_eps < 0:
            raise ValueError(f"PSLD numerical_eps must be >= 0, got {self.numerical_eps}")

    @property
    def mass_inv(self) -> float:
        """M⁻¹ = (Γ − ν)²/4: critical damping."""
        return (self.gamma - self.nu) ** 2 / 4

    @property
    def mass(self) -> float:
        return 1.0 / self.mass_inv

    @property
    def constant_beta(self) -> bool:
        return self.beta_min == self.beta_max

    def beta(self, t) -> Tensor:
        return self.beta_min + _as_tensor(t) * (self.beta_max - self.beta_min)

    def beta_integral(self, t) -> Tensor:
        """B(t) = ∫₀ᵗ β = β_min t + ½t²(β_max − β_min)."""
        t = _as_tensor(t)
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def drift(self, t) -> Tensor:
        """F_t = (β/2) [[−Γ, M⁻¹], [−1, −ν]] (paper Eq. 6)."""
        h = 0.5 * self.beta(t)
        return mat2(-self.gamma * h, self.mass_inv * h, -h, -self.nu * h)

    def diffusion(self, t) -> Tensor:
        """G_t G_tᵀ = β diag(Γ, Mν)."""
        b = self.beta(t)
        return mat2(self.gamma * b, torch.zeros_like(b), torch.zeros_like(b), self.mass * self.nu * b)

    def transition_from_integral(self, b) -> Tensor:
        """exp((b/2) F̄) for F̄ = F/(β/2), b = ∫β over the interval (any sign): with critical damping F̄ has the
        double eigenvalue −(Γ+ν)/2, so exp = e^{−(Γ+ν)b/4}·[[1 + (ν−Γ)b/4, M⁻¹b/2], [−b/2, 1 + (Γ−ν)b/4]]."""
        b = _as_tensor(b)
        c = torch.exp(-(self.gamma + self.nu) * b / 4)
        d = (self.nu - self.gamma) * b / 4
        return mat2(c * (1 + d), c * self.mass_inv * b / 2, -c * b / 2, c * (1 - d))

    def transition(self, t, s=0.0) -> Tensor:
        """Φ(t, s) = exp(∫_s^t F): the mean map z_s ↦ E[z_t | z_s] (psld.md §2). F_t = β(t)·const commutes
        with itself, so Φ(t, s) = Φ(t, 0)Φ(s, 0)⁻¹ = the closed form at b = B(t) − B(s)."""
        return self.transition_from_integral(self.beta_integral(t) - self.beta_integral(s))

    def covariance_from_integral(self, b, xx0=0.0, mm0=0.0) -> Tensor:
        """Cov[z_t] after ∫β = b ≥ 0 from Σ₀ = diag(xx₀, mm₀) (the PSLD code's ``_cov``, psld.md §2, without jitter)."""
        b, xx0, mm0 = _as_tensor(b), _as_tensor(xx0), _as_tensor(mm0)
        g, nu, mi, m = self.gamma, self.nu, self.mass_inv, self.mass
        c2 = torch.exp(-(g + nu) * b / 2)
        em1 = torch.expm1((g + nu) * b / 2)  # E − 1 without cancellation
        b2 = b**2
        xx = xx0 * (1 + (nu - g) * b / 2 + mi * b2 / 4) + mm0 * mi**2 * b2 / 4 - mi * b2 / 2 + (g - nu) * b / 2 + em1
        xm = xx0 * ((g - nu) * b2 / 8 - b / 2) + mm0 * mi * ((g - nu) * b2 / 8 + b / 2) + (nu - g) * b2 / 4
        mm = xx0 * b2 / 4 + mm0 * (1 + (g - nu) * b / 2 + mi * b2 / 4) - b2 / 2 + m * (nu - g) * b / 2 + m * em1
        return mat2(c2 * xx, c2 * xm, c2 * xm, c2 * mm)

    def covariance(self, t, xx0=0.0, mm0=None) -> Tensor:
        """Σ_t of p(z_t | z₀) for Σ₀ = diag(xx₀, mm₀) (closed form, psld.md §2); mm₀ defaults to κM (HSM)."""
        return self.covariance_from_integral(self.beta_integral(t), xx0, self.kappa * self.mass if mm0 is None else mm0)

    def cholesky(self, t) -> Tensor:
        """L_t: lower Cholesky factor of the HSM covariance Σ_t + numerical_eps·I (paper Eq. 9)."""
        S = self.covariance(t)
        return cholesky2(S + self.numerical_eps * torch.eye(2, dtype=S.dtype, device=S.device))

    def eps_to_score(self, eps: Tensor, t) -> Tensor:
        """s = −L_t⁻ᵀ ε (the PSLD code's ``get_score``)."""
        return apply2(-inv_transpose2(self.cholesky(t)), eps)

    def score_to_eps(self, score: Tensor, t) -> Tensor:
        """ε = −L_tᵀ s."""
        return apply2(-self.cholesky(t).transpose(-1, -2), score)

    def perturb(self, x0: Tensor, t, eps: Tensor) -> Tensor:
        """z_t = Φ_t (x₀, 0) + L_t ε (HSM: m₀ ~ N(0, κM) is part of the noise); ``eps`` has 2C channels."""
        if eps.shape[1] != 2 * x0.shape[1] or eps.shape[2:] != x0.shape[2:]:
            raise ValueError(
                f"eps must have twice the channels of x0 (x then m): got {tuple(eps.shape)} for x0 {tuple(x0.shape)}"
            )
        return apply2(self.transition(t), join(x0, torch.zeros_like(x0))) + apply2(self.cholesky(t), eps)

    def prior(self, shape, generator: torch.Generator | None = None, dtype=torch.float64, device=None) -> Tensor:
        """z_T ~ N(0, diag(1, M)) for data of ``shape`` (B, C, ...): returns (B, 2C, ...) (the code's
        ``prior_sampling``)."""
        x = torch.randn(*shape, generator=generator, dtype=dtype, device=device)
        m = torch.randn(*shape, generator=generator, dtype=dtype, device=device) * math.sqrt(self.mass)
        return join(x, m)

    def noise_rule(self) -> str:
        """The prior N(0, diag(1, M)) by the per-seed generator: z_T = (x, m); its x half is the VP rule's x_T."""
        return (
            "z_T = PSLD.prior((1, C, H, W), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)[0] "
            "on CPU: x = torch.randn(C, H, W, generator=g), then m = sqrt(M) * torch.randn(C, H, W, generator=g), "
            "z_T = cat([x, m]); then label"
        )

    def prior_config(self) -> dict:
        return self.config()  # the phase-space prior and its state layout depend on the whole process

    def state_channels(self, channels: int) -> int:
        return 2 * channels

    def data_part(self, z: Tensor, dim: int = 1) -> Tensor:
        """The x half of phase-space states (the first half of the channels along ``dim``)."""
        return z.chunk(2, dim=dim)[0]

    def data_log_snr(self, t) -> Tensor:
        return self.x_log_snr(t)

    def training_times(self, n: int, device=None, generator: torch.Generator | None = None) -> Tensor:
        """n float32 times uniform on [``train_t_min``, t_max] (HSM training, as the PSLD code)."""
        u = torch.rand(n, device=device, generator=generator)
        return self.train_t_min + (float(self.t_max) - self.train_t_min) * u

    def c_in(self, t) -> Tensor:
        """1: PSLD networks see the state unscaled."""
        return torch.ones_like(_as_tensor(t))

    def c_noise(self, t) -> Tensor:
        """1000 t, the PSLD code's time conditioning."""
        return 1000.0 * _as_tensor(t)

    def denoise(self, z: Tensor, eps: Tensor, t) -> Tensor:
        """x̂₀ = E[x₀ | z_t] = (x_t − L₀₀ ε̂_x)/Φ₀₀: the x row of z_t = Φ_t (x₀, 0) + L_t ε, L_t lower triangular.
        Returns C channels (the data)."""
        x, _ = split(z)
        eps_x, _ = split(eps)
        L, phi = self.cholesky(t), self.transition(t)
        l00, p00 = (_entry(A, 0, 0, x) for A in (L, phi))
        return (x - l00 * eps_x) / p00

    def x_log_snr(self, t) -> Tensor:
        """λ_x(t) = log(Φ₀₀(t)/L₀₀(t)): the α/σ log-SNR of the data channel. The x row of the HSM kernel is
        x_t = Φ₀₀ x₀ + L₀₀ ε_x (what ``denoise`` inverts), with Φ₀₀ = ``transition(t)[0, 0]`` and
        L₀₀ = ``cholesky(t)[0, 0]`` = √(Σxx(t) + numerical_eps), Σ = ``covariance(t)`` (xx₀ = 0, mm₀ = κM).
        Decreasing in t; DSNO's sqrt-SNR loss weight of a PSLD teacher is e^{λ_x}."""
        return torch.log(self.transition(t)[..., 0, 0]) - torch.log(self.cholesky(t)[..., 0, 0])

    def pf_ode(self, z: Tensor, eps: Tensor, t) -> Tensor:
        """dz/dt = F_t z − ½G_tG_tᵀ s = F_t z + ½G_tG_tᵀ L_t⁻ᵀ ε (the probability-flow ODE in forward time)."""
        return apply2(self.drift(t), z) + apply2(self.eps_coefficient(t), eps)

    def eps_coefficient(self, t) -> Tensor:
        """P_t = ½G_tG_tᵀ L_t⁻ᵀ: the PF-ODE is dz/dt = F_t z + P_t ε."""
        return 0.5 * self.diffusion(t) @ inv_transpose2(self.cholesky(t))


_SCHEDULES: dict[str, type[DiffusionProcess]] = {c.name: c for c in (VPLinear, VPCosine, DiscreteVP, EDM, VE, PSLD)}


def available_schedules() -> list[str]:
    return sorted(_SCHEDULES)


def schedule_from_config(config: dict) -> DiffusionProcess:
    """Inverse of ``Schedule.config()``."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(available_schedules())}")
    cls = _SCHEDULES[name]
    valid = {f.name for f in fields(cls) if f.init}
    unknown = set(config) - valid
    if unknown:
        raise ValueError(
            f"unknown {name} schedule parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
        )
    if cls is DiscreteVP:
        return DiscreteVP(log_alphas=tuple(config["log_alphas"]))
    return cls(**config)


GridKind = Literal["uniform", "quadratic", "logsnr", "edm"]
GRID_KINDS: tuple[str, ...] = ("uniform", "quadratic", "logsnr", "edm")


def time_grid(
    schedule: DiffusionProcess,
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
    ``logsnr`` and ``edm`` need an α/σ schedule; PSLD has no log-SNR, so it takes ``uniform`` or ``quadratic``.
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; valid: {', '.join(GRID_KINDS)}")
    if kind not in schedule.grid_kinds:
        raise ValueError(
            f"grid kind {kind!r} needs an α/σ schedule (a log-SNR); for the {schedule.name} schedule "
            f"use: {', '.join(schedule.grid_kinds)}"
        )
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
        l0, l1 = (
            schedule.log_snr(torch.tensor(t0, dtype=torch.float64)),
            schedule.log_snr(torch.tensor(t1, dtype=torch.float64)),
        )
        ts = schedule.t_from_log_snr(l0 + i * (l1 - l0))
    else:  # edm
        r0, r1 = (
            float(schedule.rho(torch.tensor(t0, dtype=torch.float64))),
            float(schedule.rho(torch.tensor(t1, dtype=torch.float64))),
        )
        rhos = (r0 ** (1 / rho) + i * (r1 ** (1 / rho) - r0 ** (1 / rho))) ** rho
        ts = schedule.t_from_log_snr(-torch.log(rhos))
    ts = ts.to(torch.float64)
    ts[0], ts[-1] = t0, t1  # pin the end points exactly (no round trip through λ)
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError(f"{kind} grid with {n} steps on [{t1}, {t0}] is not strictly decreasing; use fewer steps")
    return ts
