"""Checkpoints a run resumes from (issue 16, items 14 and 16): each checkpoint records the sha256 of its files at
save time; a truncated file falls back to the previous complete checkpoint (one warning line), or stops with one
line naming the file when none is left; a file changed since it was written is refused before ``load_state``
unpickles it. Both trainers (DSNO and teacher) share this through ``runs``."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.runs import (
    CHECKPOINT_HASHES,
    CheckpointError,
    DamagedCheckpointError,
    reset_accelerate_state,
    verify_checkpoint,
)
from operator_diffusion.training import TrainConfig, train

runner = CliRunner()


@pytest.fixture(autouse=True)
def _reset():
    yield
    reset_accelerate_state()


def config(tiny_run, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(tiny_run["data"]),
        out=str(out),
        init_from=str(tiny_run["teacher"]),
        batch_size=8,
        max_steps=4,
        save_every=2,
        log_every=1,
        warmup=1,
        lr=1e-3,
        ema=0.9,
        backbone_options={"dropout": 0.1},  # draws that must repeat on resume
    )
    return TrainConfig(**{**base, **kw})


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:08d}"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def train_args(tiny_run, out: Path, steps: int) -> list[str]:
    return [
        "train",
        "--data",
        str(tiny_run["data"]),
        "--init-from",
        str(tiny_run["teacher"]),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--save-every",
        "2",
        "--log-every",
        "1",
        "--warmup",
        "1",
        "--lr",
        "1e-3",
        "--ema",
        "0.9",
        "-o",
        "dropout=0.1",
    ]  # the arguments of ``config``: the same run


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(config(tiny_run, out, max_steps=6))
    reset_accelerate_state()
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl"])
def test_a_truncated_checkpoint_file_falls_back_to_the_previous_checkpoint(tiny_run, tmp_path, uninterrupted, damaged):
    out = tmp_path / "run"
    train(config(tiny_run, out))
    reset_accelerate_state()
    truncate(ckpt(out, 4) / damaged)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config(tiny_run, out, max_steps=6))
    messages = [str(w.message) for w in caught if str(ckpt(out, 4) / damaged) in str(w.message)]
    assert len(messages) == 1 and "truncated" in messages[0] and "\n" not in messages[0], messages
    assert result.resumed_from == 2
    got = load_file(out / "model.safetensors")  # resumed exactly from step 2: the uninterrupted run's weights
    assert got.keys() == uninterrupted.keys() and all(torch.equal(got[k], uninterrupted[k]) for k in got)
    for step in (4, 6):  # the damaged step-4 checkpoint was rewritten on the way, whole
        verify_checkpoint(ckpt(out, step))
    assert (ckpt(out, 4) / damaged).stat().st_size == (ckpt(out, 6) / damaged).stat().st_size


def test_a_truncated_file_with_no_earlier_checkpoint_is_one_line_naming_it(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_run, out, max_steps=2))
    reset_accelerate_state()
    bad = ckpt(out, 2) / "model.safetensors"
    truncate(bad)
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    result = runner.invoke(app, train_args(tiny_run, out, 4))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(bad) in " ".join(result.stderr.split()) and "no earlier" in err[0], result.stderr
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before  # nothing changed, nothing written


def test_a_changed_optimizer_file_is_refused_before_it_is_unpickled(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_run, out))
    reset_accelerate_state()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    opt = ckpt(out, 4) / "optimizer.bin"
    planted = pickle.dumps(Payload())
    opt.write_bytes(planted + b"\0" * max(0, opt.stat().st_size - len(planted)))  # as long as the real one
    with pytest.raises(CheckpointError, match="optimizer.bin' changed since it was written") as e:
        train(config(tiny_run, out, max_steps=6))
    assert not isinstance(e.value, DamagedCheckpointError)  # refused, not skipped
    assert not marker.exists()
    reset_accelerate_state()
    result = runner.invoke(app, train_args(tiny_run, out, 6))
    assert result.exit_code == 2 and not marker.exists(), result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(opt) in " ".join(result.stderr.split()), result.stderr


def test_a_flipped_byte_and_an_added_file_are_refused(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_run, out, max_steps=2))
    reset_accelerate_state()
    c = ckpt(out, 2)
    verify_checkpoint(c)
    rng = c / "random_states_0.pkl"
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="random_states_0.pkl' changed"):
        verify_checkpoint(c)
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))
    (c / "custom_checkpoint_9.pkl").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="custom_checkpoint_9.pkl' was added"):
        verify_checkpoint(c)
    (c / "custom_checkpoint_9.pkl").unlink()
    (c / CHECKPOINT_HASHES).unlink()  # a run that records hashes: a checkpoint without them is refused
    with pytest.raises(CheckpointError, match=f"has no {CHECKPOINT_HASHES}"):
        train(config(tiny_run, out, max_steps=4))


def test_a_run_written_before_hashes_were_recorded_still_resumes(tiny_run, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_run, out, max_steps=2))
    reset_accelerate_state()
    (ckpt(out, 2) / CHECKPOINT_HASHES).unlink()
    info = json.loads((out / "run.json").read_text())
    del info["checkpoint_hashes"]
    (out / "run.json").write_text(json.dumps(info))
    assert train(config(tiny_run, out, max_steps=4)).resumed_from == 2
    verify_checkpoint(ckpt(out, 4))  # its new checkpoints record them


def test_a_changed_teacher_checkpoint_is_refused(tmp_path):
    from operator_diffusion.teacher import TeacherConfig, train_teacher

    def cfg(steps):
        return TeacherConfig(data="digits", out=str(tmp_path / "t"), max_steps=steps, batch_size=8, save_every=2)

    train_teacher(cfg(2))
    reset_accelerate_state()
    opt = ckpt(tmp_path / "t", 2) / "optimizer.bin"
    data = bytearray(opt.read_bytes())
    data[-100] ^= 0x01
    opt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.bin' changed since it was written"):
        train_teacher(cfg(4))
    reset_accelerate_state()
    shutil.rmtree(tmp_path / "t")
