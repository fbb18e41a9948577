"""Tests for operator_diffusion.schedules.

Every closed form is checked against an independent reference written here: the defining integral of
the linear VP (scipy quad), the improved-DDPM ᾱ formula, the DDPM cumulative product of (1 − β), and the
defining property of each time grid, all in float64.
"""

import json
import math
import re

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from operator_diffusion.schedules import (
    EDM,
    GRID_KINDS,
    PSLD,
    VE,
    DiscreteVP,
    VPCosine,
    VPLinear,
    available_schedules,
    schedule_from_config,
    time_grid,
)

DDPM_BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


def _schedules():
    return {
        "vp-linear": VPLinear(),
        "vp-linear-custom": VPLinear(beta_min=0.05, beta_max=12.0, t_min=1e-4, t_max=0.9),
        "vp-cosine": VPCosine(),
        "discrete": DiscreteVP.from_betas(DDPM_BETAS),
        "edm": EDM(),
        "ve": VE(),
    }


SCHEDULES = _schedules()
VP_NAMES = ["vp-linear", "vp-linear-custom", "vp-cosine", "discrete"]


@pytest.fixture(params=list(SCHEDULES), ids=list(SCHEDULES))
def sched(request):
    return SCHEDULES[request.param]


def dense_times(s, n=2001):
    """Dense float64 times over [t_min, t_max], geometric near t_min and linear elsewhere."""
    lin = torch.linspace(s.t_min, s.t_max, n, dtype=torch.float64)
    geo = torch.logspace(math.log10(s.t_min), math.log10(s.t_max), n, dtype=torch.float64)
    t = torch.unique(torch.cat([lin, geo]).clamp(s.t_min, s.t_max))  # sorted increasing
    keep = torch.ones_like(t, dtype=torch.bool)
    keep[1:] = t[1:] - t[:-1] > 1e-9 * t[1:]  # drop near-duplicates (a few ulp apart)
    return t[keep]


# ----------------------------------------------------------------------------------------------------
# Generic properties
# ----------------------------------------------------------------------------------------------------
def test_t_from_log_snr_inverts_log_snr(sched):
    t = dense_times(sched)
    t_back = sched.t_from_log_snr(sched.log_snr(t))
    assert t_back.dtype == torch.float64
    torch.testing.assert_close(t_back, t, rtol=1e-10, atol=0.0)


def test_log_snr_strictly_decreasing(sched):
    t = dense_times(sched)
    lam = sched.log_snr(t)
    assert torch.isfinite(lam).all()
    assert bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("name", VP_NAMES)
def test_vp_is_variance_preserving(name):
    s = SCHEDULES[name]
    t = dense_times(s)
    a, sg = s.alpha(t), s.sigma(t)
    torch.testing.assert_close(a**2 + sg**2, torch.ones_like(t), rtol=0.0, atol=1e-12)
    assert bool(((a > 0) & (a < 1) & (sg > 0) & (sg < 1)).all())


def test_rho_is_sigma_over_alpha(sched):
    t = dense_times(sched)
    torch.testing.assert_close(sched.rho(t), sched.sigma(t) / sched.alpha(t), rtol=1e-12, atol=0.0)
    # and λ = log α − log σ
    torch.testing.assert_close(
        sched.log_snr(t), torch.log(sched.alpha(t)) - torch.log(sched.sigma(t)), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("fn", ["alpha", "sigma", "log_snr", "rho"])
def test_scalar_and_tensor_inputs_and_dtypes(sched, fn):
    f = getattr(sched, fn)
    t = 0.5 * (sched.t_min + sched.t_max)
    from_float = f(t)
    assert isinstance(from_float, torch.Tensor) and from_float.dtype == torch.float64
    assert from_float.dim() == 0
    from_t64 = f(torch.tensor([t, t], dtype=torch.float64))
    assert from_t64.dtype == torch.float64 and from_t64.shape == (2,)
    torch.testing.assert_close(from_t64, from_float.expand(2), rtol=0, atol=0)
    from_t32 = f(torch.tensor([t, sched.t_min, sched.t_max], dtype=torch.float32))
    assert from_t32.dtype == torch.float32 and from_t32.shape == (3,)
    ref = f(torch.tensor([t, sched.t_min, sched.t_max], dtype=torch.float32).to(torch.float64))
    torch.testing.assert_close(from_t32, ref.to(torch.float32), rtol=1e-5, atol=1e-6)


def test_t_from_log_snr_keeps_float32(sched):
    t = torch.tensor([sched.t_min, 0.5 * (sched.t_min + sched.t_max), sched.t_max], dtype=torch.float32)
    lam = sched.log_snr(t)
    assert lam.dtype == torch.float32
    t_back = sched.t_from_log_snr(lam)
    assert t_back.dtype == torch.float32
    # float32 λ near the ends (cos ≈ 0 for the cosine schedule) costs ~1e-5 relative: a dtype check only
    torch.testing.assert_close(t_back, t, rtol=1e-3, atol=0.0)


# ----------------------------------------------------------------------------------------------------
# VPLinear: α_t = exp(−½ ∫_0^t β(s) ds)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta_min,beta_max", [(0.1, 20.0), (0.05, 12.0), (1.0, 1.0 + 1e-6)])
def test_vp_linear_alpha_is_integral_of_beta(beta_min, beta_max):
    s = VPLinear(beta_min=beta_min, beta_max=beta_max)

    def beta(u):
        return beta_min + u * (beta_max - beta_min)

    for t in [1e-3, 0.01, 0.1, 0.33, 0.5, 0.77, 1.0]:
        integral, err = quad(beta, 0.0, t, epsabs=0.0, epsrel=1e-13)
        assert err < 1e-12 * integral
        ref_alpha = math.exp(-0.5 * integral)
        assert float(s.alpha(t)) == pytest.approx(ref_alpha, rel=1e-12)
        assert float(s.sigma(t)) == pytest.approx(math.sqrt(1 - ref_alpha**2), rel=1e-10)
        assert float(s.beta(t)) == pytest.approx(beta(t), rel=1e-14)


def test_vp_linear_log_alpha_derivative_is_minus_half_beta():
    s = VPLinear()
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(s.log_alpha(t).sum(), t)
    t_ = t.detach()
    torch.testing.assert_close(g, -0.5 * (0.1 + t_ * (20.0 - 0.1)), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------
# VPCosine: α_t² = f(t)/f(0), f(t) = cos²((t+s)/(1+s)·π/2)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset", [0.008, 0.02])
def test_vp_cosine_matches_improved_ddpm(offset):
    s = VPCosine(s=offset)

    def f(t):
        return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2

    for t in np.linspace(s.t_min, s.t_max, 41):
        abar = f(t) / f(0.0)
        assert float(s.alpha(float(t))) ** 2 == pytest.approx(abar, rel=1e-12)
        assert float(s.sigma(float(t))) ** 2 == pytest.approx(1 - abar, rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# DiscreteVP
# ----------------------------------------------------------------------------------------------------
def test_discrete_matches_cumprod_at_steps():
    s = SCHEDULES["discrete"]
    n_steps = len(DDPM_BETAS)
    assert s.num_steps == n_steps
    abar = torch.cumprod(1 - DDPM_BETAS, 0)
    t_n = (torch.arange(n_steps, dtype=torch.float64) + 1) / n_steps
    torch.testing.assert_close(s.alpha(t_n) ** 2, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sigma(t_n) ** 2, 1 - abar, rtol=1e-12, atol=0)
    assert s.t_min == pytest.approx(1 / n_steps, rel=1e-15) and s.t_max == 1.0


def test_discrete_log_alpha_piecewise_linear_between_steps():
    s = SCHEDULES["discrete"]
    n_steps = len(DDPM_BETAS)
    log_abar = torch.cumsum(torch.log(1 - DDPM_BETAS), 0)  # independent of the stored table
    t_n = (torch.arange(n_steps, dtype=torch.float64) + 1) / n_steps
    mid = 0.5 * (t_n[1:] + t_n[:-1])
    ref = 0.5 * (0.5 * log_abar[1:] + 0.5 * log_abar[:-1])  # midpoint of ½ log ᾱ
    torch.testing.assert_close(s.log_alpha(mid), ref, rtol=1e-11, atol=1e-14)
    # quarter point too (linear, not just symmetric)
    q = t_n[:-1] + 0.25 / n_steps
    ref_q = 0.5 * (0.75 * log_abar[:-1] + 0.25 * log_abar[1:])
    torch.testing.assert_close(s.log_alpha(q), ref_q, rtol=1e-11, atol=1e-14)


def test_discrete_timestep():
    s = SCHEDULES["discrete"]
    n_steps = s.num_steps
    n = torch.arange(n_steps, dtype=torch.float64)
    t_n = (n + 1) / n_steps
    torch.testing.assert_close(s.timestep(t_n), n, rtol=0, atol=1e-9)
    assert torch.equal(torch.round(s.timestep(t_n)), n)
    assert float(s.timestep(1.0)) == n_steps - 1
    assert float(s.timestep(0.5)) == pytest.approx(n_steps / 2 - 1, abs=1e-12)


def test_discrete_from_alphas_cumprod_equals_from_betas():
    abar = torch.cumprod(1 - DDPM_BETAS, 0)
    a = DiscreteVP.from_alphas_cumprod(abar)
    b = DiscreteVP.from_betas(DDPM_BETAS)
    t = dense_times(b)
    torch.testing.assert_close(a.alpha(t), b.alpha(t), rtol=1e-12, atol=0)
    torch.testing.assert_close(a.log_snr(t), b.log_snr(t), rtol=1e-11, atol=1e-12)
    # also from a numpy array / list input
    c = DiscreteVP.from_betas(DDPM_BETAS.numpy().tolist())
    assert c == b


@pytest.mark.parametrize(
    "betas",
    [
        [0.1, -0.05, 0.1],  # ᾱ increases at step 1
        [0.0, 0.1, 0.2],  # ᾱ_0 = 1 (not below 1)
        [0.1, 0.0, 0.2],  # ᾱ constant between steps (not strictly decreasing)
        [0.1, 1.5, 0.2],  # β > 1 (NaN log)
        [0.1, 0.2, 1.0],  # β = 1: ᾱ_N = 0, α = 0 at t_max (λ = −inf); betas must lie in (0, 1)
        [0.1],  # too few steps
    ],
)
def test_discrete_invalid_betas(betas):
    with pytest.raises(ValueError, match="DiscreteVP"):
        DiscreteVP.from_betas(torch.tensor(betas, dtype=torch.float64))


def test_discrete_invalid_alphas_cumprod():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP.from_alphas_cumprod(torch.tensor([0.9, 0.95, 0.5], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# EDM / VE
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["edm", "ve"])
def test_edm_ve_closed_form(name):
    s = SCHEDULES[name]
    t = dense_times(s)
    torch.testing.assert_close(s.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(s.sigma(t), t, rtol=1e-15, atol=0)
    torch.testing.assert_close(s.log_snr(t), -torch.log(t), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(s.rho(t), t, rtol=1e-14, atol=0)


def test_edm_ve_ranges():
    assert (EDM().t_min, EDM().t_max) == (0.002, 80.0)
    assert (VE().t_min, VE().t_max) == (0.01, 50.0)
    assert (EDM(sigma_min=0.1, sigma_max=3.0).t_min, EDM(sigma_min=0.1, sigma_max=3.0).t_max) == (0.1, 3.0)


# ----------------------------------------------------------------------------------------------------
# Config round trip
# ----------------------------------------------------------------------------------------------------
def test_config_round_trip(sched):
    cfg = sched.config()
    assert cfg["name"] == sched.name
    rebuilt = schedule_from_config(cfg)
    assert type(rebuilt) is type(sched)
    assert rebuilt == sched
    # through JSON too
    text = json.dumps(cfg)
    rebuilt_json = schedule_from_config(json.loads(text))
    assert rebuilt_json == sched
    t = dense_times(sched, 101)
    torch.testing.assert_close(rebuilt_json.log_snr(t), sched.log_snr(t), rtol=0, atol=0)
    # the config passed in is not mutated
    assert cfg == sched.config()


def test_available_schedules():
    assert available_schedules() == sorted(["vp-linear", "vp-cosine", "discrete", "edm", "ve", "psld"])


@pytest.mark.parametrize("cfg", [{"name": "nope"}, {}, {"name": None}])
def test_unknown_schedule_name(cfg):
    with pytest.raises(ValueError, match="unknown schedule") as info:
        schedule_from_config(cfg)
    for valid in ["vp-linear", "vp-cosine", "discrete", "edm", "ve"]:
        assert valid in str(info.value)


# ----------------------------------------------------------------------------------------------------
# Time grids
# ----------------------------------------------------------------------------------------------------
GRID_SCHEDULES = ["vp-linear", "vp-cosine", "discrete", "edm", "ve"]


def _check_grid_property(s, kind, ts, rel=1e-9):
    """The kind-defining equal spacing, computed independently of time_grid."""
    if kind == "uniform":
        g = ts
    elif kind == "quadratic":
        g = torch.sqrt(ts)
    elif kind == "logsnr":
        g = torch.log(s.alpha(ts)) - torch.log(s.sigma(ts))
    elif kind == "edm":
        g = (s.sigma(ts) / s.alpha(ts)) ** (1 / 7)
    else:  # pragma: no cover
        raise AssertionError(kind)
    d = g[1:] - g[:-1]
    expected = (g[-1] - g[0]) / (len(ts) - 1)
    torch.testing.assert_close(d, expected.expand_as(d), rtol=rel, atol=0)


@pytest.mark.parametrize("name", GRID_SCHEDULES)
@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_time_grid_default_endpoints(name, kind, n):
    s = SCHEDULES[name]
    ts = time_grid(s, n, kind=kind)
    assert ts.dtype == torch.float64 and ts.shape == (n + 1,)
    assert float(ts[0]) == s.t_max and float(ts[-1]) == s.t_min
    assert bool((ts[1:] < ts[:-1]).all())
    _check_grid_property(s, kind, ts)


@pytest.mark.parametrize("name", GRID_SCHEDULES)
@pytest.mark.parametrize("kind", GRID_KINDS)
def test_time_grid_custom_endpoints(name, kind):
    s = SCHEDULES[name]
    t_start = s.t_min + 0.7 * (s.t_max - s.t_min)
    t_end = s.t_min + 0.05 * (s.t_max - s.t_min)
    ts = time_grid(s, 13, kind=kind, t_start=t_start, t_end=t_end)
    assert ts.shape == (14,) and ts.dtype == torch.float64
    assert float(ts[0]) == t_start and float(ts[-1]) == t_end
    assert bool((ts[1:] < ts[:-1]).all())
    _check_grid_property(s, kind, ts)


def test_time_grid_default_kind_is_logsnr():
    s = SCHEDULES["vp-linear"]
    torch.testing.assert_close(time_grid(s, 10), time_grid(s, 10, kind="logsnr"), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vp-linear", "edm"])
def test_time_grid_edm_custom_rho(name):
    s = SCHEDULES[name]
    ts = time_grid(s, 9, kind="edm", rho=3.0)
    g = (s.sigma(ts) / s.alpha(ts)) ** (1 / 3)
    d = g[1:] - g[:-1]
    torch.testing.assert_close(d, ((g[-1] - g[0]) / 9).expand_as(d), rtol=1e-9, atol=0)


def test_time_grid_edm_matches_karras_formula():
    # Karras et al. eq. 5 for the EDM schedule, written out directly.
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    i = np.arange(n + 1)
    ref = (smax ** (1 / rho) + i / n * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ts = time_grid(EDM(), n, kind="edm")
    np.testing.assert_allclose(ts.numpy(), ref, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_time_grid_unknown_kind():
    with pytest.raises(ValueError, match="unknown grid kind") as info:
        time_grid(VPLinear(), 10, kind="cosine")  # type: ignore[arg-type]
    for k in GRID_KINDS:
        assert k in str(info.value)


@pytest.mark.parametrize("n", [0, -3, 2.0, 2.5, "10", None])
def test_time_grid_bad_n(n):
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(VPLinear(), n)  # type: ignore[arg-type]


@pytest.mark.parametrize("t_start,t_end", [(0.3, 0.3), (0.2, 0.5)])
def test_time_grid_start_not_after_end(t_start, t_end):
    with pytest.raises(ValueError, match="greater than"):
        time_grid(VPLinear(), 10, t_start=t_start, t_end=t_end)


@pytest.mark.parametrize("name", GRID_SCHEDULES)
def test_time_grid_outside_range(name):
    s = SCHEDULES[name]
    rng = re.escape(f"[{s.t_min:.6g}, {s.t_max:.6g}]")
    with pytest.raises(ValueError, match=rf"outside the range.*{rng}"):
        time_grid(s, 10, t_start=s.t_max * 1.01)
    with pytest.raises(ValueError, match=rf"outside the range.*{rng}"):
        time_grid(s, 10, t_end=s.t_min * 0.5)


def test_check_times():
    s = VPLinear()
    s.check_times(torch.tensor([1e-3, 0.5, 1.0], dtype=torch.float64))  # inside: no error
    s.check_times(torch.tensor([1e-3 * (1 - 1e-12), 1.0 * (1 + 1e-12)], dtype=torch.float64))  # slack
    with pytest.raises(ValueError, match=r"index 1 .*\[0\.001, 1\]"):
        s.check_times(torch.tensor([0.5, float("nan"), 0.2], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"index 2"):
        s.check_times(torch.tensor([0.5, 0.2, float("inf")], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^my t 1\.5 at index 0"):
        s.check_times(torch.tensor([1.5, 0.2], dtype=torch.float64), what="my t")
    with pytest.raises(ValueError, match=r"outside the range"):
        s.check_times(torch.tensor([0.5, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"-0\.1 at index 3"):
        s.check_times(torch.tensor([[0.5, 0.2], [0.3, -0.1]], dtype=torch.float64).flatten())


def test_check_times_multidimensional_reports_offending_value():
    # A (2, 2) tensor whose only bad entry is −0.1 at [1, 1] (flat index 3): the message must name it.
    s = VPLinear()
    with pytest.raises(ValueError, match=r"-0\.1 .*outside the range"):
        s.check_times(torch.tensor([[0.5, 0.2], [0.3, -0.1]], dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# The process answers its own questions: the prior draw
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "s",
    [VPLinear(), VPCosine(), DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)), EDM(), VE()],
    ids=lambda s: s.name,
)
def test_prior_has_the_scale_of_the_closed_form_marginal_at_t_max(s):
    """x_T = α x_0 + σ ε for unit-variance data has std √(α² + σ²) at t_max (VP: 1; VE/EDM: √(1 + σ_max²)); the
    prior's draw matches it within sampling error (and, for VE/EDM, the 1/(2σ_max²) a unit-data term contributes)."""
    n = 400_000
    x = s.prior((n, 1), generator=torch.Generator().manual_seed(0))
    t = torch.tensor(s.t_max, dtype=torch.float64)
    marginal = math.sqrt(float(s.alpha(t)) ** 2 + float(s.sigma(t)) ** 2)
    assert x.shape == (n, 1) and x.dtype == torch.float64
    assert float(x.std()) / marginal == pytest.approx(1.0, abs=5 / math.sqrt(2 * n) + 1 / (2 * float(s.sigma(t)) ** 2))
    assert abs(float(x.mean())) < 5 * marginal / math.sqrt(n)


def test_psld_prior_is_the_stationary_law_of_its_sde():
    """PSLD's prior N(0, diag(1, M)) against the closed-form covariance long after the start (the SDE's stationary
    law), per channel: x first, then m."""
    s = PSLD()
    n = 400_000
    z = s.prior((n, 1), generator=torch.Generator().manual_seed(0))
    stationary = s.covariance_from_integral(torch.tensor(200.0, dtype=torch.float64), xx0=1.0, mm0=s.kappa)
    assert z.shape == (n, 2)
    for i in range(2):
        assert float(z[:, i].var()) / float(stationary[i, i]) == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert abs(float(torch.corrcoef(z.T)[0, 1])) < 5 / math.sqrt(n)
