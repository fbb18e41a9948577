"""`opdiff sample`: stored images against direct model calls and direct solver calls on the per-seed noise,
the teacher's samples against the collected trajectories, batch-size independence, layout, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.adapter import DSNO
from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection_store import load_collection
from operator_diffusion.images import read_image, read_image_folder, to_uint8
from operator_diffusion.sampling import parse_labels, parse_seeds
from operator_diffusion.schedules import time_grid
from operator_diffusion.seeds import example_inputs
from operator_diffusion.solvers import solve

from conftest import TINY_TEACHER

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, ["sample", *map(str, args)])


def noise(seeds, shape=(1, 8, 8)):
    g = [torch.Generator().manual_seed(s) for s in seeds]  # the collection's noise rule, written out again
    return torch.stack([torch.randn(shape, generator=gi) for gi in g])


# --------------------------------------------------------------------------------------------------
def test_parse_seeds_and_labels():
    assert parse_seeds("0-3,10,12-13") == [0, 1, 2, 3, 10, 12, 13]
    assert parse_seeds("5") == [5] and parse_seeds([2, 1]) == [2, 1]
    for bad, msg in (
        ("3-1", "below the start"),
        ("a-b", "is not N or A-B"),
        ("0-2,1", "repeats seeds"),
        ("-1", "not N or A-B"),
    ):
        with pytest.raises(ValueError, match=msg):
            parse_seeds(bad)
    assert parse_labels(None, 0) is None and parse_labels(None, 10) == "random"
    assert parse_labels("3", 10) == 3 and parse_labels("1,2", 10) == (1, 2)
    with pytest.raises(ValueError, match="outside"):
        parse_labels("10", 10)
    with pytest.raises(ValueError, match="unconditional"):
        parse_labels("1", 0)


def test_dsno_samples_are_the_model_on_the_seed_noise_whatever_the_batch_size(tiny_run, tmp_path):
    seeds = [3, 60, 61, 100, 7, 8, 9]
    a = run_cli(
        tiny_run["run"],
        "--out",
        tmp_path / "a",
        "--seeds",
        "3,60-61,100,7-9",
        "--format",
        "png,npz",
        "--batch-size",
        "7",
    )
    b = run_cli(
        tiny_run["run"], "--out", tmp_path / "b", "--seeds", "3,60-61,100,7-9", "--format", "npz", "--batch-size", "2"
    )
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    model = DSNO.load(tiny_run["run"] / "model.safetensors")
    with torch.no_grad():
        direct = model(noise(seeds))[:, -1]  # (N, 1, 8, 8): the last output time
    za, zb = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert za["seeds"].tolist() == seeds and za["images"].shape == (7, 8, 8, 1)
    expected = to_uint8(direct)
    # float round-off differs with the batch size on CPU: pixels may move by one level at a rounding boundary
    for z in (za, zb):
        diff = np.abs(z["images"].astype(int) - expected.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    pngs = read_image_folder(tmp_path / "a")  # the sample folder means its images/ subfolder
    assert pngs.images.shape == (7, 8, 8, 1)
    files = sorted(p.name for p in (tmp_path / "a" / "images").iterdir())
    assert files == sorted(f"{s:06d}.png" for s in seeds)
    np.testing.assert_array_equal(read_image(tmp_path / "a" / "images" / "000060.png"), za["images"][1])


def test_default_seeds_are_held_out_and_all_times_give_trajectories(tiny_run, tmp_path):
    r = run_cli(
        tiny_run["run"], "--out", tmp_path / "s", "--num", "5", "--times", "all", "--format", "png,npz,grid", "--json"
    )
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "s" / "opdiff_samples.json").read_text())
    coll = json.loads((tiny_run["data"] / "opdiff_collection.json").read_text())["collection"]
    assert info["seeds"] == "48-52" and coll["seed"] + coll["num"] == 48  # right after the 48 training seeds
    z = np.load(tmp_path / "s" / "samples.npz")
    assert z["images"].shape == (5, 4, 8, 8, 1)
    np.testing.assert_allclose(z["times"], coll["output_times"])
    model = DSNO.load(tiny_run["run"] / "model.safetensors")
    with torch.no_grad():
        direct = to_uint8(model(noise(range(48, 53))))
    assert np.abs(z["images"].astype(int) - direct.astype(int)).max() <= 1
    strip = read_image(tmp_path / "s" / "trajectories" / "000048.png")
    assert strip.shape[1] > 4 * strip.shape[0] // 2  # four frames side by side
    for name in ("grid.png", "trajectories.png"):
        assert (tmp_path / "s" / name).is_file()


def test_selected_and_query_times(tiny_run, tmp_path):
    coll = json.loads((tiny_run["data"] / "opdiff_collection.json").read_text())["collection"]
    t = coll["output_times"]
    r = run_cli(
        tiny_run["run"], "--out", tmp_path / "sel", "--num", "3", "--times", f"{t[1]},{t[3]}", "--format", "npz"
    )
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "sel" / "samples.npz")
    np.testing.assert_allclose(z["times"], [t[1], t[3]])
    query = [0.8, 0.6, 0.4, 0.2, 0.05, 0.001]
    r = run_cli(
        tiny_run["run"],
        "--out",
        tmp_path / "q",
        "--num",
        "3",
        "--query-times",
        ",".join(map(str, query)),
        "--times",
        "all",
        "--format",
        "npz",
    )
    assert r.exit_code == 0, r.output
    model = DSNO.load(tiny_run["run"] / "model.safetensors")
    with torch.no_grad():
        direct = to_uint8(model(noise(range(48, 51)), times=query))
    z = np.load(tmp_path / "q" / "samples.npz")
    assert z["images"].shape == (3, 6, 8, 8, 1)
    assert np.abs(z["images"].astype(int) - direct.astype(int)).max() <= 1


def test_teacher_samples_match_a_direct_solve_and_the_collected_trajectories(tiny_run, tmp_path):
    # training seeds 0-5: the collection stored the teacher's final x̂_0 for them (fp16)
    r = run_cli(tiny_run["run"], "--out", tmp_path / "t", "--seeds", "0-5", "--teacher", "--format", "npz,grid")
    assert r.exit_code == 0, r.output
    teacher = np.load(tmp_path / "t" / "teacher" / "samples.npz")["images"]
    ds, _ = load_collection(tiny_run["data"])
    stored = torch.tensor(np.array(ds.with_format("numpy")[:6]["trajectory"]), dtype=torch.float32)[:, -1]
    assert np.abs(teacher.astype(int) - to_uint8(stored).astype(int)).max() <= 1
    # and an independent solve: unipc, 16 steps, quadratic grid, x̂_0 at the last time
    bb = load_backbone("opdiff-unet", **TINY_TEACHER, checkpoint=str(tiny_run["teacher"]))
    ts = time_grid(bb.schedule, 16, "quadratic")
    with torch.no_grad():
        out = solve(bb.eps_fn, noise(range(6)), bb.schedule, ts, "unipc", record=[16], record_denoised=True)
    assert np.abs(teacher.astype(int) - to_uint8(out.denoised[:, 0]).astype(int)).max() <= 1
    assert (tmp_path / "t" / "side_by_side.png").is_file()
    info = json.loads((tmp_path / "t" / "teacher" / "opdiff_samples.json").read_text())
    assert info["nfe"] == 17 and info["solver"].startswith("unipc (16 steps")
    # another solver on request: DDIM with 4 steps is a different (cruder) teacher sample
    r = run_cli(
        tiny_run["run"],
        "--out",
        tmp_path / "d",
        "--seeds",
        "0-5",
        "--teacher",
        "--solver",
        "ddim",
        "--steps",
        "4",
        "--format",
        "npz",
    )
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        ddim = solve(
            bb.eps_fn,
            noise(range(6)),
            bb.schedule,
            time_grid(bb.schedule, 4, "quadratic"),
            "ddim",
            record=[4],
            record_denoised=True,
        )
    got = np.load(tmp_path / "d" / "teacher" / "samples.npz")["images"]
    assert np.abs(got.astype(int) - to_uint8(ddim.denoised[:, 0]).astype(int)).max() <= 1


def test_class_labels_follow_the_noise_rule(tmp_path):
    torch.manual_seed(1)
    bb = load_backbone("opdiff-unet", **TINY_TEACHER, num_classes=3)
    model = DSNO(bb, [0.5, 0.25, 0.1, 0.001], init="small")
    model.save(tmp_path / "cond.safetensors")
    r = run_cli(tmp_path / "cond.safetensors", "--out", tmp_path / "s", "--seeds", "0-5", "--format", "npz")
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "s" / "samples.npz")
    x, y = example_inputs(range(6), (1, 8, 8), "random", 3)
    assert z["labels"].tolist() == y.tolist()
    with torch.no_grad():
        direct = to_uint8(model(x, y)[:, -1])
    assert np.abs(z["images"].astype(int) - direct.astype(int)).max() <= 1
    r = run_cli(
        tmp_path / "cond.safetensors", "--out", tmp_path / "f", "--seeds", "0-5", "--labels", "2,0", "--format", "npz"
    )
    assert r.exit_code == 0 and np.load(tmp_path / "f" / "samples.npz")["labels"].tolist() == [2, 0, 2, 0, 2, 0]


def snapshot(path: Path) -> dict:
    return {str(p): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def test_bad_input_is_refused_and_nothing_is_overwritten(tiny_run, tmp_path):
    ok = run_cli(tiny_run["run"], "--out", tmp_path / "s", "--num", "2")
    assert ok.exit_code == 0
    before = snapshot(tmp_path / "s")
    again = run_cli(tiny_run["run"], "--out", tmp_path / "s", "--num", "3")
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert snapshot(tmp_path / "s") == before
    # a run from another opdiff version, a corrupted checkpoint, a pickle in disguise
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run["run"], old)
    cfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run["run"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_run["run"], pickled)
    torch.save(load_file(tiny_run["run"] / "model.safetensors"), pickled / "model.safetensors")
    cases = [
        ((tmp_path / "nowhere",), "neither an `opdiff train` run folder nor a DSNO checkpoint"),
        ((tiny_run["data"],), "not a finished `opdiff train` run"),
        ((old,), "format_version 99"),
        ((broken,), "not a readable safetensors file"),
        ((pickled,), "not a readable safetensors file"),
        ((tiny_run["run"], "--labels", "1"), "unconditional"),
        ((tiny_run["run"], "--seeds", "5-1"), "below the start"),
        ((tiny_run["run"], "--seeds", "0-4", "--num", "3"), "--num 3 but --seeds lists 5"),
        ((tiny_run["run"], "--times", "0.3"), "not an output time"),
        ((tiny_run["run"], "--format", "gif"), "unknown --format gif"),
        ((tiny_run["run"], "--query-times", "2.0,0.5"), "bad --query-times"),
        ((tiny_run["run"], "--query-times", "0.5"), "carry only 1 Fourier modes"),  # was exit 1
        ((tiny_run["run"], "--solver", "ddim"), "only apply with --teacher"),
        ((tiny_run["run"], "--teacher", "--solver", "rk45"), "cannot set up the teacher"),
        (
            (tiny_run["run"], "--teacher", "--teacher-checkpoint", tiny_run["run"] / "model.safetensors"),
            "cannot set up the teacher",
        ),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        r = run_cli(*args, "--out", out)
        assert r.exit_code == 2, (args, r.output)
        assert message in " ".join(r.output.split()), (args, r.output)
        assert not out.exists()


def test_the_teacher_must_be_the_collections(tiny_run, tmp_path):
    other = load_backbone("opdiff-unet", **TINY_TEACHER)  # same architecture, other weights
    other.save_weights(tmp_path / "other.safetensors")
    r = run_cli(
        tiny_run["run"], "--out", tmp_path / "s", "--teacher", "--teacher-checkpoint", tmp_path / "other.safetensors"
    )
    assert r.exit_code == 2 and "is not the teacher this run was distilled from" in " ".join(r.output.split())
    assert not (tmp_path / "s").exists()


def test_fid_of_a_run_samples_it_with_held_out_seeds(tiny_run, tmp_path):
    from operator_diffusion.fid import FeatureNet

    torch.manual_seed(0)
    FeatureNet(in_channels=1, image_size=8, width=8, feature_dim=4, num_classes=0).save(tmp_path / "f.safetensors")
    r = run_cli(tiny_run["run"], "--out", tmp_path / "s", "--num", "20", "--format", "png")
    assert r.exit_code == 0, r.output
    fid = runner.invoke(
        app,
        [
            "fid",
            str(tiny_run["run"]),
            "--num",
            "20",
            "--ref",
            str(tmp_path / "s"),
            "--feature-extractor",
            str(tmp_path / "f.safetensors"),
            "--json",
        ],
    )
    assert fid.exit_code == 0, fid.output
    out = json.loads(fid.output[fid.output.index("{") :])
    # the same 20 held-out seeds as `opdiff sample`: the same images (up to 1-level round-off) → FID ≈ 0
    assert out["n_source"] == 20 and out["fid"] < 1e-3 and "seeds 48-67" in out["source"]
    bad = runner.invoke(
        app,
        ["fid", "digits", "--seeds", "0-3", "--ref", "digits", "--feature-extractor", str(tmp_path / "f.safetensors")],
    )
    assert bad.exit_code == 2 and "--seeds only applies" in bad.output


def test_the_teacher_of_a_run_is_found_from_what_the_collection_recorded(tiny_run, tmp_path):
    """bench and sample --teacher rebuild the teacher without --teacher-checkpoint: from the run's --init-from,
    else the file the collection recorded, else a shipped teacher with the recorded sha256; a missing file with
    no match is a one-line error. The rebuilt weights hash to the collection's (checked against the file)."""
    import shutil

    from operator_diffusion.provenance import weights_sha256
    from operator_diffusion.sampling import run_teacher

    info = json.loads((tiny_run["run"] / "config.json").read_text())
    assert info["teacher_checkpoint"] == str(Path(tiny_run["teacher"]).resolve())
    no_init = {**info, "train": {**info["train"], "init_from": None}}
    teacher = run_teacher(no_init)  # found through the collection's record
    direct = load_backbone(**info["collection"]["backbone"])
    direct.load_weights(tiny_run["teacher"])
    assert weights_sha256(teacher) == weights_sha256(direct)
    moved = tmp_path / "moved.safetensors"
    shutil.copy(tiny_run["teacher"], moved)
    with pytest.raises(ValueError, match=r"cannot find the teacher's weights of this run \(the collection's file"):
        run_teacher({**no_init, "teacher_checkpoint": str(tmp_path / "gone.safetensors")})
    assert weights_sha256(run_teacher({**no_init, "teacher_checkpoint": str(moved)})) == weights_sha256(direct)


def test_a_run_distilled_from_the_shipped_digits_teacher_finds_it_by_hash():
    """The collection recorded only the shipped file's hash and a path that no longer exists: the shipped
    digits teacher is found among opdiff's own assets."""
    from operator_diffusion.demo import DIGITS_TEACHER
    from operator_diffusion.provenance import file_sha256, weights_sha256
    from operator_diffusion.sampling import run_teacher

    direct = load_backbone("opdiff-unet", preset="digits")
    direct.load_weights(DIGITS_TEACHER)
    coll = {
        "backbone": direct.config(),
        "checkpoint_sha256": file_sha256(DIGITS_TEACHER),
        "weights_sha256": weights_sha256(direct),
    }
    teacher = run_teacher({"collection": coll, "train": {}, "teacher_checkpoint": "/nonexistent/teacher.safetensors"})
    assert weights_sha256(teacher) == weights_sha256(direct)


def test_a_teacher_that_loads_its_own_weights_file_is_rebuilt_from_the_collections_record(tiny_run, tmp_path):
    """`collect -o checkpoint=F` (the backbone option, not --checkpoint): the collection's identity has no checkpoint
    hash and the config drops the option, so the teacher was rebuilt with random weights; the collection now records
    the backbone's source (config and file), and bench / sample --teacher rebuild it from that."""
    from operator_diffusion.collection import collect
    from operator_diffusion.collection_plan import CollectConfig
    from operator_diffusion.collection_store import read_info
    from operator_diffusion.provenance import weights_sha256
    from operator_diffusion.sampling import run_teacher

    teacher = load_backbone("opdiff-unet", **TINY_TEACHER, checkpoint=str(tiny_run["teacher"]))
    collect(teacher, tmp_path / "data", CollectConfig(num=2, steps=16, shard_size=2, batch_size=2))
    info = read_info(tmp_path / "data")
    assert info["collection"]["checkpoint_sha256"] is None
    assert info["teacher_source"]["checkpoint"] == str(Path(tiny_run["teacher"]).resolve())
    direct = load_backbone(**info["collection"]["backbone"])
    direct.load_weights(tiny_run["teacher"])
    rebuilt = run_teacher({"collection": info["collection"], "train": {}, "teacher_source": info["teacher_source"]})
    assert weights_sha256(rebuilt) == weights_sha256(direct) == info["collection"]["weights_sha256"]


def test_overwrite_leaves_only_the_new_samples(tiny_run, tmp_path):
    """`sample --overwrite` with fewer seeds: the folder holds exactly the new seeds' PNGs (the probe found 12
    PNGs for 4 seeds, which `opdiff fid` then read); a file of the user's in it is kept."""
    out = tmp_path / "s"
    first = run_cli(tiny_run["run"], "--out", out, "--seeds", "100-111", "--format", "png")
    assert first.exit_code == 0, first.output
    (out / "images" / "notes.png").write_bytes(b"not ours")
    again = run_cli(tiny_run["run"], "--out", out, "--seeds", "200-203", "--format", "png", "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{s:06d}.png" for s in range(200, 204)] + [
        "notes.png"
    ]
