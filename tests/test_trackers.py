"""`opdiff train --tracker tensorboard` (tensorboard is a dev extra): the event file, read back with tensorboard's
own EventAccumulator, holds the loss and every per-time term L_i at each logged step, the values metrics.jsonl
records, and the loss is (1/M) Σ w_i L_i of the run's loss weights."""

from __future__ import annotations

import json

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from opdiff_cli.main import app

from conftest import reset_accelerate

runner = CliRunner()


def test_tensorboard_tracker_logs_the_loss_and_the_per_time_terms(tiny_run, tmp_path):
    from operator_diffusion.configs import TrainConfig
    from operator_diffusion.training import plan_run

    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_run["data"]), "--out", str(out), "--batch-size", "8", "--max-steps", "6"]
    r = runner.invoke(app, [*args, "--log-every", "2", "--save-every", "6", "--tracker", "tensorboard"])
    reset_accelerate()
    assert r.exit_code == 0, r.output
    events = list((out / "logs" / "opdiff-train").glob("events.out.tfevents.*"))  # (the hparams go to a subfolder)
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    M = len(json.loads((tiny_run["data"] / "opdiff_collection.json").read_text())["collection"]["output_times"])
    assert {"loss", "lr", *(f"loss_t{i}" for i in range(1, M + 1)), *(f"share_t{i}" for i in range(1, M + 1))} <= tags
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss")] == [m["step"] for m in logged] == [2, 4, 6]
    weights = plan_run(
        TrainConfig(data=str(tiny_run["data"]), out=str(tmp_path / "unused"), batch_size=8)
    ).weights.numpy()
    for key in ["loss", *(f"loss_t{i}" for i in range(1, M + 1))]:
        got = np.array([e.value for e in acc.Scalars(key)])
        assert np.allclose(got, [m[key] for m in logged], rtol=1e-6), key  # float32 in the event file
    for step, event in enumerate(acc.Scalars("loss")):
        terms = np.array([acc.Scalars(f"loss_t{i}")[step].value for i in range(1, M + 1)])
        assert np.isclose(event.value, np.mean(weights * terms), rtol=1e-5)
