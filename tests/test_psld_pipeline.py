"""DSNO on a PSLD teacher: `opdiff teacher train`, `collect`, `train`, `sample` and `bench` with a phase-space
(PSLD) `opdiff-unet` (2C channels in and out; the sample is the x half).

References are independent of the code under test: the HSM kernel's mean map and covariance written out here
from the PSLD paper's closed forms (not ``schedules.PSLD``), the per-seed PSLD noise rule written out again, a
direct ``solve`` on that noise, the plain teacher network evaluated item by item, and hand-computed losses.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.adapter import DSNO
from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig, output_indices
from operator_diffusion.collection_store import INFO_NAME, item_shape, read_shard
from operator_diffusion.images import to_uint8
from operator_diffusion.schedules import PSLD, time_grid
from operator_diffusion.solvers import solve
from operator_diffusion.teacher import denoising_loss, hsm_loss, sample_times
from operator_diffusion.training import TrainConfig, load_run, reset_accelerate_state, time_weights, train

runner = CliRunner()
SHAPE = (1, 8, 8)  # the data: C = 1; the state has 2 channels
BETA, GAMMA, NU, KAPPA = 8.0, 0.01, 4.01, 0.04  # PSLD's CIFAR-10 configuration (schedules.PSLD's defaults)
MASS_INV = (GAMMA - NU) ** 2 / 4  # critical damping: M⁻¹ = 4
CONFIG = CollectConfig(num=8, steps=12, shard_size=8, batch_size=8)  # solver, steps' grid: the PSLD defaults


def kernel(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Φ(t), Σ(t)) of the HSM kernel for constant β (PSLD paper / code ``_mean``, ``_cov``), float64 (..., 2, 2):
    p(z_t | x₀) = N(Φ (x₀, 0), Σ) with Σ from Σ₀ = diag(0, κM)."""
    b = BETA * t.double()
    g, nu, mi, m = GAMMA, NU, MASS_INV, 1 / MASS_INV
    c = torch.exp(-(g + nu) * b / 4)
    phi = torch.stack(
        [
            torch.stack([c * (1 + (nu - g) * b / 4), c * mi * b / 2], -1),
            torch.stack([-c * b / 2, c * (1 + (g - nu) * b / 4)], -1),
        ],
        -2,
    )
    c2, e, mm0 = c**2, torch.exp((g + nu) * b / 2), KAPPA * m
    xx = c2 * (mm0 * mi**2 * b**2 / 4 - mi * b**2 / 2 + (g - nu) * b / 2 + e - 1)
    xm = c2 * (mm0 * mi * ((g - nu) * b**2 / 8 + b / 2) + (nu - g) * b**2 / 4)
    mm = c2 * (mm0 * (1 + (g - nu) * b / 2 + mi * b**2 / 4) - b**2 / 2 + m * (nu - g) * b / 2 + m * (e - 1))
    return phi, torch.stack([torch.stack([xx, xm], -1), torch.stack([xm, mm], -1)], -2)


def noise(seeds) -> torch.Tensor:
    """z_T by the documented PSLD rule, written out again: x, then m = √M·ε from the seed's generator."""
    zs = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        x = torch.randn(SHAPE, generator=g)
        m = torch.randn(SHAPE, generator=g) * math.sqrt(1 / MASS_INV)
        zs.append(torch.cat([x, m]))
    return torch.stack(zs)


def teacher(seed: int = 0):
    """A tiny PSLD U-Net on 1×8×8 data with every parameter perturbed (its zero output conv would give ε ≡ 0)."""
    torch.manual_seed(seed)
    bb = load_backbone("opdiff-unet", preset="tiny", in_channels=1, schedule="psld")
    with torch.no_grad():
        for p in bb.network.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bb.eval()


def stored(path: Path) -> dict[str, np.ndarray]:
    shape = item_shape(json.loads((path / INFO_NAME).read_text())["collection"])
    shards = [read_shard(p, shape) for p in sorted((path / "data").glob("train-*.parquet"))]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    reset_accelerate_state()


@pytest.fixture(scope="module")
def bb():
    return teacher()


@pytest.fixture(scope="module")
def pipeline(bb, tmp_path_factory):
    """A PSLD teacher checkpoint, its default collection (8 trajectories) and a DSNO run of 8 steps on it."""
    root = tmp_path_factory.mktemp("psld")
    ckpt = root / "teacher.safetensors"
    bb.save_weights(ckpt)
    collect(bb, root / "data", CONFIG, checkpoint=ckpt, process_index=0, num_processes=1)
    cfg = TrainConfig(
        data=str(root / "data"),
        out=str(root / "run"),
        init_from=str(ckpt),
        batch_size=8,
        max_steps=8,
        save_every=4,
        log_every=1,
        warmup=2,
        lr=2e-3,
        ema=0.5,
    )
    train(cfg)
    reset_accelerate_state()
    return {"teacher": ckpt, "data": root / "data", "run": root / "run", "config": cfg}


# --------------------------------------------------------------------------------------------------
# Pure parts: the teacher's HSM loss, DSNO's loss weights
# --------------------------------------------------------------------------------------------------
def test_hsm_loss_matches_a_hand_computation(bb):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, *SHAPE, generator=g) * 2 - 1
    eps = torch.randn(3, 2, 8, 8, generator=g)
    t = torch.tensor([1e-5, 0.1, 1.0])
    phi, sigma = kernel(t)
    l00 = torch.sqrt(sigma[:, 0, 0] + 1e-9)  # Cholesky of Σ + 1e-9·I, by hand
    l10 = sigma[:, 1, 0] / l00
    l11 = torch.sqrt(sigma[:, 1, 1] + 1e-9 - l10**2)
    r = lambda v: v[:, None, None, None]  # noqa: E731
    x, e_x, e_m = x0.double(), eps[:, :1].double(), eps[:, 1:].double()
    z = torch.cat([r(phi[:, 0, 0]) * x + r(l00) * e_x, r(phi[:, 1, 0]) * x + r(l10) * e_x + r(l11) * e_m], 1)
    with torch.no_grad():
        out = bb(z.float(), t).double()
        expected = float(((out - eps.double()) ** 2).mean())
        w = torch.tensor([0.5, 2.0, 1.0])
        weighted = sum(float(w[i]) * float(((out[i] - eps[i].double()) ** 2).mean()) for i in range(3)) / 3
        assert float(hsm_loss(bb, x0, t, eps)) == pytest.approx(expected, rel=1e-5)
        assert float(denoising_loss(bb, x0, t, eps, weight=w)) == pytest.approx(weighted, rel=1e-5)  # dispatches to HSM
    ts = sample_times(PSLD(), 10_000, generator=torch.Generator().manual_seed(0))
    assert 1e-5 <= float(ts.min()) < 1e-3 and float(ts.max()) <= 1.0  # the PSLD code's U[1e-5, 1]


def test_sqrt_snr_weights_are_those_of_the_data_channel():
    t = torch.tensor([1.0, 0.5, 0.2, 0.05, 1e-3], dtype=torch.float64)
    phi, sigma = kernel(t)
    ratio = phi[:, 0, 0] / torch.sqrt(sigma[:, 0, 0] + 1e-9)  # x_t = Φ₀₀x₀ + L₀₀ε_x: α/σ of x
    torch.testing.assert_close(time_weights(PSLD(), t, "sqrt-snr"), ratio.clamp(1, 1e4), rtol=1e-10, atol=0)
    torch.testing.assert_close(
        time_weights(PSLD(), t, "snr", 0.5, 100.0), (ratio**2).clamp(0.5, 100.0), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(time_weights(PSLD(), t, "uniform"), torch.ones_like(t))
    assert float(ratio[0]) < 1 < float(ratio[-1])  # both clamps are in play on the sampling range


# --------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------
def test_collection_stores_the_data_channels_of_a_direct_solve_on_the_seed_noise(bb, pipeline, tmp_path):
    info = json.loads((pipeline["data"] / INFO_NAME).read_text())["collection"]
    assert (info["solver"], info["solver_options"], info["steps"], info["grid"]) == (
        "csps-d",
        {"lam": -0.25, "variant": "se"},
        12,
        "quadratic",
    )
    assert info["schedule"]["name"] == "psld" and info["image_shape"] == [1, 8, 8] and "PSLD.prior" in info["noise"]
    assert info["nfe_per_trajectory"] == 13  # one per step and the final x̂_0
    ts = time_grid(PSLD(), 12, "quadratic")
    idx = output_indices(12, 4, "quadratic")
    z = noise(range(8))
    with torch.no_grad():
        ref = solve(bb.eps_fn, z, PSLD(), ts, "csps-d", lam=-0.25, record=idx)
    got = torch.from_numpy(stored(pipeline["data"])["trajectory"].astype(np.float32))
    assert got.shape == (8, 4, *SHAPE) and ref.denoised.shape == got.shape
    torch.testing.assert_close(got, ref.denoised.half().float(), rtol=0, atol=0)
    assert got.abs().max() > 0.1  # not a trivial teacher
    # target=state: the x half of the states z(t_i), stored with C channels
    collect(
        bb,
        tmp_path / "s",
        replace(CONFIG, num=3, batch_size=3, target="state", dtype="float32"),
        process_index=0,
        num_processes=1,
    )
    with torch.no_grad():
        states = solve(bb.eps_fn, z[:3], PSLD(), ts, "csps-d", lam=-0.25, record=idx, record_denoised=False).states
    assert states.shape == (3, 4, 2, 8, 8)
    torch.testing.assert_close(torch.from_numpy(stored(tmp_path / "s")["trajectory"]), states[:, :, :1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(solver="sscs"), "'sscs' is stochastic: .* DSNO learns a deterministic map .* euler, lambda-ddim"),
        (dict(solver="unipc"), "unknown solver 'unipc' for the psld schedule"),
        (dict(grid="logsnr"), "grid kind 'logsnr' needs an α/σ schedule"),
    ],
)
def test_collection_refusals(bb, tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        collect(bb, tmp_path / "c", replace(CONFIG, **change), process_index=0, num_processes=1)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------------
# DSNO
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_zero_init_dsno_is_the_x_half_of_the_teacher_network_item_by_item(bb):
    times = [0.75, 0.5, 0.25, 1e-3]
    model = DSNO(bb, times, modes=2, init="zero")
    z = noise([3, 4, 5])
    out = model(z)
    assert out.shape == (3, 4, *SHAPE)
    ref = torch.stack([bb(z, torch.full((3,), t))[:, :1] for t in times], dim=1)  # the network's x half at (z_T, t_i)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.sample(z), out[:, -1])
    base = DSNO(bb, times, baseline=True)
    torch.testing.assert_close(base(z), bb(z, torch.full((3,), 1e-3))[:, None, :1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\) \(a PSLD state"):
        model(torch.randn(3, *SHAPE))


# --------------------------------------------------------------------------------------------------
# Training, sampling, bench
# --------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_on_a_fixed_batch_and_resumes(pipeline, tmp_path):
    rows = [json.loads(line) for line in (pipeline["run"] / "metrics.jsonl").read_text().splitlines()]
    # batch = the whole 8-trajectory set: the same batch every step. The loss is ~1e4: a random PSLD network's
    # trajectories grow ~1/Φ₀₀(1) ≈ 350× (nothing holds them to the data), so it falls slowly but steadily.
    losses = [r["loss"] for r in rows]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 50, losses
    model, info = load_run(pipeline["run"])
    assert model.backbone.schedule == PSLD() and info["collection"]["schedule"]["name"] == "psld"
    # resume: 4 steps, then on to 8, gives the uninterrupted run's losses
    cfg = replace(pipeline["config"], out=str(tmp_path / "r"), max_steps=4)
    train(cfg)
    reset_accelerate_state()
    result = train(replace(cfg, max_steps=8))
    assert result.resumed_from == 4
    again = [json.loads(line)["loss"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx(losses, rel=1e-5)
    # a student without the teacher's PSLD schedule is refused
    with pytest.raises(ValueError, match="needs the teacher's PSLD schedule"):
        train(
            replace(
                pipeline["config"], out=str(tmp_path / "vp"), init_from=None, backbone_options={"schedule": "vp-linear"}
            )
        )


def test_sample_writes_the_x_half_of_dsno_and_the_teachers_solution(pipeline, bb, tmp_path):
    res = runner.invoke(
        app,
        [
            "sample",
            str(pipeline["run"]),
            "--out",
            str(tmp_path / "s"),
            "--seeds",
            "20-22,40",
            "--format",
            "npz",
            "--teacher",
            "--batch-size",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    z = noise([20, 21, 22, 40])
    model, _ = load_run(pipeline["run"])
    with torch.no_grad():
        dsno = model(z)[:, -1]  # (4, 1, 8, 8): the x half at t_M
        ts = time_grid(PSLD(), 12, "quadratic")
        teach = solve(bb.eps_fn, z, PSLD(), ts, "csps-d", lam=-0.25, record=[12]).denoised[:, 0]
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert npz["seeds"].tolist() == [20, 21, 22, 40] and npz["images"].shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(npz["images"], to_uint8(dsno[:, None])[:, 0])
    tnpz = np.load(tmp_path / "s" / "teacher" / "samples.npz")
    assert np.abs(tnpz["images"].astype(int) - to_uint8(teach[:, None])[:, 0].astype(int)).max() <= 1  # float round-off


def test_bench_compares_with_the_psld_solvers(pipeline):
    res = runner.invoke(app, ["bench", str(pipeline["run"]), "--seeds", "30-33", "--nfe", "1,3,6", "--json"])
    assert res.exit_code == 0, res.output
    rows = {(r["method"], r["nfe"]): r for r in json.loads(res.stdout)["rows"]}
    assert rows[("teacher reference", 13)]["rmse"] == 0.0 and ("DSNO", 1) in rows and ("teacher x̂₀(x_T)", 1) in rows
    assert {m for m, _ in rows} >= {"euler", "lambda-ddim", "rse", "csps-d"}
    for args, message in (
        (["--solvers", "sscs"], "'sscs' is stochastic"),
        (["--solvers", "unipc"], "unknown --solvers unipc for the psld teacher; valid: euler"),
        (["--grid", "logsnr"], "needs an α/σ schedule"),
    ):
        bad = runner.invoke(app, ["bench", str(pipeline["run"]), "--num", "2", *args])
        assert bad.exit_code == 2 and message in " ".join(bad.stderr.split()) and bad.stderr.count("\n") == 1, (
            bad.output
        )


# --------------------------------------------------------------------------------------------------
# The command line from a PSLD teacher of one's own
# --------------------------------------------------------------------------------------------------
def test_teacher_train_then_collect_a_psld_teacher_and_refusals(tmp_path):
    args = [
        "teacher",
        "train",
        "--data",
        "digits",
        "--num",
        "32",
        "-o",
        "preset=tiny",
        "-o",
        "in_channels=1",
        "-o",
        "schedule=psld",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--warmup",
        "1",
    ]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "t")])
    assert ok.exit_code == 0, ok.output
    cfg = json.loads((tmp_path / "t" / "teacher.json").read_text())["backbone"]
    assert cfg["schedule"]["name"] == "psld" and cfg["in_channels"] == 1
    line = next(l for l in ok.output.splitlines() if l.startswith("next: "))
    cmd = [str(tmp_path / "traj") if c == "TRAJECTORIES" else "2" if c == "N" else c for c in shlex.split(line[6:])[1:]]
    assert "schedule=psld" in cmd
    collected = runner.invoke(app, [*cmd, "--steps", "6", "--times", "2"])
    assert collected.exit_code == 0, collected.output
    info = json.loads((tmp_path / "traj" / INFO_NAME).read_text())["collection"]
    assert (info["solver"], info["schedule"]["name"], info["image_shape"]) == ("csps-d", "psld", [1, 8, 8])
    refusals = [
        (
            ["teacher", "train", *args[2:], "--prediction", "x0", "--out", str(tmp_path / "x0")],
            "prediction must be 'eps'",
        ),
        (
            [*cmd[:-2], "--out", str(tmp_path / "sde"), "--solver", "sscs", "--steps", "6", "--times", "2"],
            "'sscs' is stochastic",
        ),
        (
            [*cmd[:-2], "--out", str(tmp_path / "lg"), "--grid", "logsnr", "--steps", "6", "--times", "2"],
            "needs an α/σ schedule",
        ),
    ]
    for argv, message in refusals:
        res = runner.invoke(app, argv)
        assert res.exit_code == 2, (argv, res.output)
        assert message in " ".join(res.stderr.split()) and res.stderr.count("\n") == 1, res.stderr
    assert not any((tmp_path / d).exists() for d in ("x0", "sde", "lg"))
