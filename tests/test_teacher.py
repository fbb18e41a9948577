"""Teacher training (`opdiff teacher train`): the denoising loss against a hand computation with the closed-form
VP-linear α, σ for each prediction type, the label-dropout and time-sampling helpers, learning on real digits,
the EMA export, exact resume, label routing, bad input and the command line.

The network is the tiny ``opdiff-unet`` on 1×8×8 images; the data are (the first few hundred of) scikit-learn's
digits, or small synthetic .npz files and PNG folders.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion import teacher as tt
from operator_diffusion.backbones import backbone_from_checkpoint, load_backbone
from operator_diffusion.images import save_png
from operator_diffusion.prediction import eps_from_prediction
from operator_diffusion.schedules import EDM, VE, VPLinear
from operator_diffusion.teacher import (
    TeacherConfig,
    denoising_loss,
    drop_labels,
    plan_teacher,
    prediction_target,
    sample_times,
    train_teacher,
)
from operator_diffusion.training import reset_accelerate_state

from conftest import vp_linear_alpha_sigma

TINY = {"preset": "tiny", "in_channels": 1, "dropout": 0.0}


def config(out: Path, **kw) -> TeacherConfig:
    base = dict(
        data="digits",
        out=str(out),
        backbone_options=dict(TINY),
        num=256,
        batch_size=32,
        lr=2e-3,
        warmup=10,
        ema=0.9,
        max_steps=20,
        save_every=10,
        log_every=1,
    )
    return TeacherConfig(**{**base, **kw})


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate() -> None:
    reset_accelerate_state()


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    reset_accelerate()


def tiny_backbone(prediction: str, **kw):
    torch.manual_seed(0)
    bb = load_backbone("opdiff-unet", **TINY, prediction=prediction, **kw)
    torch.nn.init.normal_(bb.network.out_conv.weight, std=0.1)  # zero-initialised: the output would be 0
    return bb


# --------------------------------------------------------------------------------------------------
# The loss and its parts
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
def test_denoising_loss_matches_a_hand_computation(kind):
    bb = tiny_backbone(kind)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0])
    alpha, sigma = vp_linear_alpha_sigma(t)  # float64 closed form, independent of schedules.py
    a, s = alpha[:, None, None, None], sigma[:, None, None, None]
    x_t = (a * x0.double() + s * eps.double()).float()
    target = {"eps": eps.double(), "x0": x0.double(), "v": a * eps.double() - s * x0.double()}[kind]
    with torch.no_grad():
        out = bb(x_t, t).double()
        per_item = [float(((out[b] - target[b]) ** 2).sum()) / 64 for b in range(6)]
        expected = sum(per_item) / 6
        got = denoising_loss(bb, x0, t, eps)
        w = torch.tensor([0.5, 1, 2, 3, 0, 1.5])
        weighted = denoising_loss(bb, x0, t, eps, weight=w)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    assert float(weighted) == pytest.approx(sum(wi * li for wi, li in zip(w.tolist(), per_item)) / 6, rel=1e-5)
    # the target is what prediction.py converts back to ε (one convention for the v-prediction in the codebase)
    tgt = prediction_target(kind, x0.double(), eps.double(), alpha, sigma)
    back = eps_from_prediction(tgt, x_t.double(), t.double(), VPLinear(), kind)
    torch.testing.assert_close(back, eps.double(), rtol=0, atol=1e-5)


def test_an_exact_denoiser_has_zero_loss():
    """A network that outputs the true ε has loss 0 (checks the loss wires x_t, t and the target consistently)."""
    bb = tiny_backbone("eps")
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.rand(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0.01, 0.3, 0.6, 0.9])
    bb.forward = lambda x_t, tt_, labels=None: (
        (x_t - VPLinear().alpha(tt_)[:, None, None, None] * x0) / VPLinear().sigma(tt_)[:, None, None, None]
    )
    assert float(denoising_loss(bb, x0, t, eps)) < 1e-9


def test_drop_labels_replaces_with_the_null_label_at_the_configured_rate():
    labels = torch.arange(100_000) % 10
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(labels, 0.25, 10, generator=g)
    null = dropped == 10
    assert abs(float(null.float().mean()) - 0.25) < 0.006  # 4.4 standard deviations (0.00137)
    assert torch.equal(dropped[~null], labels[~null])
    for c in range(10):  # independent of the class
        assert abs(float(null[labels == c].float().mean()) - 0.25) < 0.02
    again = drop_labels(labels, 0.25, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, dropped)  # reproducible from the seed
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    assert bool((drop_labels(labels, 1.0, 10) == 10).all())


def test_sample_times_are_uniform_on_the_schedule_range():
    s = VPLinear()
    t = sample_times(s, 200_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    assert float(t.mean()) == pytest.approx((s.t_min + s.t_max) / 2, abs=3e-3)
    hist = torch.histc(t, bins=10, min=s.t_min, max=s.t_max) / len(t)
    assert float((hist - 0.1).abs().max()) < 0.005


def test_default_backbone_for_the_digits_is_the_digits_preset(tmp_path):
    plan = plan_teacher(TeacherConfig(data="digits", out=str(tmp_path / "run")))
    assert plan.backbone.config() == load_backbone("opdiff-unet", preset="digits").config()
    assert plan.backbone_kwargs == {"preset": "digits", "prediction": "eps"}
    assert plan.mixed_precision == ("bf16" if torch.cuda.is_available() else "no")
    assert plan.run_info["data"] == {"kind": "digits", "n": 1797}
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_exports_the_ema_weights(tmp_path):
    out = tmp_path / "run"
    result = train_teacher(config(out, max_steps=80, save_every=80))
    log = metrics(out)
    assert [m["step"] for m in log] == list(range(1, 81))
    first = np.mean([m["loss"] for m in log[:20]])
    last = np.mean([m["loss"] for m in log[-20:]])
    assert first > 0.5  # the zero-initialised output layer predicts ε̂ = 0: loss E[ε²] = 1 at the start
    assert last < 0.4 * first, (first, last)  # measured: 0.705 → 0.139
    assert result.step == 80 and result.checkpoint == out / "teacher.safetensors"
    assert result.final_loss == pytest.approx(log[-1]["loss_avg"])

    rebuilt = backbone_from_checkpoint(out / "teacher.safetensors")
    assert rebuilt.config() == load_backbone("opdiff-unet", **TINY).config()
    # the export holds the EMA weights (saved with the last checkpoint), not the last iterate
    ckpt = out / "checkpoints" / "step_00000080"
    ema = torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True)
    assert ema["updates"] == 80
    params = list(rebuilt.network.parameters())
    assert all(torch.equal(p, ema[f"shadow.{i}"]) for i, p in enumerate(params))
    last_iterate = load_file(ckpt / "model.safetensors")
    key = "down.0.res.0.conv0.weight"
    assert not torch.equal(rebuilt.network.state_dict()[key], last_iterate[f"network.{key}"])

    info = json.loads((out / "teacher.json").read_text())
    assert info["format_version"] == tt.FORMAT_VERSION and info["kind"] == "teacher"
    assert info["steps"] == 80 and info["final_loss"] == pytest.approx(result.final_loss)
    assert info["data"] == {"kind": "digits", "n": 256} and info["backbone"] == rebuilt.config()
    assert set(info["versions"]) == {"opdiff", "torch", "accelerate"}


def test_resume_gives_the_uninterrupted_run(tmp_path):
    """Kill at step 19 (last checkpoint 16, in the middle of an epoch), re-run: same metrics, bit-equal export.
    Dropout, label dropout, flips and gradient accumulation are on, so every source of randomness is covered."""
    kw = dict(
        num=80,
        batch_size=16,
        grad_accum=2,
        max_steps=24,
        save_every=8,
        num_classes=10,
        label_dropout=0.3,
        hflip=True,
        backbone_options={**TINY, "dropout": 0.1},
    )
    full = tmp_path / "full"
    train_teacher(config(full, **kw))
    reset_accelerate()

    class Kill(Exception):
        pass

    def kill_at_19(step, total, m):
        if step == 19:
            raise Kill

    part = tmp_path / "part"
    with pytest.raises(Kill):
        train_teacher(config(part, **kw), progress=kill_at_19)
    reset_accelerate()
    assert [m["step"] for m in metrics(part)][-1] == 19  # logged past the last checkpoint (16) before dying
    result = train_teacher(config(part, **kw))
    assert result.resumed_from == 16
    assert metrics(part) == metrics(full)  # every loss, lr and gradient norm identical, nothing logged twice
    a, b = load_file(full / "teacher.safetensors"), load_file(part / "teacher.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _labelled_npz(path: Path, n: int = 64) -> Path:
    """Constant images whose gray value encodes their label: value = 25·label."""
    labels = np.arange(n) % 10
    images = np.broadcast_to((25 * labels).astype(np.uint8)[:, None, None, None], (n, 8, 8, 1)).copy()
    np.savez(path, images=images, labels=labels)
    return path


def test_labels_are_routed_and_dropped_to_the_null_label(tmp_path, monkeypatch):
    data = _labelled_npz(tmp_path / "labelled.npz")
    seen = []
    original = tt.denoising_loss

    def spy(backbone, x0, t, eps, labels=None, weight=None):
        seen.append((x0.detach().clone(), None if labels is None else labels.clone()))
        return original(backbone, x0, t, eps, labels, weight)

    monkeypatch.setattr(tt, "denoising_loss", spy)
    train_teacher(
        config(
            tmp_path / "cond",
            data=str(data),
            num=None,
            batch_size=16,
            max_steps=40,
            num_classes=10,
            label_dropout=0.5,
            save_every=40,
        )
    )
    labels = torch.cat([y for _, y in seen])
    truth = torch.cat([torch.round((x0[:, 0, 0, 0] + 1) * 127.5 / 25).long() for x0, _ in seen])
    kept = labels != 10  # the tiny opdiff-unet's null label is num_classes
    assert torch.equal(labels[kept], truth[kept])  # each image with its own label
    assert abs(float((~kept).float().mean()) - 0.5) < 0.07  # 640 draws: 3.5 standard deviations
    model = backbone_from_checkpoint(tmp_path / "cond" / "teacher.safetensors")
    assert model.num_classes == 10 and model.null_label == 10
    reset_accelerate()

    seen.clear()  # unconditional training ignores the source's labels
    train_teacher(config(tmp_path / "uncond", data=str(data), num=None, batch_size=16, max_steps=2))
    assert all(y is None for _, y in seen)


def test_bf16_trains_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    train_teacher(config(out, mixed_precision="bf16", max_steps=3))
    assert all(np.isfinite(m["loss"]) for m in metrics(out))
    assert json.loads((out / "teacher.json").read_text())["mixed_precision"] == "bf16"


def test_two_processes_with_torchrun_train_one_synchronized_teacher(tmp_path):
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(
        "from operator_diffusion.teacher import TeacherConfig, train_teacher\n"
        f"train_teacher(TeacherConfig(data='digits', out={str(out)!r}, num=64, batch_size=16, max_steps=4, "
        "save_every=2, "
        f"log_every=1, backbone_options={TINY!r}))\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "teacher.json").read_text())
    assert info["num_processes"] == 2  # and train_teacher checked that both ranks ended with the same weights
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    backbone_from_checkpoint(out / "teacher.safetensors")


# --------------------------------------------------------------------------------------------------
# Bad input: clear error, nothing written
# --------------------------------------------------------------------------------------------------
def snapshot(path: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))} if path.exists() else {}


def _png_folder(path: Path, n: int = 4, shape=(16, 16, 3)) -> Path:
    path.mkdir()
    for i in range(n):
        save_png(np.full(shape, (6 * i) % 256, dtype=np.uint8), path / f"{i}.png")
    return path


def test_bad_input_is_refused_without_writing(tmp_path):
    gray = _png_folder(tmp_path / "gray", 40, (8, 8, 1))
    rgb = _png_folder(tmp_path / "rgb", 40, (16, 16, 3))
    cases = [
        (dict(data=str(tmp_path / "missing")), FileNotFoundError, "is not an image source"),
        (
            dict(backbone_options={"preset": "tiny"}),
            ValueError,
            r"takes images of shape \(3, 8, 8\) \(C, H, W\) but the data holds \(1, 8, 8\)",
        ),
        (
            dict(data=str(rgb), backbone_options={}, num=None, batch_size=8),
            ValueError,
            "choose an opdiff-unet architecture",
        ),
        (dict(data=str(gray), num=None, num_classes=10), ValueError, "--num-classes 10 needs labels"),
        (dict(num_classes=5), ValueError, r"has labels 0..9, outside 0..4"),
        (dict(batch_size=300), ValueError, "holds 256 images, fewer than one batch of 300"),
        (dict(prediction="score"), ValueError, "unknown prediction type 'score'"),
        (dict(backbone_options={**TINY, "prediction": "v"}), ValueError, "contradicts --prediction 'eps'"),
        (dict(backbone_options={**TINY, "foo": 1}), TypeError, "foo"),
        (dict(lr=0.0), ValueError, "lr must be a positive number"),
        (dict(ema=1.0), ValueError, r"ema must lie in \[0, 1\)"),
        (dict(label_dropout=1.5), ValueError, r"label_dropout must lie in \[0, 1\]"),
        (dict(max_steps=0), ValueError, "max_steps must be an integer >= 1"),
        (dict(mixed_precision="fp8"), ValueError, "unknown mixed precision"),
    ]
    for i, (kw, exc, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(exc, match=match):
            train_teacher(config(out, **kw))
        assert not out.exists(), kw
    # --out holding another teacher run, an `opdiff train` run, or other files
    out = tmp_path / "taken"
    train_teacher(config(out, max_steps=2, save_every=2))
    reset_accelerate()
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"holds another run \(differs in train.lr, train.hflip\)"):
        train_teacher(config(out, max_steps=2, lr=5e-4, hflip=True))
    assert snapshot(out) == before
    dsno = tmp_path / "dsno"
    dsno.mkdir()
    (dsno / "run.json").write_text(json.dumps({"format_version": 1, "train": {}}))
    with pytest.raises(ValueError, match="holds an `opdiff train` run, not a teacher run"):
        train_teacher(config(dsno))
    with pytest.raises(ValueError, match="exists and is not an opdiff run directory"):
        train_teacher(config(gray))


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------
def test_cli_dry_run_run_resume_collect_and_usage_errors(tmp_path):
    runner = CliRunner()
    args = [
        "teacher",
        "train",
        "--data",
        "digits",
        "--num",
        "64",
        "-o",
        "preset=tiny",
        "-o",
        "in_channels=1",
        "--batch-size",
        "16",
        "--max-steps",
        "3",
        "--save-every",
        "3",
        "--warmup",
        "1",
    ]
    dry = runner.invoke(app, [*args, "--out", str(tmp_path / "dry"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    resolved = json.loads(dry.output)
    assert resolved["data"]["images"] == 64 and resolved["data"]["shape"] == [1, 8, 8] and resolved["resume"] is False
    assert resolved["backbone"]["in_channels"] == 1 and resolved["parameters"] > 0
    assert not (tmp_path / "dry").exists()

    run = tmp_path / "cli"
    ok = runner.invoke(app, [*args, "--out", str(run)])
    assert ok.exit_code == 0, ok.output
    assert "trained to step 3" in ok.output and (run / "teacher.safetensors").is_file()
    line = next(l for l in ok.output.splitlines() if l.startswith("next: "))
    reset_accelerate()
    again = runner.invoke(app, [*args, "--out", str(run)])
    assert again.exit_code == 0 and "resumed from step 3" in again.output, again.output

    # the printed next command loads the teacher in `opdiff collect`
    cmd = shlex.split(line[len("next: ") :])
    assert cmd[:2] == ["opdiff", "collect"]
    cmd = [str(tmp_path / "traj") if c == "TRAJECTORIES" else "4" if c == "N" else c for c in cmd[1:]]
    collected = runner.invoke(app, [*cmd, "--steps", "8", "--times", "2", "--batch-size", "4", "--shard-size", "4"])
    assert collected.exit_code == 0, collected.output
    assert json.loads((tmp_path / "traj" / "opdiff_collection.json").read_text())["collection"]["image_shape"] == [
        1,
        8,
        8,
    ]

    bad_cases = [
        (["--prediction", "score"], "unknown prediction type 'score'"),
        (["--batch-size", "0"], "batch_size must be an integer >= 1"),
        (["--num-classes", "20", "--num", "64"], None),  # digits labels 0..9 fit 20 classes: fine (dry run)
        (["--data", str(tmp_path / "nowhere")], "is not an image source"),
        (["-o", "preset=tiny", "-o", "in_channels=3"], "takes images of shape (3, 8, 8)"),
        (["--lr", "5e-4"], "holds another run (differs in train.lr)"),
    ]
    for extra, message in bad_cases:
        target = run if message and "another run" in message else tmp_path / "bad"
        res = runner.invoke(app, [*args, "--out", str(target), *extra, *([] if message else ["--dry-run"])])
        if message is None:
            assert res.exit_code == 0, res.output
            continue
        assert res.exit_code == 2, (extra, res.output)
        assert message in " ".join(res.output.split()), (extra, res.output)
        assert not (tmp_path / "bad").exists()


def test_edm_teacher_times_are_edm_log_normal():
    """EDM trains on ln σ ~ N(P_mean = −1.2, P_std = 1.2) (Karras et al. 2022, Table 1): about 84% of the draws
    have σ < 1 (Φ(1)), where a uniform σ on [0.002, 80] puts 1.2%."""
    from scipy.stats import norm

    s = EDM()
    n = 200_000
    t = sample_times(s, n, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and float(t.min()) >= s.t_min and float(t.max()) <= s.t_max
    log = t.double().log()
    assert float(log.mean()) == pytest.approx(-1.2, abs=5 * 1.2 / n**0.5)
    assert float(log.std()) == pytest.approx(1.2, abs=5 * 1.2 / (2 * n) ** 0.5)
    assert float((t < 1).double().mean()) == pytest.approx(norm.cdf(1.0), abs=0.005)


def test_ve_teacher_times_are_log_uniform_in_sigma():
    """VE (NCSN++) trains on σ log-uniform on [σ_min, σ_max]: ln σ is uniform, each tenth of its range holds a tenth."""
    s = VE()
    t = sample_times(s, 200_000, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= s.t_min * (1 - 1e-6) and float(t.max()) <= s.t_max * (1 + 1e-6)
    lo, hi = math.log(s.sigma_min), math.log(s.sigma_max)
    hist = torch.histc(t.double().log(), bins=10, min=lo, max=hi) / len(t)
    assert float((hist - 0.1).abs().max()) < 0.005
