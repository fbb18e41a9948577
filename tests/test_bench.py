"""`opdiff bench`: the rows against direct solver calls, NFE counts against counted network calls, the
error falling with NFE on an exact teacher, the metric against its definition, FID wiring, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import reset_accelerate
from test_training import MixtureTeacher
from typer.testing import CliRunner

from operator_diffusion.adapter import DSNO
from operator_diffusion.backbones import register_backbone
from operator_diffusion.bench import BenchSetup, run_bench, steps_for_nfe, teacher_match
from operator_diffusion.images import to_uint8
from operator_diffusion.sampling import TeacherSolver, run_solver
from operator_diffusion.schedules import VPLinear, time_grid
from operator_diffusion.solvers import solve
from operator_diffusion.training import TrainConfig, load_run, train
from operator_diffusion.trajectories import CollectConfig, collect
from opdiff_cli.main import app

SEEDS = list(range(200, 216))


def noise(seeds):
    return torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A DSNO run distilled (briefly) from the exact Gaussian-mixture teacher: checkpoint-free teacher."""
    register_backbone(MixtureTeacher.name, MixtureTeacher)
    root = tmp_path_factory.mktemp("bench")
    collect(MixtureTeacher(), root / "data", CollectConfig(num=32, steps=24, solver="dpmpp-2m", shard_size=32, batch_size=32))
    train(TrainConfig(data=str(root / "data"), out=str(root / "run"), backbone="opdiff-unet",
                      backbone_options={"preset": "tiny", "dropout": 0.0}, batch_size=8, max_steps=4, save_every=4,
                      warmup=1, init="small"))
    reset_accelerate()
    return root / "run"


def test_teacher_match_is_clipped_rmse_and_psnr():
    x = torch.tensor([[0.0, 0.5, 1.5, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[0.1, 0.5, 1.0, -1.0]], dtype=torch.float64)
    rmse, psnr = teacher_match(x, ref)  # after clipping: errors (-0.1, 0, 0, 0)
    assert rmse == pytest.approx(math.sqrt(0.01 / 4), rel=1e-12)
    assert psnr == pytest.approx(10 * math.log10(4 / (0.01 / 4)), rel=1e-12)
    assert teacher_match(ref, ref) == (0.0, math.inf)


@pytest.mark.parametrize("solver, target", [("ddim", "denoised"), ("ddim", "state"), ("heun", "denoised"),
                                            ("heun", "state"), ("unipc", "denoised"), ("dpmpp-3m", "state")])
def test_nfe_of_a_row_is_the_number_of_network_calls(solver, target):
    s = VPLinear()
    found = 0
    for nfe in (2, 3, 5, 8):
        steps = steps_for_nfe(s, solver, nfe, "quadratic", 1e-3, target)
        if steps is None:
            continue
        calls = []

        def eps(x, t, **kw):
            calls.append(len(t))
            return 0.1 * x

        solve(eps, torch.zeros(2, 3), s, time_grid(s, steps, "quadratic"), solver, record=[steps],
              record_denoised=target == "denoised")
        assert len(calls) == nfe, (solver, target, nfe, steps)  # a final x̂_0 is one more call when needed
        found += 1
    assert found >= 2


def test_rows_equal_direct_solves_and_error_falls_with_nfe(mixture_run):
    model, info = load_run(mixture_run)
    teacher = MixtureTeacher()
    reference = run_solver(info, "dpmpp-2m", 200)  # a much finer reference than the collection's 24 steps
    setup = BenchSetup(teacher, reference, SEEDS, None, ("ddim", "unipc"), (1, 2, 5, 10, 20), "quadratic",
                       {"DSNO": model}, None, batch_size=5)
    result = run_bench(setup)
    x = noise(SEEDS).double()
    s = teacher.schedule

    def direct(solver, steps):
        out = solve(teacher.eps_fn, x, s, time_grid(s, steps, "quadratic"), solver, record=[steps], record_denoised=True)
        return out.denoised[:, 0]

    ref = direct("dpmpp-2m", 200)
    for solver, nfe in (("ddim", 5), ("unipc", 10)):
        row = result.row(solver, nfe)
        rmse, _ = teacher_match(direct(solver, nfe - 1), ref)  # nfe−1 steps + the final x̂_0
        assert row.rmse == pytest.approx(rmse, rel=1e-4, abs=1e-6)
    with torch.no_grad():
        dsno = model(noise(SEEDS))[:, -1]
    assert result.row("DSNO").rmse == pytest.approx(teacher_match(dsno, ref)[0], rel=1e-4)
    x0 = (x - s.sigma(torch.tensor(1.0, dtype=torch.float64)) * teacher.eps_fn(x, torch.ones(len(SEEDS), dtype=torch.float64))) \
        / s.alpha(torch.tensor(1.0, dtype=torch.float64))
    assert result.row("teacher x̂₀(x_T)").rmse == pytest.approx(teacher_match(x0, ref)[0], rel=1e-4)
    assert result.row("teacher reference").rmse == 0.0
    for solver in ("ddim", "unipc"):
        errs = [result.row(solver, n).rmse for n in (2, 5, 10, 20)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (solver, errs)  # converges to the reference
    assert result.row("unipc", 20).rmse < result.row("ddim", 20).rmse  # higher order wins at equal NFE
    assert all(r.images_per_s > 0 and r.seconds > 0 for r in result.rows)


def test_fid_column_and_cli_outputs(mixture_run, tmp_path):
    from operator_diffusion.fid import FeatureNet

    torch.manual_seed(0)
    FeatureNet(in_channels=3, image_size=8, width=8, feature_dim=8, num_classes=0).save(tmp_path / "feat.safetensors")
    # the reference images: the teacher's own reference samples for the same seeds → its FID row is ≈ 0
    r = CliRunner().invoke(app, ["sample", str(mixture_run), "--out", str(tmp_path / "ref"), "--seeds", "300-363",
                                 "--teacher", "--format", "png"])
    assert r.exit_code == 0, r.output
    args = ["bench", str(mixture_run), "--seeds", "300-363", "--solvers", "ddim", "--nfe", "2,10",
            "--ref", str(tmp_path / "ref" / "teacher"), "--feature-extractor", str(tmp_path / "feat.safetensors"),
            "--out", str(tmp_path / "b"), "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    rows = {(row["method"], row["nfe"]): row for row in out["rows"]}
    assert rows[("teacher reference", 25)]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("ddim", 2)]["fid"] > rows[("ddim", 10)]["fid"] > 0
    assert (tmp_path / "b" / "bench.md").read_text().count("\n| ") == len(out["rows"]) + 1
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize("args, message", [
    (["--solvers", "rk4"], "unknown --solvers rk4"),
    (["--nfe", "0,2"], "positive integers"),
    (["--nfe", "two"], "bad --nfe"),
    (["--grid", "cubic"], "unknown --grid"),
    (["--ref-num", "10"], "only apply with --ref"),
    (["--reference-steps", "0"], "--reference-steps must be at least 1"),
    (["--ref", "digits", "--feature-extractor", "nowhere.safetensors"], "cannot set up FID"),
])
def test_bad_input_is_a_usage_error(mixture_run, tmp_path, args, message):
    r = CliRunner().invoke(app, ["bench", str(mixture_run), "--num", "2", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_a_bare_checkpoint_is_refused(mixture_run, tmp_path):
    r = CliRunner().invoke(app, ["bench", str(mixture_run / "model.safetensors"), "--num", "2"])
    assert r.exit_code == 2 and "bench needs the run folder" in " ".join(r.output.split())
