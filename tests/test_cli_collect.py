"""`opdiff collect` and `opdiff data info` through the Typer app: a run, its resumption, the info
listing, the Hub upload (offline), and every refusal (exit 2, one line, folder untouched) or fault
(exit 1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import operator_diffusion.backbones as backbones
from opdiff_cli.main import app
from operator_diffusion import collection_plan, collection_store, teacher_solve
from operator_diffusion.backbones import load_backbone, register_backbone
from operator_diffusion.backbones.unet import OpdiffUNetBackbone
from operator_diffusion.schedules import time_grid

runner = CliRunner()
TINY = ["--backbone", "opdiff-unet", "--backbone-config", "preset=tiny"]
RUN = [*TINY, "--steps", "10", "--num", "6", "--shard-size", "4", "--batch-size", "3"]


def tree(root: Path) -> dict:
    return (
        {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}
        if root.exists()
        else {}
    )


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "c"
    res = runner.invoke(app, ["collect", *RUN, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 shard(s) written" in res.stdout and "11 NFE per trajectory" in res.stdout
    return out


def test_collect_writes_a_collection_and_resumes(done):
    info = collection_store.read_info(done)["collection"]
    assert info["backbone"]["name"] == "opdiff-unet" and info["steps"] == 10 and info["num"] == 6
    assert info["solver"] == collection_plan.DEFAULT_SOLVER and info["grid"] == collection_plan.DEFAULT_GRID
    before = tree(done / "data")
    res = runner.invoke(app, ["collect", *RUN, "--out", str(done)])  # random init is seeded by --seed: same weights
    assert res.exit_code == 0, res.output
    assert "0 shard(s) written, 2 already complete" in res.stdout and tree(done / "data") == before


def test_collect_options_reach_the_library(tmp_path):
    ts = time_grid(load_backbone("opdiff-unet", preset="tiny").schedule, 12, "quadratic")
    out = tmp_path / "o"
    res = runner.invoke(
        app,
        [
            "collect",
            *TINY,
            "--backbone-config",
            '{"num_classes": 3}',
            "--solver",
            "unipc",
            "--solver-option",
            "order=2",
            "--steps",
            "12",
            "--grid",
            "quadratic",
            "--time-list",
            f"{float(ts[3])!r},{float(ts[12])!r},{float(ts[7])!r}",
            "--target",
            "state",
            "--dtype",
            "float32",
            "--labels",
            "1,2",
            "--guidance",
            "1.5",
            "--seed",
            "7",
            "--num",
            "3",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    c = collection_store.read_info(out)["collection"]
    assert (c["solver"], c["solver_options"]["order"], c["grid"], c["output_indices"]) == (
        "unipc",
        2,
        "quadratic",
        [3, 7, 12],
    )
    assert (c["target"], c["dtype"], c["labels"], c["guidance"], c["seed"], c["num_classes"]) == (
        "state",
        "float32",
        [1, 2],
        1.5,
        7,
        3,
    )


def test_precision_auto_prints_the_measured_choice_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """With a fake timing bf16 is twice as fast: chosen, recorded, and both timings printed on one stderr line;
    resumed where the timing says fp32 is faster, the folder's bf16 is kept without measuring."""
    out = tmp_path / "auto"
    monkeypatch.setattr(teacher_solve, "time_calls", lambda calls, *a, **k: {"fp32": 0.2, "bf16": 0.1})
    res = runner.invoke(app, ["collect", *RUN, "--precision", "auto", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cap = torch.backends.cpu.get_cpu_capability()
    assert (
        res.stderr
        == f"precision auto: bf16 (per network evaluation at batch 3 on cpu, CPU capability {cap}: fp32 200 ms, bf16 "
        "100 ms)\n"
    )
    assert collection_store.read_info(out)["collection"]["precision"] == "bf16"
    monkeypatch.setattr(teacher_solve, "time_calls", lambda *a, **k: pytest.fail("measured again on resume"))
    again = runner.invoke(app, ["collect", *RUN, "--precision", "auto", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert again.stderr == f"precision auto: bf16, as recorded in the collection in {out} (not measured again)\n"
    assert "2 already complete" in again.stdout


def test_help_states_the_library_defaults():
    import typer

    helps = {p.name: p.help for p in typer.main.get_command(app).commands["collect"].params}
    assert f"default {collection_plan.DEFAULT_SOLVER} " in helps["solver"]
    assert (
        f"default {collection_plan.DEFAULT_STEPS}." in helps["steps"]
        and f"default {collection_plan.DEFAULT_GRID}." in helps["grid"]
    )


def test_data_info_table_and_json(done):
    res = runner.invoke(app, ["data", "info", str(done), "--json"])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)
    assert (status["complete_shards"], status["num_shards"], status["complete_examples"]) == (2, 2, 6)
    assert status["bytes_per_trajectory"] == 4 * 3 * 8 * 8 * 2
    table = runner.invoke(app, ["data", "info", str(done)])
    assert table.exit_code == 0 and "2 of 2" in table.stdout and "1,536 stored" in table.stdout
    missing = runner.invoke(app, ["data", "info", str(done / "data")])
    assert missing.exit_code == 2 and "no opdiff collection" in missing.stderr


def _checkpoint_of_another_architecture(tmp_path: Path) -> Path:
    path = tmp_path / "digits.safetensors"
    load_backbone("opdiff-unet", preset="digits").save_weights(path)
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time-list", "0.5,0.001"], "not a point of the solver grid; nearest grid times"),
        (["--times", "1"], "at least 2 output times"),
        (["--times", "12"], "use --steps >= 12"),
        (["--solver", "rk4"], "unknown solver 'rk4'; valid: ddim, deis"),
        (["--backbone", "no-such-net"], "unknown backbone 'no-such-net'; available: "),
        (["--solver-option", "order"], "KEY=VALUE"),
        (["--backbone-config", "{not json"], "not a JSON object"),
        (["--labels", "cats"], "--labels takes"),
        (["--labels", "3"], "unconditional"),
        (["--precision", "fp16"], "unknown precision 'fp16'; valid: fp32, bf16, auto"),
        (["--steps", "12"], "holds a different collection (nfe_per_trajectory: 11 → 13; output_indices"),
        (["--checkpoint", "CKPT"], "does not match backbone 'opdiff-unet'"),
        (["--checkpoint", "missing.safetensors"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(done, tmp_path, args, message):
    args = [str(_checkpoint_of_another_architecture(tmp_path)) if a == "CKPT" else a for a in args]
    before = tree(done)
    res = runner.invoke(app, ["collect", *RUN, *args, "--out", str(done)])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert tree(done) == before


class NanUNet(OpdiffUNetBackbone):
    """A teacher that returns NaN for the item started from seed 4's noise."""

    name = "nan-unet"

    def eps_fn(self, x, t, labels=None):
        bad = torch.randn(self.image_shape, generator=torch.Generator().manual_seed(4))
        hit = (x == bad).flatten(1).all(1)
        return torch.where(hit[:, None, None, None], torch.nan, super().eps_fn(x, t, labels))


def test_nan_from_the_teacher_exits_1_naming_the_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(backbones, "_registered", dict(backbones._registered))
    register_backbone("nan-unet", NanUNet)
    out = tmp_path / "n"
    res = runner.invoke(app, ["collect", "--backbone", "nan-unet", *RUN[2:], "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "seeds [4]" in res.stderr and res.stderr.count("\n") == 1
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00002.parquet"]


def test_push_to_hub_offline(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    remote = tmp_path / "remote"

    class Hub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            remote.mkdir(exist_ok=True)

        def upload_folder(self, *, folder_path, allow_patterns, **kw):
            for pattern in allow_patterns:
                for p in Path(folder_path).glob(pattern):
                    (remote / p.relative_to(folder_path)).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(p, remote / p.relative_to(folder_path))

    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    res = runner.invoke(app, ["collect", *RUN, "--out", str(tmp_path / "c"), "--push-to-hub", "me/traj"])
    assert res.exit_code == 0, res.output
    assert "uploaded to https://huggingface.co/datasets/me/traj" in res.stdout
    ds = datasets.load_dataset(str(remote), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["trajectory"] == datasets.Array4D((4, 3, 8, 8), "float16") and len(ds) == 6


def test_a_checkpoint_saved_by_opdiff_is_enough_on_its_own(tmp_path):
    """Issue 16, item 7: `collect --checkpoint F` needs no --backbone, and `--backbone opdiff-unet --checkpoint F`
    needs no repeated -o preset=…: both give the collection that the full description gives (the same identity and
    content hash), where the second used to fail on hundreds of missing keys."""
    torch.manual_seed(3)
    teacher = load_backbone("opdiff-unet", preset="tiny")
    with torch.no_grad():
        teacher.network.out_conv.weight.normal_(std=0.05)
    ckpt = tmp_path / "teacher.safetensors"
    teacher.save_weights(ckpt)
    rest = [*RUN[4:], "--checkpoint", str(ckpt)]
    hashes = {}
    for key, args in {"full": TINY, "alone": [], "named": ["--backbone", "opdiff-unet"]}.items():
        res = runner.invoke(app, ["collect", *args, *rest, "--out", str(tmp_path / key)])
        assert res.exit_code == 0, res.output
        hashes[key] = collection_store.content_hash(tmp_path / key)
    assert hashes["alone"] == hashes["named"] == hashes["full"]
    info = json.loads((tmp_path / "alone" / "opdiff_collection.json").read_text())["collection"]
    assert (
        info["checkpoint_sha256"]
        == json.loads((tmp_path / "full" / "opdiff_collection.json").read_text())["collection"]["checkpoint_sha256"]
    )
    none = runner.invoke(app, ["collect", *RUN[4:], "--out", str(tmp_path / "none")])
    assert none.exit_code == 2 and "pass --backbone NAME" in none.stderr and none.stderr.count("\n") == 1
    assert not (tmp_path / "none").exists()
