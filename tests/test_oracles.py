"""Tests for operator_diffusion.oracles.

References written here, independently of the library: log-densities of the noised marginals whose
gradients (torch.autograd, float64) give ε* = −σ_t ∇ log p_t; the probability-flow ODE
dx/dt = (d log α/dt) x + α (dρ/dt) ε*(x, t) checked by finite differences; closed-form Gaussian
posterior means; and direct-difference formulas for the empirical denoiser.
"""

import math

import pytest
import torch

from operator_diffusion.oracles import EmpiricalOracle, GaussianMixtureOracle, GaussianOracle
from operator_diffusion.schedules import EDM, VE, DiscreteVP, VPCosine, VPLinear, time_grid

F64 = torch.float64


SCHEDULES = {
    "vp-linear": VPLinear(),
    "vp-cosine": VPCosine(),
    "discrete": DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=F64)),
    "edm": EDM(),
    "ve": VE(),
}
SMOOTH = ["vp-linear", "vp-cosine", "edm"]  # schedules with smooth α, σ (DiscreteVP has kinks at steps)


def _times(s, b, gen):
    """b float64 times spread over [t_min, t_max] (log-uniform), reproducible."""
    u = torch.rand(b, dtype=F64, generator=gen)
    return torch.exp(math.log(s.t_min) + u * (math.log(s.t_max) - math.log(s.t_min)))


def _col(c, x):
    return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


# ----------------------------------------------------------------------------------------------------
# Independent references
# ----------------------------------------------------------------------------------------------------
def gaussian_log_pt(x, t, s, mean, std):
    """Σ_d log N(x_d; α_t μ_d, α_t² s_d² + σ_t²), per item (B,)."""
    a, sg = _col(s.alpha(t), x), _col(s.sigma(t), x)
    var = a**2 * std**2 + sg**2
    lp = -0.5 * (x - a * mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)
    return lp.reshape(len(x), -1).sum(1)


def mixture_log_pt(x, t, s, weights, means, stds):
    """log Σ_k w_k Π_d N(x_d; α m_kd, α² s_kd² + σ²), per item (B,). ``stds`` is (K, *shape)."""
    b, k = len(x), len(means)
    a = s.alpha(t).reshape(b, 1, 1)
    sg = s.sigma(t).reshape(b, 1, 1)
    xf = x.reshape(b, 1, -1)
    m = means.reshape(1, k, -1)
    var = a**2 * stds.reshape(1, k, -1) ** 2 + sg**2
    comp = (-0.5 * (xf - a * m) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
    w = weights / weights.sum()
    return torch.logsumexp(torch.log(w)[None] + comp, dim=1)


def eps_by_autograd(log_pt, x, t, s):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_pt(x).sum(), x)
    return -_col(s.sigma(t), x) * g


def schedule_derivatives(s, t):
    """d log α/dt and dρ/dt by autograd on the schedule's own functions (float64)."""
    t = t.detach().clone().requires_grad_(True)
    # "+ 0·t" keeps the graph connected for schedules whose α is a constant (EDM: α ≡ 1)
    (dla,) = torch.autograd.grad((torch.log(s.alpha(t)) + 0 * t).sum(), t)
    t2 = t.detach().clone().requires_grad_(True)
    (drho,) = torch.autograd.grad((s.sigma(t2) / s.alpha(t2) + 0 * t2).sum(), t2)
    return dla, drho


def five_point(f, t, h):
    """Fourth-order central difference of f at t."""
    return (-f(t + 2 * h) + 8 * f(t + h) - 8 * f(t - h) + f(t - 2 * h)) / (12 * h)


# ----------------------------------------------------------------------------------------------------
# GaussianOracle
# ----------------------------------------------------------------------------------------------------
SHAPES = [(3,), (1, 2, 2)]


def _gaussian(s, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, dtype=F64, generator=g)
    std = 0.3 + torch.rand(shape, dtype=F64, generator=g)
    return GaussianOracle(s, mean, std), mean, std


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_eps_is_scaled_score(name, shape):
    s = SCHEDULES[name]
    oracle, mean, std = _gaussian(s, shape)
    g = torch.Generator().manual_seed(1)
    b = 9
    t = _times(s, b, g)
    x = _col(s.alpha(t), torch.zeros(b, *shape)) * mean + 2 * torch.randn(b, *shape, dtype=F64, generator=g)
    ref = eps_by_autograd(lambda y: gaussian_log_pt(y, t, s, mean, std), x, t, s)
    out = oracle.eps(x, t)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name", ["vp-linear", "edm"])
def test_gaussian_denoise_is_posterior_mean(name):
    s = SCHEDULES[name]
    oracle, mean, std = _gaussian(s, (3,))
    g = torch.Generator().manual_seed(2)
    t = _times(s, 7, g)
    x = torch.randn(7, 3, dtype=F64, generator=g)
    a, sg = _col(s.alpha(t), x), _col(s.sigma(t), x)
    # E[x0 | x_t] for x0 ~ N(μ, s²), x_t = α x0 + σ ε
    ref = mean + a * std**2 / (a**2 * std**2 + sg**2) * (x - a * mean)
    torch.testing.assert_close(oracle.denoise(x, t), ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_flow_solves_pf_ode(name, shape):
    s = SCHEDULES[name]
    oracle, mean, std = _gaussian(s, shape)
    g = torch.Generator().manual_seed(3)
    b = 4
    t_from = s.t_max
    x = torch.randn(b, *shape, dtype=F64, generator=g) * float(s.sigma(t_from)) + float(s.alpha(t_from)) * mean
    for frac in [0.02, 0.1, 0.4, 0.8]:
        t = s.t_min + frac * (s.t_max - s.t_min)
        h = 1e-3 * t

        def x_of(tt):
            return oracle.flow(x, t_from, float(tt))

        dxdt_fd = five_point(x_of, t, h)
        xt = x_of(t)
        tt = torch.full((b,), t, dtype=F64)
        dla, drho = schedule_derivatives(s, tt)
        eps = eps_by_autograd(lambda y: gaussian_log_pt(y, tt, s, mean, std), xt, tt, s)
        rhs = _col(dla, xt) * xt + _col(s.alpha(tt) * drho, xt) * eps
        scale = rhs.abs().max()
        torch.testing.assert_close(dxdt_fd, rhs, rtol=1e-6, atol=1e-6 * float(scale))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_gaussian_flow_composes_and_inverts(name):
    s = SCHEDULES[name]
    oracle, mean, std = _gaussian(s, (1, 2, 2))
    x = torch.randn(5, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    ta, tb, tc = s.t_max, s.t_min + 0.3 * (s.t_max - s.t_min), s.t_min
    torch.testing.assert_close(
        oracle.flow(oracle.flow(x, ta, tb), tb, tc), oracle.flow(x, ta, tc), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(oracle.flow(oracle.flow(x, ta, tc), tc, ta), x, rtol=1e-12, atol=1e-12)
    # identity map up to the rounding of α_t μ + 1·(x − α_t μ)
    torch.testing.assert_close(
        oracle.flow(x, tb, tb), x, rtol=1e-15, atol=4 * 2.2e-16 * float(mean.abs().max() + x.abs().max())
    )


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_flow_pushes_marginal(name, shape):
    """The flow is affine: x ↦ α_t μ + k ⊙ (x − α_T μ). Pushing N(α_T μ, v_T) through it gives
    N(α_t μ, k² v_T); this must equal p_t = N(α_t μ, v_t), i.e. k = sqrt(v_t / v_T)."""
    s = SCHEDULES[name]
    oracle, mean, std = _gaussian(s, shape)
    big_t = s.t_max
    a_T, s_T = float(s.alpha(big_t)), float(s.sigma(big_t))
    v_T = a_T**2 * std**2 + s_T**2
    delta = torch.randn(6, *shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    for frac in [0.0, 0.05, 0.5, 0.9]:
        t = s.t_min + frac * (s.t_max - s.t_min)
        a_t, s_t = float(s.alpha(t)), float(s.sigma(t))
        v_t = a_t**2 * std**2 + s_t**2
        intercept = oracle.flow((a_T * mean)[None], big_t, t)[0]
        torch.testing.assert_close(intercept, a_t * mean, rtol=1e-13, atol=1e-14)  # image mean = α_t μ
        k = torch.sqrt(v_t / v_T)
        out = oracle.flow(a_T * mean + delta, big_t, t)
        torch.testing.assert_close(out, a_t * mean + k * delta, rtol=1e-12, atol=1e-13)  # affine, diagonal
        torch.testing.assert_close(k**2 * v_T, v_t, rtol=1e-13, atol=0)  # image variance = v_t


@pytest.mark.parametrize("t", [None, 0.3])
def test_gaussian_sample_moments(t):
    s = VPLinear()
    oracle, mean, std = _gaussian(s, (3,))
    n = 20000
    x = oracle.sample(n, t=t, generator=torch.Generator().manual_seed(6))
    assert x.shape == (n, 3) and x.dtype == F64
    if t is None:
        m_ref, v_ref = mean, std**2
    else:
        a, sg = float(s.alpha(t)), float(s.sigma(t))
        m_ref, v_ref = a * mean, a**2 * std**2 + sg**2
    # 5 standard errors: SE(mean) = sqrt(v/n); SE(var) = v sqrt(2/(n−1)) for Gaussian data
    assert ((x.mean(0) - m_ref).abs() < 5 * torch.sqrt(v_ref / n)).all()
    assert ((x.var(0) - v_ref).abs() < 5 * v_ref * math.sqrt(2 / (n - 1))).all()


# ----------------------------------------------------------------------------------------------------
# GaussianMixtureOracle
# ----------------------------------------------------------------------------------------------------
def _mixture(s, shape, k=3, diagonal=False, seed=10):
    g = torch.Generator().manual_seed(seed)
    means = 2 * torch.randn(k, *shape, dtype=F64, generator=g)
    stds = 0.2 + torch.rand((k, *shape) if diagonal else (k,), dtype=F64, generator=g)
    weights = 0.5 + torch.rand(k, dtype=F64, generator=g)  # unnormalised on purpose
    full_stds = stds if diagonal else stds.reshape(k, *([1] * len(shape))).expand(k, *shape)
    return GaussianMixtureOracle(s, weights, means, stds), weights, means, full_stds


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("diagonal", [False, True], ids=["isotropic", "diagonal"])
def test_mixture_eps_is_scaled_score(name, shape, diagonal):
    s = SCHEDULES[name]
    oracle, w, means, stds = _mixture(s, shape, diagonal=diagonal)
    g = torch.Generator().manual_seed(11)
    b = 10
    t = _times(s, b, g)
    # points between components so that several responsibilities are non-negligible
    x = _col(s.alpha(t), torch.zeros(b, *shape)) * 0.5 * (means[0] + means[1]) + _col(
        s.sigma(t), torch.zeros(b, *shape)
    ) * torch.randn(b, *shape, dtype=F64, generator=g)
    ref = eps_by_autograd(lambda y: mixture_log_pt(y, t, s, w, means, stds), x, t, s)
    out = oracle.eps(x, t)
    assert out.shape == x.shape and out.dtype == F64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)


def test_mixture_eps_scalar_time_and_float32():
    s = VPLinear()
    oracle, w, means, stds = _mixture(s, (3,))
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    t = torch.full((4,), 0.4, dtype=F64)
    torch.testing.assert_close(oracle.eps(x, 0.4), oracle.eps(x, t), rtol=0, atol=0)
    out32 = oracle.eps(x.float(), t.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, oracle.eps(x, t).float(), rtol=1e-5, atol=1e-5)


def test_mixture_weights_normalised_and_validated():
    s = VPLinear()
    oracle, w, _, _ = _mixture(s, (3,))
    torch.testing.assert_close(oracle.weights, w / w.sum(), rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureOracle(s, torch.ones(2), torch.zeros(3, 2), torch.ones(3))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_single_component_mixture_is_gaussian(name, shape):
    s = SCHEDULES[name]
    gauss, mean, std = _gaussian(s, shape)
    mix = GaussianMixtureOracle(s, torch.tensor([3.0]), mean[None], std[None])
    g = torch.Generator().manual_seed(13)
    t = _times(s, 8, g)
    x = 3 * torch.randn(8, *shape, dtype=F64, generator=g)
    torch.testing.assert_close(mix.eps(x, t), gauss.eps(x, t), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(mix.denoise(x, t), gauss.denoise(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "edm"])
def test_single_component_mixture_flow_matches_closed_form(name):
    """Validates the DOP853 reference integrator against the Gaussian's closed-form flow."""
    s = SCHEDULES[name]
    gauss, mean, std = _gaussian(s, (3,))
    mix = GaussianMixtureOracle(s, torch.tensor([1.0]), mean[None], std[None])
    ts = time_grid(s, 6, kind="uniform")
    x = float(s.sigma(ts[0])) * torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(14))
    out = mix.flow(x, ts)
    assert out.shape == (len(ts), 4, 3) and out.dtype == F64
    torch.testing.assert_close(out[0], x, rtol=1e-14, atol=0)
    for i in range(1, len(ts)):
        ref = gauss.flow(x, float(ts[0]), float(ts[i]))
        torch.testing.assert_close(out[i], ref, rtol=1e-9, atol=1e-9)


def test_mixture_flow_shape_and_start_multidim():
    s = VPLinear()
    oracle, *_ = _mixture(s, (1, 2, 2), k=2)
    x = torch.randn(3, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(15))
    ts = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    out = oracle.flow(x, ts)
    assert out.shape == (3, 3, 1, 2, 2)
    torch.testing.assert_close(out[0], x, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", ["vp-linear", "edm"])
def test_mixture_flow_solves_pf_ode(name):
    """Finite-difference d/dt of the reference flow of a genuine 2-component mixture against the PF-ODE
    right-hand side built from the autograd score."""
    s = SCHEDULES[name]
    oracle, w, means, stds = _mixture(s, (2,), k=2, diagonal=True)
    x = float(s.sigma(s.t_max)) * torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(16))
    for frac in [0.05, 0.3]:
        t = s.t_min + frac * (s.t_max - s.t_min)
        h = 1e-2 * t
        ts = torch.tensor([s.t_max, t + 2 * h, t + h, t, t - h, t - 2 * h], dtype=F64)
        out = oracle.flow(x, ts)
        dxdt_fd = (-out[1] + 8 * out[2] - 8 * out[4] + out[5]) / (12 * h)
        xt = out[3]
        tt = torch.full((3,), t, dtype=F64)
        dla, drho = schedule_derivatives(s, tt)
        eps = eps_by_autograd(lambda y: mixture_log_pt(y, tt, s, w, means, stds), xt, tt, s)
        rhs = _col(dla, xt) * xt + _col(s.alpha(tt) * drho, xt) * eps
        torch.testing.assert_close(dxdt_fd, rhs, rtol=1e-6, atol=1e-6 * float(rhs.abs().max()))


def test_mixture_flow_round_trip():
    s = VPLinear()
    oracle, *_ = _mixture(s, (2,), k=2)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(17))
    ts = torch.tensor([1.0, 0.3], dtype=F64)
    fwd = oracle.flow(x, ts)[-1]
    back = oracle.flow(fwd, ts.flip(0))[-1]
    torch.testing.assert_close(back, x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["vp-linear", "discrete", "ve"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["isotropic", "diagonal"])
def test_mixture_denoise(name, diagonal):
    s = SCHEDULES[name]
    oracle, w, means, stds = _mixture(s, (3,), diagonal=diagonal)
    g = torch.Generator().manual_seed(18)
    t = _times(s, 6, g)
    x = _col(s.alpha(t), torch.zeros(6, 3)) * means[1] + _col(s.sigma(t), torch.zeros(6, 3)) * torch.randn(
        6, 3, dtype=F64, generator=g
    )
    a, sg = _col(s.alpha(t), x), _col(s.sigma(t), x)
    out = oracle.denoise(x, t)
    torch.testing.assert_close(out, (x - sg * oracle.eps(x, t)) / a, rtol=1e-14, atol=0)
    # independent Tweedie: Σ_k r_k [m_k + α s_k² / (α² s_k² + σ²) (x − α m_k)]
    a3, s3 = a[:, None], sg[:, None]
    var = a3**2 * stds[None] ** 2 + s3**2  # (B, K, D)
    logp = torch.log(w / w.sum())[None] + (
        -0.5 * (x[:, None] - a3 * means[None]) ** 2 / var - 0.5 * torch.log(var)
    ).sum(-1)
    r = torch.softmax(logp, 1)[..., None]
    post = means[None] + a3 * stds[None] ** 2 / var * (x[:, None] - a3 * means[None])
    torch.testing.assert_close(out, (r * post).sum(1), rtol=1e-9, atol=1e-9)


def test_mixture_sample_moments():
    s = VPLinear()
    oracle, w, means, stds = _mixture(s, (3,), k=3, diagonal=True)
    n = 20000
    x = oracle.sample(n, generator=torch.Generator().manual_seed(19))
    assert x.shape == (n, 3) and x.dtype == F64
    p = (w / w.sum())[:, None]
    mean = (p * means).sum(0)
    var = (p * (stds**2 + means**2)).sum(0) - mean**2
    assert ((x.mean(0) - mean).abs() < 5 * torch.sqrt(var / n)).all()


# ----------------------------------------------------------------------------------------------------
# EmpiricalOracle
# ----------------------------------------------------------------------------------------------------
def empirical_eps_direct(x, t, s, data):
    """ε = (x − α Σ_n r_n y_n)/σ, r = softmax_n(−‖x − α y_n‖²/(2σ²)), by explicit differences."""
    a = s.alpha(t)[:, None, None]
    sg = s.sigma(t)[:, None, None]
    xf = x.reshape(len(x), 1, -1)
    diff = xf - a * data.reshape(1, len(data), -1)  # (B, N, D)
    r = torch.softmax(-(diff**2).sum(-1) / (2 * sg[..., 0] ** 2), dim=1)  # (B, N)
    return ((r[..., None] * diff).sum(1) / sg[:, 0]).reshape(x.shape)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("chunk", [3, 256])
def test_empirical_eps(name, chunk):
    s = SCHEDULES[name]
    g = torch.Generator().manual_seed(20)
    data = torch.randn(5, 4, dtype=F64, generator=g)
    oracle = EmpiricalOracle(s, data, chunk=chunk)
    b = 8  # larger than chunk = 3: three chunks, the last one partial
    t = torch.exp(torch.linspace(math.log(s.t_min), math.log(s.t_max), b, dtype=F64))[torch.randperm(b, generator=g)]
    # between two points, so that responsibilities are mixed at moderate t
    x = _col(s.alpha(t), torch.zeros(b, 4)) * 0.5 * (data[0] + data[3]) + _col(
        s.sigma(t), torch.zeros(b, 4)
    ) * torch.randn(b, 4, dtype=F64, generator=g)
    out = oracle.eps(x, t)
    assert out.shape == x.shape and out.dtype == F64
    ref = empirical_eps_direct(x, t, s, data)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    # same as a zero-width uniform mixture (the parent class's formula)
    mix = GaussianMixtureOracle(s, torch.ones(5), data, torch.zeros(5))
    torch.testing.assert_close(out, mix.eps(x, t), rtol=1e-9, atol=1e-9)


def test_empirical_eps_image_shape_and_chunking():
    s = VPLinear()
    g = torch.Generator().manual_seed(21)
    data = torch.randn(5, 1, 2, 2, dtype=F64, generator=g)
    x = torch.randn(7, 1, 2, 2, dtype=F64, generator=g)
    t = torch.linspace(0.05, 0.95, 7, dtype=F64)
    out3 = EmpiricalOracle(s, data, chunk=3).eps(x, t)
    out_all = EmpiricalOracle(s, data, chunk=256).eps(x, t)
    assert out3.shape == x.shape
    torch.testing.assert_close(out3, out_all, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out3, empirical_eps_direct(x, t, s, data), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["vp-linear", "edm"])
def test_empirical_denoiser_snaps_to_data_at_small_t(name):
    s = SCHEDULES[name]
    g = torch.Generator().manual_seed(22)
    data = torch.randn(5, 4, dtype=F64, generator=g)
    oracle = EmpiricalOracle(s, data, chunk=3)
    t = torch.full((5,), s.t_min, dtype=F64)
    a, sg = float(s.alpha(s.t_min)), float(s.sigma(s.t_min))
    x = a * data + 0.5 * sg * torch.randn(5, 4, dtype=F64, generator=g)  # near α y_k for k = 0..4
    den = oracle.denoise(x, t)
    torch.testing.assert_close(den, data, rtol=1e-9, atol=1e-9)
    # and ε recovers the injected noise
    torch.testing.assert_close(oracle.eps(x, t), (x - a * data) / sg, rtol=1e-8, atol=1e-8)
