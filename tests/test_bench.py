"""`opdiff bench`: the rows against direct solver calls, NFE counts against counted network calls, the
error falling with NFE on an exact teacher, the metric against its definition, FID wiring, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.backbones import register_backbone
from operator_diffusion.bench import BenchSetup, run_bench, steps_for_nfe, teacher_match
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig
from operator_diffusion.sampling import TeacherSolver, run_solver, teacher_batches
from operator_diffusion.schedules import VPLinear, time_grid
from operator_diffusion.solvers import solve
from operator_diffusion.training import TrainConfig, load_run, train

from conftest import MixtureTeacher, reset_accelerate

SEEDS = list(range(200, 216))


def noise(seeds):
    return torch.stack([torch.randn((3, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A DSNO run distilled (briefly) from the exact Gaussian-mixture teacher: checkpoint-free teacher."""
    register_backbone(MixtureTeacher.name, MixtureTeacher)
    root = tmp_path_factory.mktemp("bench")
    collect(
        MixtureTeacher(),
        root / "data",
        CollectConfig(num=32, steps=24, solver="dpmpp-2m", shard_size=32, batch_size=32),
    )
    train(
        TrainConfig(
            data=str(root / "data"),
            out=str(root / "run"),
            backbone="opdiff-unet",
            backbone_options={"preset": "tiny", "dropout": 0.0},
            batch_size=8,
            max_steps=4,
            save_every=4,
            warmup=1,
            init="small",
        )
    )
    reset_accelerate()
    return root / "run"


def test_teacher_match_is_clipped_rmse_and_psnr():
    x = torch.tensor([[0.0, 0.5, 1.5, -2.0]], dtype=torch.float64)
    ref = torch.tensor([[0.1, 0.5, 1.0, -1.0]], dtype=torch.float64)
    rmse, psnr = teacher_match(x, ref)  # after clipping: errors (-0.1, 0, 0, 0)
    assert rmse == pytest.approx(math.sqrt(0.01 / 4), rel=1e-12)
    assert psnr == pytest.approx(10 * math.log10(4 / (0.01 / 4)), rel=1e-12)
    assert teacher_match(ref, ref) == (0.0, math.inf)


@pytest.mark.parametrize(
    "solver, target",
    [
        ("ddim", "denoised"),
        ("ddim", "state"),
        ("heun", "denoised"),
        ("heun", "state"),
        ("unipc", "denoised"),
        ("dpmpp-3m", "state"),
    ],
)
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

        solve(
            eps,
            torch.zeros(2, 3),
            s,
            time_grid(s, steps, "quadratic"),
            solver,
            record=[steps],
            record_denoised=target == "denoised",
        )
        assert len(calls) == nfe, (solver, target, nfe, steps)  # a final x̂_0 is one more call when needed
        found += 1
    assert found >= 2


def test_rows_equal_direct_solves_and_error_falls_with_nfe(mixture_run):
    model, info = load_run(mixture_run)
    teacher = MixtureTeacher()
    reference = run_solver(info, "dpmpp-2m", 200)  # a much finer reference than the collection's 24 steps
    setup = BenchSetup(
        teacher,
        reference,
        SEEDS,
        None,
        ("ddim", "unipc"),
        (1, 2, 5, 10, 20),
        "quadratic",
        {"DSNO": model},
        None,
        batch_size=5,
        solver_options={"unipc": {"to_zero": True, "order": 2, "lower_order_final": False}},
    )
    result = run_bench(setup)
    x = noise(SEEDS).double()
    s = teacher.schedule

    ref = solve(teacher.eps_fn, x, s, time_grid(s, 200, "quadratic"), "dpmpp-2m", record=[200]).denoised[:, 0]
    for nfe in (5, 20):
        # DDIM: every one of the k evaluations is a step: k steps ending at the state x(t_min), no final x̂_0
        direct = solve(teacher.eps_fn, x, s, time_grid(s, nfe, "quadratic"), "ddim").sample
        assert result.row("ddim", nfe).rmse == pytest.approx(teacher_match(direct, ref)[0], rel=1e-4, abs=1e-6)
        # UniPC with diffusers' last step to σ = 0: k − 1 steps of a k-step grid, then x̂_0 at the last evaluation
        ts = time_grid(s, nfe, "quadratic")[:-1]
        direct = solve(teacher.eps_fn, x, s, ts, "unipc", record=[nfe - 1], order=2, lower_order_final=False).denoised[
            :, 0
        ]
        assert result.row("unipc", nfe).rmse == pytest.approx(teacher_match(direct, ref)[0], rel=1e-4, abs=1e-6)
        assert result.row("unipc", nfe).depth == nfe and result.row("unipc", nfe).kind == "solver"
    with torch.no_grad():
        dsno = model(noise(SEEDS))[:, -1]
    assert result.row("DSNO").rmse == pytest.approx(teacher_match(dsno, ref)[0], rel=1e-4)
    assert result.row("DSNO").depth == 1
    # the median over seeds of each seed's own RMSE, written out here (clipped to [-1, 1] as the pooled one)
    own = [
        float((dsno[i].double().clamp(-1, 1) - ref[i].clamp(-1, 1)).square().mean().sqrt()) for i in range(len(SEEDS))
    ]
    assert result.row("DSNO").median_rmse == pytest.approx(float(torch.tensor(own).median()), rel=1e-4)
    x0 = (
        x
        - s.sigma(torch.tensor(1.0, dtype=torch.float64))
        * teacher.eps_fn(x, torch.ones(len(SEEDS), dtype=torch.float64))
    ) / s.alpha(torch.tensor(1.0, dtype=torch.float64))
    assert result.row("teacher x̂₀(x_T)").rmse == pytest.approx(teacher_match(x0, ref)[0], rel=1e-4)
    assert result.row("teacher reference").rmse == 0.0
    for solver in ("ddim", "unipc"):
        errs = [result.row(solver, n).rmse for n in (2, 5, 10, 20)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (solver, errs)  # converges to the reference
    assert result.row("unipc", 20).rmse < result.row("ddim", 20).rmse  # higher order wins at equal NFE
    assert all(r.images_per_s > 0 and r.seconds > 0 for r in result.rows)
    # compute: seconds per image over one evaluation's; a solver at 20 NFE costs more than at 2
    assert result.row("ddim", 20).compute > result.row("ddim", 2).compute > 0
    assert result.row("ddim", 2).seconds_per_image == pytest.approx(result.row("ddim", 2).seconds / len(SEEDS))


class CountingTeacher(MixtureTeacher):
    """The exact mixture teacher that records every network call: its times and its first item's input."""

    name = "test-counting-teacher"

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, torch.Tensor]] = []

    def forward(self, x, t, labels=None):
        t = self.expand_times(t, x)
        self.calls.append((float(t[0]), x.detach().clone()))
        return super().forward(x, t, labels)


class PoisonedTeacher(MixtureTeacher):
    """The mixture teacher whose call number ``k`` (0-based) returns ε̂ + 1."""

    name = "test-poisoned-teacher"

    def __init__(self, k: int):
        super().__init__()
        self.k, self.count = k, 0

    def forward(self, x, t, labels=None):
        out = super().forward(x, t, labels)
        self.count += 1
        return out + 1.0 if self.count - 1 == self.k else out


@pytest.mark.parametrize(
    "solver, nfe",
    [("ddim", 3), ("deis", 5), ("dpmpp-2m", 4), ("dpmpp-3m", 6), ("unipc", 5), ("ipndm", 5), ("heun", 4), ("heun", 5)],
)
@pytest.mark.parametrize("to_zero", [False, True])
def test_a_solver_row_spends_its_nfe_on_steps_counted_by_the_network(solver, nfe, to_zero):
    """k NFE = k network calls during the row, none of them at t_end (every evaluation advances the solution)."""
    reference = TeacherSolver("ddim", 3, "quadratic", 1e-3, "denoised")
    heun_odd = (nfe % 2 == 1) != to_zero  # Heun spends an odd count with a final Euler step (or a last step to σ = 0)
    options = {solver: {"to_zero": to_zero, **({"final_euler": heun_odd} if solver == "heun" else {})}}

    def calls_of(solvers):
        teacher = CountingTeacher()
        run_bench(
            BenchSetup(
                teacher,
                reference,
                SEEDS[:4],
                None,
                solvers,
                (nfe,),
                None,
                {},
                None,
                batch_size=4,
                solver_options=options,
            )
        )
        return teacher.calls

    base, with_row = calls_of(()), calls_of((solver,))
    row_calls = with_row[len(base) :] if len(with_row) > len(base) else []
    assert len(with_row) - len(base) == nfe
    if solver != "heun":  # Heun's corrector stage at t_end is part of its last step; the others never evaluate there
        assert all(t > 1e-3 * (1 + 1e-6) for t, _ in row_calls), [t for t, _ in row_calls]
    # the last evaluation changes the output: nothing is spent after the solution stopped moving
    from operator_diffusion.bench import _row_solver, solver_choice

    setup = BenchSetup(CountingTeacher(), reference, SEEDS[:4], None, (solver,), (nfe,), solver_options=options)
    run = _row_solver(setup, solver, nfe, solver_choice(solver, setup.teacher.schedule, None, options[solver]))
    clean = next(teacher_batches(setup.teacher, SEEDS[:4], run)).outputs
    poisoned = PoisonedTeacher(nfe - 1)
    assert not torch.allclose(next(teacher_batches(poisoned, SEEDS[:4], run)).outputs, clean)
    assert poisoned.count == nfe


@pytest.mark.parametrize("solver", ["deis", "ipndm", "dpmpp-2m", "dpmpp-3m", "unipc"])
def test_multistep_solvers_default_to_lower_order_final_below_15_steps(solver):
    from operator_diffusion.oracles import GaussianMixtureOracle

    s = VPLinear()
    oracle = GaussianMixtureOracle(s, torch.ones(2), torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.2, 0.4]))
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for steps, expected in ((6, True), (14, True), (15, False), (20, False)):
        ts = time_grid(s, steps, "quadratic")
        default = solve(oracle.eps, x, s, ts, solver).sample
        same = solve(oracle.eps, x, s, ts, solver, lower_order_final=expected).sample
        other = solve(oracle.eps, x, s, ts, solver, lower_order_final=not expected).sample
        assert torch.equal(default, same), (solver, steps)
        assert not torch.allclose(default, other), (solver, steps)  # the option matters here: the test can fail


def test_heun_final_euler_is_heun_then_one_euler_step():
    from operator_diffusion.oracles import GaussianMixtureOracle

    s = VPLinear()
    oracle = GaussianMixtureOracle(s, torch.ones(2), torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.2, 0.4]))
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = time_grid(s, 5, "edm")
    out = solve(oracle.eps, x, s, ts, "heun", final_euler=True)
    head = solve(oracle.eps, x, s, ts[:-1], "heun").sample
    tail = solve(oracle.eps, head, s, ts[-2:], "ddim").sample  # DDIM is the Euler step in x/α against ρ
    assert out.nfe == 2 * 5 - 1
    assert torch.allclose(out.sample, tail, rtol=1e-12, atol=1e-12)


def test_tuning_never_sees_the_reported_seeds_and_picks_the_best_candidate():
    from operator_diffusion.bench import SolverChoice, tune_solvers
    from operator_diffusion.seeds import example_inputs

    teacher = CountingTeacher()
    reported, tune = list(range(40, 44)), list(range(60, 66))
    reference = TeacherSolver("dpmpp-2m", 40, "logsnr", 1e-3, "denoised")
    setup = BenchSetup(
        teacher,
        reference,
        reported,
        None,
        ("unipc",),
        (3,),
        None,
        {},
        None,
        batch_size=8,
        tune_seeds=tune,
        solver_grids={"unipc": "logsnr"},
    )
    choices, table = tune_solvers(setup, ["unipc"])
    seen = torch.cat([x for _, x in teacher.calls])
    for seed in reported:
        x_T = example_inputs([seed], teacher.image_shape)[0][0].double()
        assert not any(torch.allclose(x_T, row.double()) for row in seen), seed
    # independent: every UniPC variant at 3 steps on the logsnr grid, scored by direct solves on the tuning seeds
    s, x = teacher.schedule, example_inputs(tune, teacher.image_shape)[0].double()
    ref = solve(teacher.eps_fn, x, s, time_grid(s, 40, "logsnr"), "dpmpp-2m", record=[40]).denoised[:, 0]
    scores = []
    grid = time_grid(s, 3, "logsnr")
    for order in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for lof in (None, False):
                opts = {"order": order, "variant": variant, "lower_order_final": lof}
                out = solve(teacher.eps_fn, x, s, grid, "unipc", **opts).sample  # ends at x(t_min)
                scores.append((teacher_match(out, ref)[0], SolverChoice("logsnr", opts)))
                zero = solve(teacher.eps_fn, x, s, grid[:-1], "unipc", record=[2], **opts)  # 2 steps + x̂_0 = 3 NFE
                scores.append((teacher_match(zero.denoised[:, 0], ref)[0], SolverChoice("logsnr", opts, True)))
    assert choices[("unipc", 3)] == min(scores, key=lambda sc: sc[0])[1]
    assert len(table) == len(scores)


def test_tuning_on_reported_or_training_seeds_is_refused():
    from operator_diffusion.bench import check_tune_seeds, default_tune_seeds

    with pytest.raises(ValueError, match="overlap the reported seeds"):
        check_tune_seeds([5, 6, 7], [7, 8])
    with pytest.raises(ValueError, match="overlap the training seeds 0-31"):
        check_tune_seeds([30, 31, 99], [100], [range(0, 32)])
    assert set(default_tune_seeds([100, 101, 105], 4)) == {106, 107, 108, 109}


def _row(method, nfe, rmse, compute, kind="solver"):
    from operator_diffusion.bench import BenchRow

    return BenchRow(
        method,
        nfe,
        rmse,
        20.0,
        1.0,
        1.0,
        None,
        f"{method} grid",
        nfe if kind == "solver" else 1,
        compute,
        compute * 1e-4,
        kind,
    )


def test_verdict_compares_at_equal_depth_and_at_equal_compute_and_says_where_dsno_loses():
    from operator_diffusion.bench import BenchResult, verdict

    rows = [
        _row("DSNO", 1, 0.10, 4.2, "model"),
        _row("ddim", 2, 0.30, 2.0),
        _row("unipc", 3, 0.12, 3.1),
        _row("ddim", 5, 0.20, 5.0),
        _row("unipc", 5, 0.08, 5.2),
        _row("unipc", 10, 0.03, 10.1),
    ]
    text = " ".join(verdict(BenchResult(rows), "DSNO"))
    assert "beats the best solver up to 3 NFE" in text and "loses from 5 NFE on, where unipc reaches 0.0800" in text
    assert "the best solver is unipc at 3 NFE (RMSE 0.1200): DSNO beats it" in text
    assert "at 5 NFE (unipc, unipc grid): 1.25× its error" in text
    rows[0] = _row("DSNO", 1, 0.15, 4.2, "model")  # now worse than UniPC at 3 NFE, which costs less
    text = " ".join(verdict(BenchResult(rows), "DSNO"))
    assert "DSNO loses to it" in text and "loses from 3 NFE on" in text


def test_fid_column_and_cli_outputs(mixture_run, tmp_path):
    from operator_diffusion.fid import FeatureNet

    torch.manual_seed(0)
    FeatureNet(in_channels=3, image_size=8, width=8, feature_dim=8, num_classes=0).save(tmp_path / "feat.safetensors")
    # the reference images: the teacher's own reference samples for the same seeds → its FID row is ≈ 0
    r = CliRunner().invoke(
        app,
        [
            "sample",
            str(mixture_run),
            "--out",
            str(tmp_path / "ref"),
            "--seeds",
            "300-363",
            "--teacher",
            "--format",
            "png",
        ],
    )
    assert r.exit_code == 0, r.output
    args = [
        "bench",
        str(mixture_run),
        "--seeds",
        "300-363",
        "--solvers",
        "ddim",
        "--nfe",
        "2,10",
        "--ref",
        str(tmp_path / "ref" / "teacher"),
        "--feature-extractor",
        str(tmp_path / "feat.safetensors"),
        "--out",
        str(tmp_path / "b"),
        "--json",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    rows = {(row["method"], row["nfe"]): row for row in out["rows"]}
    assert rows[("teacher reference", 25)]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("ddim", 2)]["fid"] > rows[("ddim", 10)]["fid"] > 0
    assert (tmp_path / "b" / "bench.md").read_text().count("\n| ") == len(out["rows"]) + 1
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--solvers", "rk4"], "unknown --solvers rk4"),
        (["--nfe", "0,2"], "positive integers"),
        (["--nfe", "two"], "bad --nfe"),
        (["--grid", "cubic"], "unknown --grid"),
        (["--ref-num", "10"], "only apply with --ref"),
        (["--reference-steps", "0"], "--reference-steps must be at least 1"),
        (["--seeds", "0-3", "--num", "4"], "overlap the training seeds 0-31"),
        (["--tune", "--tune-seeds", "5-8"], "overlap the training seeds 0-31"),
        (["--tune-seeds", "500-510"], "--tune-seeds only applies with --tune"),
        (["--solver-grid", "ddim=cubic"], "bad --solver-grid"),
        (["--solver-grid", "rk4=logsnr"], "bad --solver-grid"),
        (["--solver-options", "ddim"], "bad --solver-options"),
        (["--solver-options", "unipc:order=9"], "unipc order must be"),
        (["--ref", "digits", "--feature-extractor", "nowhere.safetensors"], "cannot set up FID"),
    ],
)
def test_bad_input_is_a_usage_error(mixture_run, tmp_path, args, message):
    r = CliRunner().invoke(app, ["bench", str(mixture_run), "--num", "2", "--out", str(tmp_path / "o"), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "o").exists()


def test_a_bare_checkpoint_is_refused(mixture_run, tmp_path):
    r = CliRunner().invoke(app, ["bench", str(mixture_run / "model.safetensors"), "--num", "2"])
    assert r.exit_code == 2 and "bench needs the run folder" in " ".join(r.output.split())


def test_the_gpu_script_runs_its_code_paths_on_the_cpu(tmp_path):
    """The GPU figures script (benchmarks/gpu.py) is run only where a GPU is lent; its measurement functions run
    here on the CPU with the tiny preset, so the script cannot rot between lent machines."""
    import math

    from operator_diffusion.benchmarks import gpu

    rows = gpu.sample_rows(
        "cpu", presets=("tiny",), batches=(2,), precisions=("fp32",), compile_modes=(None,), repeats=1
    )
    assert [(r.preset, r.batch, r.compiled, r.error) for r in rows] == [("tiny", 2, False, None)]
    assert set(rows[0].ratio) == set(gpu.PLACEMENTS) and all(math.isfinite(v) and v > 0 for v in rows[0].ratio.values())
    (train,) = gpu.training_rows("cpu", precisions=("fp32",), batch=4, steps=4)
    assert train["dsno"] > 0 and train["baseline"] > 0
    (coll,) = gpu.collection_rows("cpu", precisions=("fp32",), num=4, batch=4, presets=("tiny",))
    assert coll["num"] == 4 and coll["per_s"] > 0
    if not torch.cuda.is_available():
        assert "No CUDA device on this machine: nothing measured." in gpu.report(lambda: "this machine")


def test_per_seed_rmse_is_each_seeds_own_error_and_its_median_ignores_an_outlier():
    """Seed b is off by a constant c_b everywhere, so its RMSE is |c_b|; one bad seed moves the pooled RMSE (the
    root of the mean square) far more than the median."""
    from operator_diffusion.bench import per_seed_rmse

    ref = torch.zeros(5, 1, 4, 4)
    c = torch.tensor([0.01, -0.02, 0.03, -0.04, 0.9])
    x = ref + c[:, None, None, None]
    torch.testing.assert_close(per_seed_rmse(x, ref), c.abs().double(), rtol=1e-6, atol=1e-9)
    assert float(per_seed_rmse(x, ref).median()) == pytest.approx(0.03)
    assert teacher_match(x, ref)[0] == pytest.approx(float(c.square().mean().sqrt()))  # 0.40: the outlier's
    clipped = per_seed_rmse(ref + 3.0, ref)  # images clip at 1: an error of 1 per pixel, latents keep 3
    torch.testing.assert_close(clipped, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(per_seed_rmse(ref + 3.0, ref, clip=False), torch.full((5,), 3.0, dtype=torch.float64))


def test_the_quality_benchmark_scores_every_row_on_seeds_none_of_them_trained_on():
    """Its 131072-trajectory row trains on seeds 0-131071: scoring it on the other benchmarks' 100000-100255 was
    refused by `bench` (and, before `bench` enforced held-out seeds, reported a training-seed figure)."""
    from operator_diffusion.benchmarks.ablations import EVAL_SEEDS as SHARED
    from operator_diffusion.benchmarks.quality import EVAL_SEEDS, quality_variants
    from operator_diffusion.demo import DEMO

    trained = [range(0, v.num or DEMO.num) for v in quality_variants()]
    assert all(not set(EVAL_SEEDS) & set(r) for r in trained)
    assert any(set(SHARED) & set(r) for r in trained)  # why the quality benchmark has seeds of its own


def test_the_quality_benchmark_gives_each_run_the_demo_dsnos_warm_up_share_and_the_large_point():
    from operator_diffusion.benchmarks.quality import (
        LONG_NUMS,
        LONG_STEPS,
        quality_points,
        quality_variants,
        warmup_steps,
    )
    from operator_diffusion.demo import DEMO

    assert warmup_steps(DEMO.train_steps) == DEMO.warmup  # the demo's own run is unchanged
    assert warmup_steps(4 * DEMO.train_steps) == 4 * DEMO.warmup
    points = quality_points()
    assert {(n, LONG_STEPS) for n in LONG_NUMS} <= set(points) and len(set(points)) == len(points)
    assert points[0][0] == max(n for n, _ in points)  # the largest collection runs first
    for v in quality_variants():
        t = dict(v.train)
        assert t["warmup"] < t["max_steps"]


def test_ablation_variants_train_at_their_samplers_demo_settings_dropout_included():
    """ "The demo's settings" of every ablation row are the demo's, dropout 0 included (the backbone's own is 0.1);
    a variant's override wins."""
    from operator_diffusion.benchmarks.ablations import Variant, train_settings
    from operator_diffusion.demo import DEMO

    dsno = train_settings(Variant("d"), DEMO.lr)
    assert dsno["backbone_options"] == {"dropout": DEMO.dropout} and DEMO.dropout == 0.0
    assert (dsno["batch_size"], dsno["warmup"], dsno["max_steps"]) == (DEMO.batch_size, DEMO.warmup, DEMO.train_steps)
    base = train_settings(Variant("b", train=(("baseline", True),)), DEMO.baseline_lr)
    assert (base["batch_size"], base["warmup"], base["max_steps"]) == (
        DEMO.baseline_batch_size,
        DEMO.baseline_warmup,
        DEMO.baseline_train_steps,
    )
    own = train_settings(Variant("o", train=(("backbone_options", {"dropout": 0.1}),)), DEMO.lr)
    assert own["backbone_options"] == {"dropout": 0.1}


def test_the_overhead_benchmark_times_every_stand_in_beside_the_plain_network():
    """Its code path on the CPU at a tiny batch (the GPU script runs it on CUDA): one timing per stand-in."""
    import math

    from operator_diffusion.benchmarks.overhead import STAND_INS, step_overheads

    (row,) = step_overheads((1,), repeats=1)
    assert all(math.isfinite(row[n]) and row[n] > 0 for n in ("plain", *STAND_INS))
    assert row["layers"] == 11  # one after every ResBlock and the mid block of the digits preset


def test_a_failing_part_of_the_gpu_report_costs_one_line_not_the_rest(capsys):
    from operator_diffusion.benchmarks.gpu import _Report

    def training_rows():
        raise RuntimeError("CUDA error: no kernel image\nsecond line")

    lines = _Report(["## GPU figures", ""])
    assert lines.measured(training_rows) == []
    lines.append("| table |")
    assert lines.measured(lambda: [1, 2]) == [1, 2]  # the next part still runs
    assert list(lines) == [
        "## GPU figures",
        "",
        "training_rows failed: RuntimeError: CUDA error: no kernel image",
        "| table |",
    ]
    printed = capsys.readouterr().out.splitlines()
    assert printed == list(lines)  # each line shown once, as its part ends
