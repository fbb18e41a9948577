"""DSNO training: the loss against closed forms, EMA against its recursion, learning on real trajectories,
exact resume, two processes under torchrun, bf16 on CPU, and bad input.

The teacher is an exact Gaussian-mixture denoiser wrapped as a backbone (its trajectories are smooth and
learnable, unlike a random network's); the student is the tiny ``opdiff-unet``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.backbones import load_backbone, register_backbone
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig
from operator_diffusion.schedules import VPLinear
from operator_diffusion.training import (
    EMA,
    dsno_loss,
    learning_rate,
    load_run,
    per_time_losses,
    reset_accelerate_state,
    time_weights,
    train,
)

from conftest import MixtureTeacher, vp_linear_alpha_sigma
from conftest import train_config as config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    register_backbone(MixtureTeacher.name, MixtureTeacher)
    out = tmp_path_factory.mktemp("mixture") / "data"
    collect(MixtureTeacher(), out, CollectConfig(num=96, steps=24, solver="dpmpp-2m", shard_size=48, batch_size=48))
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def reset_accelerate():
    yield
    reset_accelerate_state()


# --------------------------------------------------------------------------------------------------
# The loss and its parts
# --------------------------------------------------------------------------------------------------
def test_time_weights_are_clamped_sqrt_snr():
    t = torch.tensor([0.9, 0.5, 0.2, 0.05, 1e-3], dtype=torch.float64)
    alpha, sigma = vp_linear_alpha_sigma(t)
    torch.testing.assert_close(
        time_weights(VPLinear(), t, "sqrt-snr"), (alpha / sigma).clamp(1, 1e4), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        time_weights(VPLinear(), t, "snr", 0.5, 50), (alpha / sigma).square().clamp(0.5, 50), rtol=1e-12, atol=0
    )
    assert time_weights(VPLinear(), t, "uniform").tolist() == [1.0] * 5
    with pytest.raises(ValueError, match="unknown weighting"):
        time_weights(VPLinear(), t, "lpips")


def test_loss_is_the_weighted_mean_of_per_time_l1_terms():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 4, 3, 2, 2, generator=g), torch.randn(5, 4, 3, 2, 2, generator=g)
    w = torch.tensor([1.0, 2.0, 10.0, 1e4], dtype=torch.float64)
    terms = [
        sum(
            abs(float(pred[b, i, c, h, k]) - float(target[b, i, c, h, k]))
            for b in range(5)
            for c in range(3)
            for h in range(2)
            for k in range(2)
        )
        / 60
        for i in range(4)
    ]
    loss, got = dsno_loss(pred, target, w)
    torch.testing.assert_close(got.double(), torch.tensor(terms, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(loss) == pytest.approx(sum(wi * ti for wi, ti in zip(w.tolist(), terms)) / 4, rel=1e-6)
    sq = per_time_losses(pred, target, "l2")
    torch.testing.assert_close(sq, (pred - target).square().mean(dim=(0, 2, 3, 4)), rtol=1e-6, atol=0)


def _pseudo_huber_reference(pred, target, c):
    """iCT's pseudo-Huber term per time by hand in float64: mean_b (√(Σ_chw Δ² + c²) − c) / √D."""
    b, m = pred.shape[:2]
    dim = pred[0, 0].numel()
    out = []
    for i in range(m):
        total = 0.0
        for k in range(b):
            sq = sum(
                (float(p) - float(q)) ** 2
                for p, q in zip(pred[k, i].flatten().tolist(), target[k, i].flatten().tolist())
            )
            total += (math.sqrt(sq + c * c) - c) / math.sqrt(dim)
        out.append(total / b)
    return torch.tensor(out, dtype=torch.float64)


def test_pseudo_huber_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 2, 2, 2, 3, generator=g), torch.randn(3, 2, 2, 2, 3, generator=g)
    default_c = 0.00054 * math.sqrt(12)  # iCT: 0.00054·√D, D = C·H·W = 12
    for c, got in [
        (default_c, per_time_losses(pred, target, "pseudo-huber")),
        (0.7, per_time_losses(pred, target, "pseudo-huber", huber_c=0.7)),
    ]:
        torch.testing.assert_close(got.double(), _pseudo_huber_reference(pred, target, c), rtol=1e-6, atol=0)
    w = torch.tensor([2.0, 5.0], dtype=torch.float64)
    loss, terms = dsno_loss(pred, target, w, "pseudo-huber", 0.7)
    assert float(loss) == pytest.approx(float((w * _pseudo_huber_reference(pred, target, 0.7)).mean()), rel=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_pseudo_huber_limits(seed):
    g = torch.Generator().manual_seed(seed)
    scale = 10.0 ** (seed - 2)  # errors from 0.01 to 10
    pred, target = scale * torch.randn(4, 3, 3, 4, 4, generator=g), torch.zeros(4, 3, 3, 4, 4)
    norm = pred.double().flatten(2).norm(dim=2)  # (B, M): ‖Δ‖ over (C, H, W)
    root_d = math.sqrt(48)
    small = per_time_losses(pred, target, "pseudo-huber", huber_c=1e-9 * scale)  # c → 0: ‖Δ‖/√D
    torch.testing.assert_close(small.double(), norm.mean(0) / root_d, rtol=1e-5, atol=0)
    c = 1e4 * scale  # c ≫ ‖Δ‖: ‖Δ‖²/(2c√D)
    large = per_time_losses(pred, target, "pseudo-huber", huber_c=c)
    torch.testing.assert_close(large.double(), norm.square().mean(0) / (2 * c * root_d), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), True, "0.1"])
def test_pseudo_huber_refuses_a_bad_c(bad):
    x = torch.zeros(2, 1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"huber_c \(--huber-c\) must be a finite number > 0"):
        per_time_losses(x, x, "pseudo-huber", huber_c=bad)


def test_final_weight_replaces_the_last_time_weight():
    t = torch.tensor([0.9, 0.3, 0.05, 1e-3], dtype=torch.float64)
    alpha, sigma = vp_linear_alpha_sigma(t)
    expected = (alpha / sigma).clamp(1, 1e4)
    assert float(expected[-1]) == pytest.approx(95.37, rel=1e-3)  # the default last weight it replaces
    expected[-1] = 7.5
    torch.testing.assert_close(time_weights(VPLinear(), t, "sqrt-snr", final_weight=7.5), expected, rtol=1e-12, atol=0)
    assert time_weights(VPLinear(), t, "uniform", final_weight=1e4).tolist() == [1.0, 1.0, 1.0, 1e4]
    assert time_weights(VPLinear(), t[-1:], "sqrt-snr", final_weight=3.0).tolist() == [3.0]  # the baseline's one time
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"final_weight \(--final-weight\) must be a finite number > 0"):
            time_weights(VPLinear(), t, "sqrt-snr", final_weight=bad)


def test_learning_rate_warmup():
    assert learning_rate(0, 2e-4, 1000) == pytest.approx(2e-7)
    assert learning_rate(500, 2e-4, 1000) == pytest.approx(2e-4 * (1e-3 + 0.999 * 0.5))
    assert learning_rate(1000, 2e-4, 1000) == learning_rate(10**6, 2e-4, 1000) == 2e-4
    assert learning_rate(0, 1e-3, 0) == 1e-3


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_learning_rate_decay_after_warmup(decay):
    lr, warmup, total = 1e-3, 100, 1100
    assert learning_rate(50, lr, warmup, decay, total) == learning_rate(50, lr, warmup)  # warm-up unchanged
    assert learning_rate(warmup, lr, warmup, decay, total) == pytest.approx(lr)
    assert learning_rate(600, lr, warmup, decay, total) == pytest.approx(lr / 2)  # half-way: cos(π/2) = 0, 1 − ½
    quarter = learning_rate(350, lr, warmup, decay, total) / lr
    assert quarter == pytest.approx((1 + math.cos(math.pi / 4)) / 2 if decay == "cosine" else 0.75)
    assert learning_rate(total, lr, warmup, decay, total) == pytest.approx(0, abs=1e-18)
    rates = [learning_rate(k, lr, warmup, decay, total) for k in range(warmup, total)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_learning_rate_decay_refuses_bad_settings():
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'; valid: constant, cosine, linear"):
        learning_rate(0, 1e-3, 10, "step", 100)
    with pytest.raises(ValueError, match="needs max_steps > warmup"):
        learning_rate(0, 1e-3, 100, "cosine", 100)


def test_ema_follows_its_recursion():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.9)
    expected = 1.0
    for n in range(1, 30):
        with torch.no_grad():
            model.weight.fill_(float(n))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * n
        assert float(ema.shadow[0][0, 0]) == pytest.approx(expected, rel=1e-6)
    restored = EMA(model, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 29 and float(restored.shadow[0][0, 0]) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------
def test_training_brings_the_loss_down_and_exports_a_loadable_model(dataset, tmp_path):
    out = tmp_path / "run"
    result = train(config(dataset, out, max_steps=150, save_every=150, log_every=10, lr=2e-3, warmup=10))
    log = metrics(out)
    assert [m["step"] for m in log] == list(range(10, 151, 10))
    first, last = log[0], log[-1]
    assert last["loss"] < 0.5 * first["loss"], (first["loss"], last["loss"])
    assert sum(last[f"share_t{i}"] for i in range(1, 5)) == pytest.approx(1.0, rel=1e-5)
    model, info = load_run(out)
    assert result.model_path == out / "model.safetensors"
    assert (
        info["model"]["times"]
        == json.loads((dataset / "opdiff_collection.json").read_text())["collection"]["output_times"]
    )
    assert info["data_content_sha256"] and info["num_processes"] == 1
    # the export holds the EMA weights, not the last iterate
    state = load_file(out / "model.safetensors")
    last_ckpt = load_file(out / "checkpoints" / "step_00000150" / "model.safetensors")
    key = "temporal.down__0__res__0.conv.weight"
    assert not torch.equal(state[key], last_ckpt[key])


@pytest.mark.parametrize("dropout", [0.0, 0.1])  # 0.1: the presets' default, whose draws must repeat on resume
def test_resume_gives_the_uninterrupted_loss_sequence(dataset, tmp_path, dropout):
    opts = {"backbone_options": {"preset": "tiny", "dropout": dropout}}
    full = tmp_path / "full"
    train(config(dataset, full, max_steps=24, save_every=8, **opts))

    class Kill(Exception):
        pass

    def kill_at_19(step, total, m):
        if step == 19:
            raise Kill

    part = tmp_path / "part"
    with pytest.raises(Kill):
        train(config(dataset, part, max_steps=24, save_every=8, **opts), progress=kill_at_19)
    reset_accelerate_state()
    assert [m["step"] for m in metrics(part)][-1] == 19  # logged past the last checkpoint (16) before dying
    result = train(config(dataset, part, max_steps=24, save_every=8, **opts))
    assert result.resumed_from == 16
    assert metrics(part) == metrics(full)  # every loss, term and lr identical, nothing logged twice
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_step_baseline_trains_on_the_last_time_only(dataset, tmp_path):
    out = tmp_path / "baseline"
    train(config(dataset, out, baseline=True, max_steps=4))
    log = metrics(out)
    assert set(k for k in log[0] if k.startswith("loss_t")) == {"loss_t1"}
    model, info = load_run(out)
    assert model.baseline and len(model.temporal) == 0 and info["parameters"]["temporal_parameters"] == 0


def test_pseudo_huber_with_a_final_weight_trains(dataset, tmp_path):
    out = tmp_path / "huber"
    train(config(dataset, out, loss="pseudo-huber", huber_c=0.05, final_weight=5.0, max_steps=2))
    for m in metrics(out):  # L = (1/M) Σ w_i L_i, so w_M = share_M · M · L / L_M
        assert m["share_t4"] * 4 * m["loss"] / m["loss_t4"] == pytest.approx(5.0, rel=1e-4)
    identity = json.loads((out / "run.json").read_text())["train"]
    assert identity["huber_c"] == 0.05 and identity["final_weight"] == 5.0
    assert "huber_c" not in config(dataset, out).identity()  # unset: as before the option existed, so old runs resume


def test_bf16_autocast_trains_on_cpu(dataset, tmp_path):
    out = tmp_path / "bf16"
    train(config(dataset, out, mixed_precision="bf16", max_steps=3))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics(out))
    assert json.loads((out / "run.json").read_text())["train"]["mixed_precision"] == "bf16"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_torchrun_train_one_synchronized_model(dataset, tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, json\n"
        "from conftest import MixtureTeacher, train_config as config\n"
        "from operator_diffusion.backbones import register_backbone\n"
        "from operator_diffusion.training import train\n"
        "register_backbone(MixtureTeacher.name, MixtureTeacher)\n"
        f"train(config({str(dataset)!r}, {str(out)!r}, max_steps=6, save_every=3))\n"
    )
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(script),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "config.json").read_text())
    assert info["num_processes"] == 2  # and train() checked that both ranks ended with the same weights
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))


# --------------------------------------------------------------------------------------------------
# Bad input: clear error, nothing written
# --------------------------------------------------------------------------------------------------
def snapshot(path: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else {}


def test_bad_input_is_refused_without_writing(dataset, tmp_path):
    digits = load_backbone("opdiff-unet", preset="digits")
    digits.save_weights(tmp_path / "digits.safetensors")
    cases = [
        (
            dict(backbone_options={"preset": "digits"}),
            "takes images of shape \\(1, 8, 8\\) but the dataset holds \\(3, 8, 8\\)",
        ),
        (dict(init_from=str(tmp_path / "digits.safetensors")), "does not match backbone 'opdiff-unet'"),
        (dict(batch_size=200), "holds 96 trajectories, fewer than one batch of 200"),
        (dict(init_from=str(tmp_path / "missing.safetensors")), "does not exist"),
        (dict(data=str(tmp_path / "nowhere")), "neither a folder nor a Hub dataset id"),
        (dict(loss="pseudo-huber", huber_c=-1.0), "huber_c \\(--huber-c\\) must be a finite number > 0"),
        (dict(huber_c=0.1), "applies to the pseudo-huber loss only, not 'l1'"),
        (dict(final_weight=0.0), "final_weight \\(--final-weight\\) must be a finite number > 0"),
    ]
    for i, (kw, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            train(config(kw.pop("data", dataset), out, **kw))
        assert not out.exists()
    # an out directory holding another run
    out = tmp_path / "taken"
    train(config(dataset, out, max_steps=2, save_every=2))
    before = snapshot(out)
    with pytest.raises(ValueError, match="holds another run \\(differs in train.lr\\)"):
        train(config(dataset, out, max_steps=2, lr=5e-4))
    assert snapshot(out) == before


def test_cli_train_dry_run_run_and_usage_errors(dataset, tmp_path):
    runner = CliRunner()
    args = [
        "train",
        "--data",
        str(dataset),
        "--backbone",
        "opdiff-unet",
        "-o",
        "preset=tiny",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--log-every",
        "1",
    ]
    dry = runner.invoke(app, [*args, "--out", str(tmp_path / "dry"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    resolved = json.loads(dry.output)
    assert (
        resolved["times"] == json.loads((dataset / "opdiff_collection.json").read_text())["collection"]["output_times"]
    )
    assert not (tmp_path / "dry").exists()
    dry = runner.invoke(
        app,
        [
            *args,
            "--out",
            str(tmp_path / "dry"),
            "--dry-run",
            "--loss",
            "pseudo-huber",
            "--huber-c",
            "0.01",
            "--final-weight",
            "12.5",
        ],
    )
    assert dry.exit_code == 0, dry.output
    resolved = json.loads(dry.output)
    assert resolved["loss_weights"][-1] == 12.5 and resolved["config"]["huber_c"] == 0.01
    memory = ["--dry-run", "--gradient-checkpointing", "--trainable", "temporal"]
    dry = runner.invoke(app, [*args, "--out", str(tmp_path / "dry"), *memory])
    assert dry.exit_code == 0, dry.output
    resolved = json.loads(dry.output)
    assert resolved["config"]["gradient_checkpointing"] is True and resolved["config"]["trainable"] == "temporal"
    assert resolved["trainable_parameters"] == resolved["temporal_parameters"]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "cli")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--weighting", "lpips"])
    assert bad.exit_code == 2 and "unknown --weighting 'lpips'" in bad.output
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "-o", "preset=digits"])
    assert bad.exit_code == 2 and "takes images of shape" in bad.output
    for flags, message in [
        (["--loss", "pseudo-huber", "--huber-c", "-0.5"], "huber_c (--huber-c) must be a finite number > 0"),
        (["--final-weight", "0"], "final_weight (--final-weight) must be a finite number > 0"),
        (["--output-skip", "edm"], "unknown output skip 'edm'; valid: fit"),
        # checked before anything is written (the probe's `--lr -1` left a run.json behind that refused the fix)
        (["--lr", "-1"], "lr must be a positive number"),
        (["--warmup", "-3"], "warmup (--warmup) must be an integer >= 0"),
        (["--weight-min", "10", "--weight-max", "1"], "the clamp would invert"),
        (["--trainable", "network.nothing.*"], "--trainable 'network.nothing.*' selects nothing"),
        (["--trainable", ","], "names no parameters"),
        *(
            [(["--mixed-precision", "fp16"], "fp16 mixed precision needs a CUDA GPU")]
            if not torch.cuda.is_available()
            else []
        ),
    ]:
        bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), *flags])
        assert bad.exit_code == 2 and message in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_non_finite_loss_stops_training_and_exports_nothing(dataset, tmp_path, monkeypatch):
    """The loss turns NaN at step 3: train stops with an error naming the step, keeps the step-2 checkpoint
    and writes no model (the probe's `--lr 1e9` exported NaN weights with exit 0)."""
    from operator_diffusion import training as tr

    real, calls = tr.dsno_loss, []

    def nan_at_third(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == 3 else (loss, terms)

    monkeypatch.setattr(tr, "dsno_loss", nan_at_third)
    out = tmp_path / "nan"
    with pytest.raises(tr.NonFiniteLossError, match=r"the loss is nan at step 3: .*step_00000002\) is kept"):
        train(config(dataset, out, max_steps=10, save_every=2))
    reset_accelerate_state()
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


def test_training_starts_from_the_collection_teacher_unless_told_scratch(tiny_run, tmp_path):
    """Without --init-from the student starts from the collection's teacher (found by its recorded sha256);
    --init-from scratch is the explicit choice of the backbone's own initialisation; a teacher file that is gone
    is an error that names both ways out."""
    import shutil

    from operator_diffusion.provenance import file_sha256
    from operator_diffusion.training import TrainConfig, plan_run

    base = dict(data=str(tiny_run["data"]), batch_size=8, max_steps=2)
    plan = plan_run(TrainConfig(out=str(tmp_path / "a"), **base))
    assert plan.init_from == str(Path(tiny_run["teacher"]).resolve())
    assert plan.run_info["init_from_sha256"] == file_sha256(tiny_run["teacher"])
    teacher = load_file(tiny_run["teacher"])
    student = {k.removeprefix("network."): v for k, v in plan.model.state_dict().items() if k.startswith("network.")}
    assert all(torch.equal(student[k], v) for k, v in teacher.items())
    scratch = plan_run(TrainConfig(out=str(tmp_path / "b"), init_from="scratch", **base))
    assert scratch.init_from is None and scratch.run_info["init_from_sha256"] is None
    assert scratch.config.identity()["init_from"] is None  # resumes runs made when None meant scratch
    moved = tmp_path / "data"
    shutil.copytree(tiny_run["data"], moved)
    info = json.loads((moved / "opdiff_collection.json").read_text())
    info["teacher_checkpoint"] = str(tmp_path / "gone.safetensors")
    (moved / "opdiff_collection.json").write_text(json.dumps(info))
    with pytest.raises(FileNotFoundError, match="pass --init-from PATH .*or --init-from scratch"):
        plan_run(TrainConfig(out=str(tmp_path / "c"), **{**base, "data": str(moved)}))


def test_init_from_a_model_folder_takes_its_weights_file(tiny_run, tmp_path):
    """--init-from DIR: an `opdiff teacher train` folder (teacher.safetensors) or a diffusers model folder
    (diffusion_pytorch_model.safetensors) gives its weights file; a folder without one is a one-line error."""
    import shutil

    from operator_diffusion.training import TrainConfig, plan_run

    folder = tmp_path / "teacher_run"
    folder.mkdir()
    shutil.copy(tiny_run["teacher"], folder / "teacher.safetensors")
    base = dict(data=str(tiny_run["data"]), batch_size=8, max_steps=2)
    plan = plan_run(TrainConfig(out=str(tmp_path / "a"), init_from=str(folder), **base))
    assert plan.init_from == str(folder / "teacher.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder with no weights file .*pass the .safetensors file itself"):
        plan_run(TrainConfig(out=str(tmp_path / "b"), init_from=str(empty), **base))


def test_placement_is_part_of_the_run_and_refused_where_it_cannot_apply(tiny_run, tmp_path):
    """--placement reaches the model (a preset or comma-separated names); runs made before the field existed keep
    their identity (None is left out of it); the baseline, which has no temporal layers, refuses it."""
    from operator_diffusion.training import TrainConfig, plan_run

    base = dict(data=str(tiny_run["data"]), batch_size=8, max_steps=2)
    plan = plan_run(TrainConfig(out=str(tmp_path / "a"), placement="through-mid", **base))
    assert [p.name for p in plan.model.injection_points] == ["down.0.res.0", "down.1.res.0", "mid"]
    assert plan.model.cut_point == "mid"
    listed = plan_run(TrainConfig(out=str(tmp_path / "b"), placement="down.0.res.0, mid", **base))
    assert [p.name for p in listed.model.injection_points] == ["down.0.res.0", "mid"]
    assert "placement" not in TrainConfig(out="x", **base).identity()
    assert TrainConfig(out="x", placement="through-mid", **base).identity()["placement"] == "through-mid"
    with pytest.raises(ValueError, match="one-step baseline has none"):
        plan_run(TrainConfig(out=str(tmp_path / "c"), placement="through-mid", baseline=True, **base))
    with pytest.raises(ValueError, match="names no module"):
        plan_run(TrainConfig(out=str(tmp_path / "d"), placement=" , ", **base))
    assert not any((tmp_path / n).exists() for n in "abcd")  # planning writes nothing


def test_output_skip_is_fitted_to_the_collection_and_travels_with_the_model(tiny_run, tmp_path):
    """Reference: the collection's parquet shards read with pyarrow, the prior draws re-made with torch.randn from
    each seed (the noise rule), and numpy's least-squares line per output time."""
    import numpy as np
    import pyarrow.parquet as pq

    from operator_diffusion.training import TrainConfig, plan_run

    base = dict(data=str(tiny_run["data"]), batch_size=8, max_steps=2, save_every=2)
    tables = [pq.read_table(f) for f in sorted((Path(tiny_run["data"]) / "data").glob("*.parquet"))]
    seeds = [s for t in tables for s in t.column("seed").to_pylist()]
    y = np.array([traj for t in tables for traj in t.column("trajectory").to_pylist()], dtype=np.float64)
    x = np.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(s)).numpy() for s in seeds])
    want = []
    for i in range(y.shape[1]):
        slope, _ = np.polyfit(x.ravel(), y[:, i].ravel(), 1)
        want.append([slope, np.sqrt(np.mean((y[:, i] - slope * x) ** 2))])
    plan = plan_run(TrainConfig(out=str(tmp_path / "a"), output_skip="fit", **base))
    np.testing.assert_allclose(plan.model.output_skip.numpy(), want, rtol=1e-6)
    baseline = plan_run(TrainConfig(out=str(tmp_path / "b"), output_skip="fit", baseline=True, **base))
    np.testing.assert_allclose(baseline.model.output_skip.numpy(), want[-1:], rtol=1e-6)
    assert "output_skip" not in TrainConfig(out="x", **base).identity()  # as before the option: old runs resume
    train(TrainConfig(out=str(tmp_path / "run"), output_skip="fit", **base))
    model, info = load_run(tmp_path / "run")
    assert info["train"]["output_skip"] == "fit"
    torch.testing.assert_close(model.output_skip, plan.model.output_skip, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Memory at scale: freezing and gradient checkpointing in a run
# --------------------------------------------------------------------------------------------------
def test_frozen_parameters_stay_bitwise_the_teachers_and_get_no_gradients(dataset, tmp_path):
    """--trainable temporal+norms (and the output conv, zero-initialised in this student built from scratch: frozen at
    zero it would pass no gradient back): the optimizer moves those only and holds state for them alone; every other
    weight of the export (and of the last checkpoint) is bitwise the initial one."""
    from operator_diffusion.training import plan_run

    out = tmp_path / "run"
    cfg = config(
        dataset, out, max_steps=6, save_every=6, trainable="temporal+norms,network.out_conv.*", lr=1e-2, warmup=1
    )
    plan = plan_run(cfg)
    initial = {k: v.clone() for k, v in plan.model.state_dict().items()}
    norms = {
        f"network.{m}.{p}"
        for m, mod in plan.model.network.named_modules()
        if isinstance(mod, nn.GroupNorm)
        for p, _ in mod.named_parameters()
    } | {"network.out_conv.weight", "network.out_conv.bias"}
    assert norms and plan.trainable_parameters == sum(
        v.numel() for k, v in plan.model.named_parameters() if k.startswith("temporal.") or k in norms
    )
    train(cfg, plan=plan)
    trains = [k.startswith("temporal.") or k in norms for k, _ in plan.model.named_parameters()]
    assert [p.requires_grad for p in plan.model.parameters()] == trains  # autograd computes no gradient for the rest
    adam = torch.load(out / "checkpoints/step_00000006/optimizer.bin", weights_only=True)
    assert len(adam["state"]) == len(adam["param_groups"][0]["params"]) == sum(trains)  # Adam's state: those only
    for state in (load_file(out / "model.safetensors"), load_file(out / "checkpoints/step_00000006/model.safetensors")):
        assert state.keys() == initial.keys()
        moved = {k for k in state if not torch.equal(state[k], initial[k])}
        assert moved and moved <= norms | {k for k in state if k.startswith("temporal.")}
        assert any("norm" in k for k in moved) and any(k.startswith("temporal.") for k in moved), sorted(moved)
    model, info = load_run(out)
    assert info["parameters"]["trainable_parameters"] == plan.trainable_parameters
    assert info["train"]["trainable"] == "temporal+norms,network.out_conv.*"  # another choice of weights is another run


def test_trainable_selectors_refuse_what_selects_nothing(dataset, tmp_path):
    from operator_diffusion.training import TrainConfig, plan_run

    with pytest.raises(ValueError, match="names no parameters"):
        TrainConfig(data="d", out="o", trainable=" + ")
    with pytest.raises(ValueError, match="'network.nothing.*' selects nothing"):
        plan_run(config(dataset, tmp_path / "a", trainable="temporal,network.nothing.*"))
    with pytest.raises(ValueError, match="'temporal' selects nothing: the model has no temporal layers"):
        plan_run(config(dataset, tmp_path / "b", trainable="temporal", baseline=True))
    glob = plan_run(config(dataset, tmp_path / "c", trainable="network.mid.*"))
    assert {k for k, p in glob.model.named_parameters() if p.requires_grad} == {
        k for k, _ in glob.model.named_parameters() if k.startswith("network.mid.")
    }
    assert "trainable" not in config(dataset, tmp_path / "d").identity()  # unset: runs from before resume
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_gradient_checkpointing_trains_the_same_run_and_may_change_on_resume(dataset, tmp_path):
    """With dropout on, a checkpointed run logs the plain run's losses and ends at its weights; a plain run resumed
    with --gradient-checkpointing is the same run (it changes memory, not what is trained)."""
    opts = {"backbone_options": {"preset": "tiny", "dropout": 0.1}, "save_every": 4, "max_steps": 8}
    plain, ckpt, mixed = tmp_path / "plain", tmp_path / "ckpt", tmp_path / "mixed"
    train(config(dataset, plain, **opts))
    reset_accelerate_state()
    train(config(dataset, ckpt, gradient_checkpointing=True, **opts))
    reset_accelerate_state()
    train(config(dataset, mixed, **{**opts, "max_steps": 4}))
    reset_accelerate_state()
    assert train(config(dataset, mixed, gradient_checkpointing=True, **opts)).resumed_from == 4
    for run in (ckpt, mixed):
        for a, b in zip(metrics(run), metrics(plain), strict=True):
            assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7) for k in a)
        a, b = load_file(run / "model.safetensors"), load_file(plain / "model.safetensors")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
