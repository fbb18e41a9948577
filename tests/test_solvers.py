"""Solver identities, coefficients against quadrature, exact Gaussian flow, recording, NFE and bad input."""

import math

import pytest
import torch
from scipy.integrate import quad

from operator_diffusion.oracles import GaussianMixtureOracle, GaussianOracle
from operator_diffusion.prediction import classifier_free_guidance
from operator_diffusion.schedules import EDM, DiscreteVP, VPCosine, VPLinear, time_grid
from operator_diffusion.solvers import NonFiniteError, SolverStep, available_solvers, solve, solver_info
from operator_diffusion.solvers.base import Grid
from operator_diffusion.solvers.deis import deis_coefficients

SCHEDULES = [VPLinear(), VPCosine(), DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000)), EDM()]


def mixture(schedule, dim=3):
    g = torch.Generator().manual_seed(3)
    return GaussianMixtureOracle(
        schedule,
        torch.tensor([0.2, 0.5, 0.3]),
        torch.randn(3, dim, generator=g, dtype=torch.float64),
        torch.tensor([0.3, 0.5, 0.4]),
    )


def noise(schedule, shape=(6, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=torch.float64, generator=g) * float(schedule.sigma(torch.tensor(schedule.t_max)))


def test_registry_lists_every_method():
    assert available_solvers() == ["ddim", "deis", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc", "heun", "lambda-ddim"]
    # lower_order_final=None: on below 15 steps, as diffusers (tests/test_bench.py checks the rule)
    assert solver_info("deis").options == {"order": 3, "variant": "tab", "lower_order_final": None}


# ---------------------------------------------------------------- identities (the DDIM family)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["uniform", "logsnr", "quadratic"])
def test_ddim_family_identity(schedule, kind):
    """DDIM = tAB-DEIS order 0 = λ-DDIM(λ=0) = UniP-1 without corrector = DPM-Solver++ at order 1 (to 1e-10)."""
    oracle = mixture(schedule)
    x, ts = noise(schedule), time_grid(schedule, 12, kind)
    ref = solve(oracle.eps, x, schedule, ts, "ddim").sample
    others = [
        solve(oracle.eps, x, schedule, ts, "deis", order=0).sample,
        solve(oracle.eps, x, schedule, ts, "deis", order=0, variant="rho").sample,
        solve(oracle.eps, x, schedule, ts, "lambda-ddim", lam=0.0).sample,
        solve(oracle.eps, x, schedule, ts, "unipc", order=1, corrector=False).sample,
        solve(oracle.eps, x, schedule, ts, "ipndm", order=1).sample,
    ]
    for o in others:
        torch.testing.assert_close(o, ref, rtol=0, atol=1e-10)


def test_ddim_is_exact_euler_of_rescaled_ode():
    """One DDIM step written independently: x̃_t = x̃_s + (ρ_t − ρ_s) ε(x_s) on x̃ = x/α."""
    s = VPLinear()
    oracle = mixture(s)
    x = noise(s)
    ts = torch.tensor([0.8, 0.3], dtype=torch.float64)
    a, sig = torch.exp(-0.25 * ts**2 * 19.9 - 0.05 * ts), None
    sig = torch.sqrt(1 - a**2)
    eps = oracle.eps(x, ts[:1].expand(len(x)))
    expected = a[1] * (x / a[0] + (sig[1] / a[1] - sig[0] / a[0]) * eps)
    torch.testing.assert_close(solve(oracle.eps, x, s, ts, "ddim").sample, expected, rtol=0, atol=1e-12)


def test_ipndm_equals_rho_ab_deis_on_uniform_rho_grid():
    """On a grid uniform in ρ the fixed AB weights are the exact ρAB-DEIS coefficients."""
    s = VPLinear()
    oracle = mixture(s)
    rho = torch.linspace(float(s.rho(torch.tensor(1.0))), float(s.rho(torch.tensor(1e-3))), 16, dtype=torch.float64)
    ts = s.t_from_log_snr(-torch.log(rho))
    ts[0], ts[-1] = 1.0, 1e-3
    x = noise(s)
    a = solve(oracle.eps, x, s, ts, "ipndm", order=4).sample
    b = solve(oracle.eps, x, s, ts, "deis", order=3, variant="rho").sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_multistep_first_step_is_ddim():
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 1)
    ref = solve(oracle.eps, x, s, ts, "ddim").sample
    for m in ["deis", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc"]:
        torch.testing.assert_close(solve(oracle.eps, x, s, ts, m).sample, ref, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- DEIS coefficients


def _vp_linear_drho_dt(t, b0=0.1, b1=20.0):
    """dρ/dt for the linear VP, written from scratch: ρ = sqrt(e^{2B} − 1), B(t) = ¼t²(b1−b0) + ½tb0."""
    B = 0.25 * t * t * (b1 - b0) + 0.5 * t * b0
    dB = 0.5 * t * (b1 - b0) + 0.5 * b0
    return math.exp(2 * B) * dB / math.sqrt(math.expm1(2 * B))


@pytest.mark.parametrize("r", [0, 1, 2, 3])
@pytest.mark.parametrize("i", [3, 7, 11])
def test_deis_coefficients_match_quadrature_in_t(r, i):
    """C_j = α_t ∫_{t_i}^{t_{i+1}} ℓ_j(τ) dρ/dτ dτ by adaptive quadrature in t, against the Gauss–Legendre-in-λ code."""
    s = VPLinear()
    grid = Grid.build(s, time_grid(s, 12, "quadratic"))
    nodes = [float(grid.t[i - k]) for k in range(r + 1)]

    def ell(j, tau):
        return math.prod((tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(r + 1) if m != j)

    t_s, t_t = float(grid.t[i]), float(grid.t[i + 1])
    expected = [
        float(grid.alpha[i + 1])
        * quad(lambda tau: ell(j, tau) * _vp_linear_drho_dt(tau), t_s, t_t, epsabs=0, epsrel=1e-13)[0]
        for j in range(r + 1)
    ]
    got = deis_coefficients(grid, torch.tensor([i]), r)[0].tolist()
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-13)
    # Σ_j C_j = α_t (ρ_t − ρ_s): the Lagrange basis sums to one
    assert sum(got) == pytest.approx(float(grid.alpha[i + 1] * (grid.rho[i + 1] - grid.rho[i])), rel=1e-12)


# ---------------------------------------------------------------- exact Gaussian flow


@pytest.mark.parametrize("method,options", [("unipc", {"order": 3}), ("dpmpp-3m", {"exact_third_order": True})])
@pytest.mark.parametrize("schedule", [VPLinear(), VPCosine(), EDM()], ids=lambda s: s.name)
def test_exact_gaussian_flow_reproduced(method, options, schedule):
    """A high-order solver at 200 steps reproduces the closed-form Gaussian flow to 1e-6.
    (tAB-DEIS-3 is 4th order too but, interpolating ε in t where ε(t) is sharp near t_min, its constant
    is larger: ~1e-6–3e-6 at 200 log-SNR steps on this oracle; its order is checked in test_solver_orders.)"""
    oracle = GaussianOracle(schedule, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.2, 1.0, 0.7]))
    x_T = noise(schedule)
    ts = time_grid(schedule, 200, "logsnr")
    out = solve(oracle.eps, x_T, schedule, ts, method, **options).sample
    exact = oracle.flow(x_T, schedule.t_max, schedule.t_min)
    assert float((out - exact).abs().max()) < 1e-6


# ---------------------------------------------------------------- recording, callback, NFE


@pytest.mark.parametrize("method", available_solvers())
def test_recorded_states_equal_truncated_runs(method):
    """The state recorded at index k equals the output of the same solver run on ts[:k+1]
    (a multistep method's first k steps do not depend on later grid points)."""
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 10, "logsnr")
    # the property holds without lower-order final steps (they depend on the total count; on by default below 15)
    opts = {"lower_order_final": False} if "lower_order_final" in solver_info(method).options else {}
    out = solve(oracle.eps, x, s, ts, method, record=[0, 4, 7, -1], **opts)
    assert out.recorded == (0, 4, 7, 10)
    assert out.states.shape == (6, 4, 3) and out.denoised.shape == (6, 4, 3)
    torch.testing.assert_close(out.states[:, 0], x, rtol=0, atol=0)
    torch.testing.assert_close(out.states[:, 3], out.sample, rtol=0, atol=0)
    for col, k in [(1, 4), (2, 7)]:
        if method == "unipc":  # the corrector of step k is skipped when k is the final index
            continue
        torch.testing.assert_close(
            out.states[:, col], solve(oracle.eps, x, s, ts[: k + 1], method, **opts).sample, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("method", [m for m in available_solvers() if m != "unipc"])
def test_recorded_denoised_is_the_oracle_denoiser_at_the_state(method):
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 8, "logsnr")
    out = solve(oracle.eps, x, s, ts, method, record=[2, 5, 8])
    for col, k in enumerate(out.recorded):
        expected = oracle.denoise(out.states[:, col], ts[k])
        torch.testing.assert_close(out.denoised[:, col], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "method,nfe",
    [
        ("ddim", 10),
        ("deis", 10),
        ("ipndm", 10),
        ("dpmpp-2m", 10),
        ("dpmpp-3m", 10),
        ("unipc", 10),
        ("heun", 20),
        ("lambda-ddim", 10),
    ],
)
def test_nfe_counts_every_evaluation(method, nfe):
    s = VPLinear()
    oracle = mixture(s)
    calls = []

    def eps_fn(x, t):
        calls.append(len(x))
        return oracle.eps(x, t)

    x, ts = noise(s), time_grid(s, 10, "logsnr")
    out = solve(eps_fn, x, s, ts, method)
    assert out.nfe == nfe == len(calls)
    calls.clear()
    out = solve(eps_fn, x, s, ts, method, denoise_to_zero=True)
    assert out.nfe == nfe + 1 == len(calls)
    # denoise_to_zero returns x̂_0 at the final state
    x_n = solve(eps_fn, x, s, ts, method).sample
    torch.testing.assert_close(out.sample, oracle.denoise(x_n, ts[-1]), rtol=0, atol=1e-12)


def test_callback_sees_every_step_in_order():
    s = VPLinear()
    oracle = mixture(s)
    seen: list[SolverStep] = []
    x, ts = noise(s), time_grid(s, 6, "logsnr")
    out = solve(oracle.eps, x, s, ts, "dpmpp-2m", callback=seen.append, record=[3])
    assert [st.i for st in seen] == list(range(6))
    assert [st.t for st in seen] == ts[:6].tolist()
    torch.testing.assert_close(seen[3].x, out.states[:, 0])
    torch.testing.assert_close(seen[3].denoised, oracle.denoise(seen[3].x, ts[3]), rtol=0, atol=1e-12)


def test_record_without_denoised_costs_no_extra_evaluation():
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 5)
    out = solve(oracle.eps, x, s, ts, "ddim", record=[5], record_denoised=False)
    assert out.nfe == 5 and out.denoised is None
    out = solve(oracle.eps, x, s, ts, "ddim", record=[5])
    assert out.nfe == 6 and out.denoised is not None


def test_float32_state_keeps_dtype_and_time_batch():
    s = VPLinear()
    oracle = mixture(s)
    seen = []

    def eps_fn(x, t):
        seen.append((t.shape, t.dtype))
        return oracle.eps(x.double(), t.double()).float()

    x = noise(s).float()
    out = solve(eps_fn, x, s, time_grid(s, 4), "deis")
    assert out.sample.dtype == torch.float32
    assert seen[0] == (torch.Size([6]), torch.float32)


def test_lower_order_final_changes_only_the_last_steps():
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 8, "logsnr")
    a = solve(oracle.eps, x, s, ts, "deis", order=3, lower_order_final=True, record=[5, 6])
    b = solve(oracle.eps, x, s, ts, "deis", order=3, lower_order_final=False, record=[5, 6])
    torch.testing.assert_close(a.states[:, 0], b.states[:, 0], rtol=0, atol=0)  # steps before N−3 untouched
    assert not torch.equal(a.sample, b.sample)


# ---------------------------------------------------------------- labels and guidance


def test_extra_args_and_classifier_free_guidance_pass_through():
    s = VPLinear()
    oracle = mixture(s)

    def eps_fn(x, t, labels):  # a "conditional" model: shifts ε by the label
        return oracle.eps(x, t) + 0.1 * labels[:, None].to(x)

    x, ts = noise(s), time_grid(s, 5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cond = solve(eps_fn, x, s, ts, "ddim", extra_args={"labels": labels}).sample
    manual = solve(lambda x, t: eps_fn(x, t, labels=labels), x, s, ts, "ddim").sample
    torch.testing.assert_close(cond, manual, rtol=0, atol=0)
    guided = classifier_free_guidance(eps_fn, scale=3.0, null_label=3)
    out = solve(guided, x, s, ts, "ddim", extra_args={"labels": labels}).sample
    direct = solve(
        lambda x, t: eps_fn(x, t, labels=torch.full_like(labels, 3)) + 3.0 * 0.1 * (labels - 3)[:, None].to(x),
        x,
        s,
        ts,
        "ddim",
    ).sample
    torch.testing.assert_close(out, direct, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- bad input


def test_bad_input_errors():
    s = VPLinear()
    oracle = mixture(s)
    x, ts = noise(s), time_grid(s, 5)
    with pytest.raises(ValueError, match="unknown solver 'euler'; valid: ddim, deis, ipndm, dpmpp-2m"):
        solve(oracle.eps, x, s, ts, "euler")
    with pytest.raises(ValueError, match="strictly decreasing; ts\\[1\\]=0.5 is followed by ts\\[2\\]=0.5"):
        solve(oracle.eps, x, s, [1.0, 0.5, 0.5, 0.1], "ddim")
    with pytest.raises(ValueError, match="increasing: pass it reversed"):
        solve(oracle.eps, x, s, ts.flip(0), "ddim")
    with pytest.raises(ValueError, match="outside the range of the vp-linear schedule"):
        solve(oracle.eps, x, s, [1.5, 0.5], "ddim")
    with pytest.raises(ValueError, match="outside the range"):
        solve(oracle.eps, x, s, [1.0, 0.0], "ddim")
    with pytest.raises(ValueError, match="at least 2 times"):
        solve(oracle.eps, x, s, [1.0], "ddim")
    with pytest.raises(ValueError, match="NaN/Inf at index 1"):
        solve(oracle.eps, x, s, [1.0, float("nan")], "ddim")
    with pytest.raises(ValueError, match="solver 'ddim' has no option order; its options: none"):
        solve(oracle.eps, x, s, ts, "ddim", order=2)
    with pytest.raises(ValueError, match="deis order must be 0, 1, 2 or 3"):
        solve(oracle.eps, x, s, ts, "deis", order=5)
    with pytest.raises(ValueError, match="unipc variant must be 'bh1' or 'bh2'"):
        solve(oracle.eps, x, s, ts, "unipc", variant="bh3")
    with pytest.raises(ValueError, match="record index 9 is outside the grid indices 0..5"):
        solve(oracle.eps, x, s, ts, "ddim", record=[9])
    with pytest.raises(ValueError, match="eps_fn returned shape"):
        solve(lambda x, t: x[:, :2], x, s, ts, "ddim")


def test_nan_from_eps_fn_names_step_time_and_items():
    s = VPLinear()
    oracle = mixture(s)

    def eps_fn(x, t):
        e = oracle.eps(x, t)
        if float(t[0]) < 0.5:
            e[2, 1] = float("nan")
            e[4, 0] = float("inf")
        return e

    ts = time_grid(s, 6, "uniform")
    with pytest.raises(NonFiniteError, match=r"NaN/Inf at step 4 \(t=0.334\) for batch items \[2, 4\]") as info:
        solve(eps_fn, noise(s), s, ts, "dpmpp-2m")
    assert info.value.items == [2, 4] and info.value.step == 4  # t_4 = 1 + (4/6)(0.001 − 1) = 0.334
