"""A diffusers model taken through collect → train → sample --teacher → bench as the docs say (issue 16, item 1):
the teacher is rebuilt from what the collection recorded (the model folder or Hub id, and the weights' hash).

References: the weights saved by diffusers' own ``save_pretrained`` (read back with safetensors), and the UNet
called directly with the timestep t·N − 1.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.runs import reset_accelerate_state
from operator_diffusion.sampling import run_teacher

from diffusers_doubles import tiny_unet

runner = CliRunner()
SMALL = dict(sample_size=8, in_channels=1, out_channels=1)  # 1×8×8: a collection of 8 trajectories in a second


def cli(*args):
    result = runner.invoke(app, [str(a) for a in args])
    reset_accelerate_state()  # each `train` builds its own Accelerator
    return result


@pytest.fixture(scope="module")
def diffusers_run(tmp_path_factory):
    """A DDPMPipeline-layout folder (unet/ + scheduler/) of a tiny random UNet, collected and trained by the CLI."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("diffusers_run")
    unet = tiny_unet(seed=4, **SMALL)
    unet.save_pretrained(root / "model" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "model" / "scheduler")
    collected = cli(
        "collect",
        "--backbone",
        "diffusers-unet2d",
        "-o",
        f"pretrained={root / 'model'}",
        "--steps",
        "8",
        "--times",
        "2",
        "--num",
        "8",
        "--batch-size",
        "8",
        "--out",
        root / "data",
    )
    assert collected.exit_code == 0, collected.output
    trained = cli(
        "train", "--data", root / "data", "--out", root / "run", "--batch-size", "4", "--max-steps", "1",
        "--save-every", "1", "--warmup", "0",
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    weights = load_file(str(root / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    return {"root": root, "unet": unet, "weights": weights}


def same_weights(network, weights):
    state = network.state_dict()
    return state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)


def test_the_collection_records_the_model_folder(diffusers_run):
    info = json.loads((diffusers_run["root"] / "data" / "opdiff_collection.json").read_text())
    source = info["teacher_source"]
    assert source["name"] == "diffusers-unet2d" and source["pretrained"] == str((diffusers_run["root"] / "model"))
    assert source["subfolder"] == "unet" and "teacher_source" not in info["collection"]  # provenance, not identity
    run_info = json.loads((diffusers_run["root"] / "run" / "config.json").read_text())
    assert run_info["teacher_source"] == source


def test_train_starts_from_the_diffusers_teacher_by_default(diffusers_run):
    """Without --init-from the student's backbone holds the model folder's weights (it had random weights)."""
    from operator_diffusion.configs import TrainConfig
    from operator_diffusion.training import plan_run

    root = diffusers_run["root"]
    plan = plan_run(TrainConfig(data=str(root / "data"), out=str(root / "unused"), batch_size=4))
    assert same_weights(plan.model.backbone.network, diffusers_run["weights"])
    assert plan.run_info["init_is_teacher"] and plan.init_source["pretrained"] == str(root / "model")
    scratch = plan_run(
        TrainConfig(data=str(root / "data"), out=str(root / "unused"), batch_size=4, init_from="scratch")
    )
    assert not same_weights(scratch.model.backbone.network, diffusers_run["weights"])


def test_sample_teacher_and_bench_rebuild_the_diffusers_teacher(diffusers_run, tmp_path):
    """`opdiff sample RUN --teacher` and `opdiff bench RUN` answered "'the configured backbone' is not the teacher"."""
    root = diffusers_run["root"]
    info = json.loads((root / "run" / "config.json").read_text())
    teacher = run_teacher(info)
    assert same_weights(teacher.network, diffusers_run["weights"])
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.9, 0.3], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, t), diffusers_run["unet"](x, t * 1000 - 1).sample, rtol=1e-5, atol=1e-6)
    sampled = cli("sample", root / "run", "--out", tmp_path / "s", "--num", "2", "--teacher", "--format", "npz")
    assert sampled.exit_code == 0, sampled.output
    assert (tmp_path / "s" / "teacher" / "samples.npz").is_file()
    benched = cli("bench", root / "run", "--num", "2", "--nfe", "1", "--solvers", "ddim", "--json")
    assert benched.exit_code == 0, benched.output


def test_a_moved_model_folder_is_found_through_the_runs_init_from_or_named(diffusers_run, tmp_path):
    """The recorded folder is gone: the run's --init-from file holding the same weights is tried, else the error
    says what is missing and which flag takes the weights (a model folder is accepted)."""
    root = diffusers_run["root"]
    info = json.loads((root / "run" / "config.json").read_text())
    moved = tmp_path / "moved"
    shutil.copytree(root / "model", moved)
    gone = {**info, "teacher_source": {**info["teacher_source"], "pretrained": str(tmp_path / "gone")}}
    with pytest.raises(ValueError, match=r"cannot find the teacher's weights of this run: its source .*gone.* does "):
        run_teacher(gone)
    init_file = moved / "unet" / "diffusion_pytorch_model.safetensors"
    found = run_teacher({**gone, "train": {**gone["train"], "init_from": str(init_file)}})
    assert same_weights(found.network, diffusers_run["weights"])
    assert same_weights(run_teacher(gone, moved).network, diffusers_run["weights"])  # --teacher-checkpoint DIR
    other = tiny_unet(seed=9, **SMALL)
    other.save_pretrained(tmp_path / "other" / "unet")
    DDPMScheduler().save_pretrained(tmp_path / "other" / "scheduler")
    changed = {**info, "teacher_source": {**info["teacher_source"], "pretrained": str(tmp_path / "other")}}
    with pytest.raises(ValueError, match="holds other weights now"):
        run_teacher(changed)


def test_the_ignored_scheduler_settings_get_one_warning_line_per_run(diffusers_run, tmp_path):
    """DDPMScheduler's saved config has clip_sample=True and timestep_spacing='leading', which opdiff ignores: one
    line names them, although `sample --teacher` builds the backbone twice (the student's and the teacher)."""
    root = diffusers_run["root"]
    sampled = cli("sample", root / "run", "--out", tmp_path / "s", "--num", "2", "--teacher", "--format", "npz")
    assert sampled.exit_code == 0, sampled.output
    lines = [line for line in sampled.stderr.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, sampled.stderr
    assert "clip_sample=True, timestep_spacing='leading'" in lines[0] and "Warning" not in sampled.stderr
