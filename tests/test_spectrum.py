"""Tests for operator_diffusion.spectrum and `opdiff spectrum` (DSNO Appendix A.1).

References are independent of the code under test: analytic spectra of sinusoids (S_f = A²T/2), Parseval's
identity, the DFT written out as a float64 matrix sum, the Gaussian oracle's affine flow written out from
α_t and σ_t, and Richardson error estimates that follow from each solver's order of convergence.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.schedules import VPLinear
from operator_diffusion.spectrum import (
    REPORT_FILES,
    dense_trajectories,
    energy_weights,
    exact_trajectories,
    modes_for_energy,
    per_trajectory_spectrum,
    power_spectrum,
    refine_grid,
    sample_prior,
    spectrum_from_per_trajectory,
    spectrum_report,
    toy_oracle,
    uniform_times,
)

F64 = torch.float64


def dft(x: torch.Tensor) -> torch.Tensor:
    """X_j = Σ_i x_i e^{−2πi·ji/N} for j = 0 … ⌊N/2⌋ over dim 1 of (B, N, D), as an explicit matrix sum (eq. 12)."""
    n = x.shape[1]
    j, i = torch.arange(n // 2 + 1, dtype=F64)[:, None], torch.arange(n, dtype=F64)[None, :]
    w = torch.exp(-2j * math.pi * j * i / n)  # (J, N) complex128
    return torch.einsum("ji,bid->bjd", w, x.to(torch.complex128))


# ----------------------------------------------------------------------------------------------------
# (1) Analytic spectra and Parseval
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 65])
@pytest.mark.parametrize("f", [1, 5, 31])
def test_sinusoid_puts_all_power_in_its_mode_with_amplitude_a2_t_over_2(n, f):
    dt = 0.01
    gen = torch.Generator().manual_seed(f)
    amp = 0.5 + torch.rand(3, 1, 4, generator=gen, dtype=F64)  # (traj, 1, coords)
    phase = 2 * math.pi * torch.rand(3, 1, 4, generator=gen, dtype=F64)
    i = torch.arange(n, dtype=F64)[None, :, None]
    x = amp * torch.cos(2 * math.pi * f * i / n + phase)  # x(t_i), t_i = iΔ, at frequency f/T
    spec = power_spectrum(x, dt)
    period = n * dt
    expected = torch.zeros(n // 2 + 1, dtype=F64)
    expected[f] = (amp**2).mean() * period / 2  # S_f = (2Δ²/T)(NA/2)² = A²T/2
    torch.testing.assert_close(spec.mean, expected, rtol=1e-12, atol=1e-12)
    per_traj = (amp**2).mean((1, 2)) * period / 2
    assert spec.min[f] == pytest.approx(float(per_traj.min()), rel=1e-12)
    assert spec.max[f] == pytest.approx(float(per_traj.max()), rel=1e-12)
    torch.testing.assert_close(spec.frequencies[f], torch.tensor(f / period, dtype=F64))
    assert modes_for_energy(spec, 0.99) == f + 1


def test_constant_and_nyquist_modes():
    n, dt = 16, 0.1
    c = 0.7
    x = torch.stack([torch.full((n,), c, dtype=F64), (-1.0) ** torch.arange(n, dtype=F64)])[:, :, None]
    s = per_trajectory_spectrum(x, dt)
    t = n * dt
    assert s[0, 0] == pytest.approx(2 * t * c**2, rel=1e-13) and s[0, 1:].abs().max() < 1e-25
    assert s[1, -1] == pytest.approx(2 * t, rel=1e-13) and s[1, :-1].abs().max() < 1e-25


@pytest.mark.parametrize("n", [32, 33])
def test_parseval_weighted_power_equals_time_domain_energy(n):
    dt = 0.03
    x = torch.randn(5, n, 2, 3, generator=torch.Generator().manual_seed(n), dtype=F64)
    s = per_trajectory_spectrum(x, dt)  # (5, J)
    energy = dt * (x**2).sum(1).mean((1, 2))  # Δ Σ_i x_i², averaged over coordinates
    torch.testing.assert_close((energy_weights(n) * s).sum(1), energy, rtol=1e-12, atol=0)
    # eq. 13 against the explicit DFT sum
    torch.testing.assert_close(
        s, 2 * dt**2 / (n * dt) * dft(x.reshape(5, n, -1)).abs().pow(2).mean(2), rtol=1e-11, atol=0
    )


def test_linearity_spectrum_scales_quadratically_and_adds_over_disjoint_modes():
    n, dt = 40, 0.05
    i = torch.arange(n, dtype=F64)[None, :, None]
    a, b = torch.cos(2 * math.pi * 2 * i / n), torch.sin(2 * math.pi * 7 * i / n)
    sa, sb, sab = (per_trajectory_spectrum(v, dt) for v in (a, b, 3 * a - 2 * b))
    torch.testing.assert_close(sab, 9 * sa + 4 * sb, rtol=1e-12, atol=1e-12)


def test_energy_fraction_is_one_minus_relative_truncation_error():
    """Keeping rfft modes 0 … J−1 of every trajectory leaves 1 − energy_fraction[J−1] of Σ x² as squared error."""
    n, dt = 50, 0.02
    x = torch.cumsum(torch.randn(4, n, 6, generator=torch.Generator().manual_seed(1), dtype=F64), 1)
    spec = power_spectrum(x, dt)
    for keep in (1, 2, 5, 13):
        coef = torch.fft.rfft(x, dim=1)
        coef[:, keep:] = 0
        err = (x - torch.fft.irfft(coef, n=n, dim=1)).pow(2).sum()
        assert float(err / x.pow(2).sum()) == pytest.approx(
            1 - float(spec.energy_fraction[keep - 1]), rel=1e-9, abs=1e-14
        )


# ----------------------------------------------------------------------------------------------------
# (2) The Gaussian oracle: closed form, and the solver path against it
# ----------------------------------------------------------------------------------------------------
def gaussian_affine_flow(schedule, times, mean, std):
    """x_d(t) = a_d(t) + A_d(t)·x_T,d: A = c_t/c_T, a = α_t μ − A α_T μ, c_t = (α_t² s² + σ_t²)^{1/2}; (N, D) each."""
    al, sg = schedule.alpha(times)[:, None], schedule.sigma(times)[:, None]
    c = torch.sqrt(al**2 * std**2 + sg**2)
    big_a = c / c[0]
    return al * mean - big_a * al[0] * mean, big_a


@pytest.mark.parametrize("n", [4, 64, 101])
def test_gaussian_oracle_spectrum_matches_closed_form_from_the_dft_of_a(n):
    oracle = toy_oracle("gaussian", 12, seed=3)
    x_T = sample_prior(oracle, 6, torch.Generator().manual_seed(0))
    traj = exact_trajectories(oracle, x_T, n)
    spec = power_spectrum(traj.values, traj.dt)
    times = uniform_times(oracle.schedule, n)
    a, big_a = gaussian_affine_flow(oracle.schedule, times, oracle.mean, oracle.std)
    x_hat = dft(a[None]) + dft(big_a[None]) * x_T[:, None, :]  # X_j = â_j + Â_j x_T (linearity of eq. 12)
    dt = float(times[0] - times[-1]) / (n - 1)
    per_traj = 2 * dt**2 / (n * dt) * x_hat.abs().pow(2).mean(2)
    torch.testing.assert_close(spec.per_trajectory, per_traj, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(spec.mean, per_traj.mean(0), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(spec.max, per_traj.max(0).values, rtol=1e-10, atol=1e-14)


def test_exact_denoised_trajectory_is_the_posterior_mean():
    oracle = toy_oracle("gaussian", 5, seed=4)
    x_T = sample_prior(oracle, 3, torch.Generator().manual_seed(1))
    states, den = (exact_trajectories(oracle, x_T, 20, w).values for w in ("state", "denoised"))
    times = uniform_times(oracle.schedule, 20)
    al, sg = oracle.schedule.alpha(times)[None, :, None], oracle.schedule.sigma(times)[None, :, None]
    v = oracle.std**2
    post = oracle.mean + al * v / (al**2 * v + sg**2) * (states - al * oracle.mean)  # E[x_0 | x_t], Gaussian
    torch.testing.assert_close(den, post, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "mixture"])
@pytest.mark.parametrize("what", ["state", "denoised"])
@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpmpp-2m", 2)])
def test_solver_path_agrees_with_exact_path_within_its_richardson_bound(kind, what, solver, order):
    """With error ≈ C hᵖ, ‖y_{2k} − y*‖ ≈ ‖y_k − y_{2k}‖/(2ᵖ − 1): the solver's order bounds its own error."""
    n = 48
    oracle = toy_oracle(kind, 8, seed=5)
    x_T = sample_prior(oracle, 4, torch.Generator().manual_seed(2))
    exact = exact_trajectories(oracle, x_T, n, what)
    y2, y4 = (dense_trajectories(oracle.eps, oracle.schedule, x_T, n, solver, k, what=what) for k in (2, 4))
    assert y4.nfe == 4 * (n - 1) + (what == "denoised")
    torch.testing.assert_close(y4.times, exact.times, rtol=0, atol=0)
    err = float((y4.values - exact.values).abs().max())
    estimate = float((y2.values - y4.values).abs().max()) / (2**order - 1)
    assert 0.5 * estimate < err < 1.5 * estimate, (err, estimate)
    # and the spectra: |S_j(y) − S_j(x)| ≤ (2Δ/N)|X_j − Y_j|(|X_j| + |Y_j|) ≤ 2Δ·max|y − x|·(|X_j| + |Y_j|)
    sy, sx = (power_spectrum(v, y4.dt) for v in (y4.values, exact.values))
    mags = dft(y4.values.reshape(4, n, -1)).abs() + dft(exact.values.reshape(4, n, -1)).abs()
    bound = 2 * y4.dt * err * mags.mean((0, 2))
    assert bool(((sy.mean - sx.mean).abs() <= bound * (1 + 1e-9)).all())


def test_refine_grid_keeps_the_output_times_and_steps_uniformly_in_log_snr():
    s = VPLinear()
    ts = uniform_times(s, 11)
    assert torch.allclose(ts[:-1] - ts[1:], torch.full((10,), (s.t_max - s.t_min) / 10, dtype=F64), rtol=1e-12, atol=0)
    fine = refine_grid(s, ts, 3)
    assert len(fine) == 31 and torch.equal(fine[::3], ts)
    lam = s.log_snr(fine).reshape(-1)[:-1].reshape(10, 3)
    d = lam.diff(dim=1)
    torch.testing.assert_close(d[:, 0], d[:, 1], rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="steps_per_interval"):
        refine_grid(s, ts, 0)


# ----------------------------------------------------------------------------------------------------
# (3) modes_for_energy and the summary
# ----------------------------------------------------------------------------------------------------
def spectrum_with_energies(energies: list[float], n: int = 16, dt: float = 0.1):
    """A one-trajectory spectrum whose modes hold exactly ``energies`` (w_j S_j = e_j)."""
    e = torch.zeros(n // 2 + 1, dtype=F64)
    e[: len(energies)] = torch.tensor(energies, dtype=F64)
    return spectrum_from_per_trajectory((e / energy_weights(n))[None], dt, n)


@pytest.mark.parametrize("fraction,modes", [(0.5, 1), (0.8, 2), (0.9, 3), (0.95, 3), (0.951, 4), (0.99, 4), (1.0, 5)])
def test_modes_for_energy_on_constructed_spectra(fraction, modes):
    spec = spectrum_with_energies([0.5, 0.3, 0.15, 0.04, 0.01])
    torch.testing.assert_close(spec.energy_fraction[:5], torch.tensor([0.5, 0.8, 0.95, 0.99, 1.0], dtype=F64))
    assert modes_for_energy(spec, fraction) == modes


def test_modes_for_energy_counts_the_nyquist_mode_at_half_weight():
    spec = spectrum_with_energies([0.0] * 8 + [1.0])  # n = 16: all energy in mode 8 = N/2
    assert spec.mean[8] == pytest.approx(2.0) and modes_for_energy(spec, 0.5) == 9


def test_bad_inputs_raise():
    spec = spectrum_with_energies([1.0])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="energy fraction"):
            modes_for_energy(spec, bad)
    with pytest.raises(ValueError, match="no energy"):
        power_spectrum(torch.zeros(2, 8, 3), 0.1)
    with pytest.raises(ValueError, match="NaN"):
        power_spectrum(torch.full((2, 8), float("nan")), 0.1)
    with pytest.raises(ValueError, match="dt"):
        power_spectrum(torch.ones(2, 8), 0.0)
    with pytest.raises(ValueError, match="trajectory quantity"):
        exact_trajectories(toy_oracle("gaussian", 2), torch.zeros(1, 2), 8, "noise")
    with pytest.raises(ValueError, match="unknown oracle"):
        toy_oracle("laplace", 2)


def test_report_writes_csv_json_png_and_refuses_to_overwrite(tmp_path):
    spec = spectrum_with_energies([0.5, 0.3, 0.15, 0.04, 0.01])
    paths = spectrum_report(spec, tmp_path / "out", 0.99, {"teacher": "test"})
    assert sorted(p.name for p in paths.values()) == sorted(REPORT_FILES) and all(
        p.stat().st_size > 0 for p in paths.values()
    )
    doc = json.loads(paths["spectrum.json"].read_text())
    assert doc["recommended_modes"] == 4 and doc["metadata"] == {"teacher": "test"} and len(doc["mean"]) == 9
    lines = paths["spectrum.csv"].read_text().splitlines()
    assert lines[0] == "mode,frequency,mean,min,max,energy_fraction" and len(lines) == 10
    assert paths["spectrum.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        spectrum_report(spec, tmp_path / "out", 0.99)
    spectrum_report(spec, tmp_path / "out", 0.9, overwrite=True)
    assert json.loads(paths["spectrum.json"].read_text())["recommended_modes"] == 3


# ----------------------------------------------------------------------------------------------------
# (4) The command line
# ----------------------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_oracle_end_to_end(tmp_path):
    out = tmp_path / "spec"
    res = runner.invoke(
        app,
        ["spectrum", "--oracle", "gaussian", "--points", "64", "--num", "8", "--dim", "6", "--out", str(out), "--json"],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    saved = json.loads((out / "spectrum.json").read_text())
    assert saved["recommended_modes"] == doc["recommended_modes"] >= 1 and saved["n_points"] == 64
    assert saved["num_trajectories"] == 8 and saved["metadata"]["teacher"] == "oracle:gaussian"
    # the same x_T and oracle through the library give the same number
    oracle = toy_oracle("gaussian", 6, 0)
    traj = exact_trajectories(oracle, sample_prior(oracle, 8, torch.Generator().manual_seed(0)), 64)
    assert doc["recommended_modes"] == modes_for_energy(power_spectrum(traj.values, traj.dt), 0.99)
    table = runner.invoke(app, ["spectrum", "--oracle", "gaussian", "--points", "64", "--num", "8", "--dim", "6"])
    assert table.exit_code == 0 and f"recommended --modes {doc['recommended_modes']}" in table.stdout


def test_cli_tiny_backbone(tmp_path):
    res = runner.invoke(
        app,
        [
            "spectrum",
            "--backbone",
            "opdiff-unet",
            "--backbone-option",
            "preset=tiny",
            "--points",
            "32",
            "--num",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert (
        doc["n_points"] == 32 and doc["metadata"]["nfe"] == 31 and doc["metadata"]["teacher"]["name"] == "opdiff-unet"
    )
    assert (tmp_path / "spectrum.png").is_file()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--oracle", "gaussian", "--points", "15"], "--points must be at least 16"),
        (["--backbone", "no-such-backbone"], "unknown backbone 'no-such-backbone'"),
        (["--oracle", "laplace"], "unknown --oracle"),
        (["--oracle", "gaussian", "--backbone", "opdiff-unet"], "exactly one teacher"),
        ([], "exactly one teacher"),
        (["--oracle", "gaussian", "--energy", "1.5"], "--energy"),
        (["--oracle", "gaussian", "--solver", "rk4"], "unknown --solver"),
        (["--backbone", "opdiff-unet", "--backbone-option", "preset"], "KEY=VALUE"),
        (["--backbone", "opdiff-unet", "--backbone-option", "preset=huge"], "unknown opdiff-unet preset"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, ["spectrum", *args, "--num", "2", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1
    assert not out.exists()


def test_cli_refuses_existing_files_unless_overwrite(tmp_path):
    (tmp_path / "spectrum.json").write_text("mine")
    args = ["spectrum", "--oracle", "gaussian", "--points", "16", "--num", "2", "--dim", "2", "--out", str(tmp_path)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["spectrum.json"] and (
        tmp_path / "spectrum.json"
    ).read_text() == "mine"
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert json.loads((tmp_path / "spectrum.json").read_text())["n_points"] == 16
