"""`opdiff push` and runs from the Hub, offline: a fake `HfApi` that writes the upload into a local folder (the
"remote"), then `opdiff sample`/`bench` on that folder, on a Hub id through a monkeypatched `snapshot_download`,
and on a Hub id through the real `snapshot_download` reading a Hub cache offline. Every sample is checked against
sampling the original run on the same seeds; the card's commands are checked by running them."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from opdiff_cli.main import app

from conftest import reset_accelerate

runner = CliRunner()
REPO = "me/tiny-dsno"
SEEDS = "3,9,60-62"


class FakeHub:
    """`huggingface_hub.HfApi` writing into ``remote``: records every call, copies what ``allow_patterns`` lets up."""

    remote: Path
    calls: list

    def __init__(self, token=None):
        FakeHub.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        FakeHub.remote.mkdir(exist_ok=True)

    def upload_folder(self, *, folder_path, allow_patterns, **kw):
        FakeHub.calls.append(("upload_folder", {"allow_patterns": allow_patterns, **kw}))
        for p in Path(folder_path).rglob("*"):
            rel = p.relative_to(folder_path)
            if p.is_file() and any(rel.match(pat) for pat in allow_patterns):
                (FakeHub.remote / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, FakeHub.remote / rel)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub

    FakeHub.remote, FakeHub.calls = tmp_path / "remote", []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    return FakeHub


@pytest.fixture(scope="module")
def run_with_reports(tiny_run, tmp_path_factory):
    """A copy of the tiny run with `opdiff bench --out RUN/bench` and `opdiff sample --out RUN/samples` inside."""
    run = tmp_path_factory.mktemp("hub") / "run"
    shutil.copytree(tiny_run["run"], run)
    bench = ["bench", run, "--num", "6", "--nfe", "1,2", "--solvers", "ddim", "--out", run / "bench"]
    r = runner.invoke(app, [*map(str, bench), "--teacher-checkpoint", str(tiny_run["teacher"])])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sample", str(run), "--out", str(run / "samples"), "--num", "4"])
    assert r.exit_code == 0, r.output
    return run


def sample_npz(run, out: Path, *extra: str) -> np.ndarray:
    r = runner.invoke(app, ["sample", str(run), "--out", str(out), "--seeds", SEEDS, "--format", "npz", *extra])
    assert r.exit_code == 0, r.output
    return np.load(out / "samples.npz", allow_pickle=False)["images"]


def test_push_uploads_the_model_records_card_and_pngs_and_never_a_pickle(run_with_reports, fake_hub, tmp_path):
    from huggingface_hub import ModelCard

    run = run_with_reports
    r = runner.invoke(app, ["push", str(run), REPO, "--private", "--token", "hf_x"])
    assert r.exit_code == 0, r.output
    assert f"https://huggingface.co/{REPO}" in r.stdout
    remote = fake_hub.remote
    assert sorted(p.name for p in remote.rglob("*")) == sorted(
        ["README.md", "bench.json", "config.json", "grid.png", "metrics.jsonl", "model.safetensors"]
        + ["opdiff_push.json", "run.json"]
    )
    assert any(run.rglob("*.pkl")) and any(run.rglob("*.bin"))  # the run has them; none went up
    calls = dict(fake_hub.calls)
    assert calls["init"] == {"token": "hf_x"}
    assert calls["create_repo"]["private"] is True and calls["create_repo"]["repo_type"] == "model"
    for name in ("model.safetensors", "config.json", "run.json", "metrics.jsonl"):
        assert (remote / name).read_bytes() == (run / name).read_bytes()
    assert (remote / "grid.png").read_bytes() == (run / "samples" / "grid.png").read_bytes()
    assert (remote / "bench.json").read_bytes() == (run / "bench" / "bench.json").read_bytes()

    card = ModelCard.load(remote / "README.md")  # huggingface_hub's own parser of the front matter
    assert card.data.library_name == "opdiff" and "dsno" in card.data.tags
    assert card.data.to_dict().get("base_model") is None  # the teacher is a local file, not a Hub model
    table = [line for line in (run / "bench" / "bench.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) > 4 and all(line in card.text for line in table)  # the bench table, row for row
    assert "![samples](grid.png)" in card.text
    info = json.loads((run / "config.json").read_text())
    coll = info["collection"]
    for fact in (info["data_content_sha256"], coll["weights_sha256"], "0–47", coll["solver"], "opdiff 0.1.0"):
        assert str(fact) in card.text
    assert f"opdiff sample {REPO} --out samples" in card.text
    pushed = json.loads((remote / "opdiff_push.json").read_text())
    assert pushed["format_version"] == 1
    from operator_diffusion.provenance import file_sha256

    assert pushed["files"]["model.safetensors"] == file_sha256(run / "model.safetensors")


def test_the_cards_commands_reproduce_the_collection_and_the_weights(tiny_run, tmp_path):
    from safetensors.torch import load_file

    r = runner.invoke(app, ["push", str(tiny_run["run"]), REPO, "--local-dir", str(tmp_path / "repo")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "repo" / "README.md").read_text()
    commands = [line for line in text.splitlines() if line.startswith(("opdiff collect", "opdiff train"))]
    assert [c.split()[1] for c in commands] == ["collect", "train"]
    for command in commands:
        args = [a.replace("data", str(tmp_path / "data")) if a == "data" else a for a in shlex.split(command)[1:]]
        args = [str(tmp_path / "run") if a == "run" else a for a in args]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        reset_accelerate()
    again = json.loads((tmp_path / "run" / "config.json").read_text())
    first = json.loads((tiny_run["run"] / "config.json").read_text())
    assert again["data_content_sha256"] == first["data_content_sha256"]
    a, b = load_file(tmp_path / "run" / "model.safetensors"), load_file(tiny_run["run"] / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)  # bitwise


def test_sample_and_bench_take_the_pushed_folder_and_a_hub_id(
    run_with_reports, tiny_run, fake_hub, tmp_path, monkeypatch
):
    import huggingface_hub

    assert runner.invoke(app, ["push", str(run_with_reports), REPO]).exit_code == 0
    want = sample_npz(tiny_run["run"], tmp_path / "original")
    assert np.array_equal(sample_npz(fake_hub.remote, tmp_path / "folder"), want)  # a local Hub-layout folder

    asked = []

    def snapshot_download(repo_id, *, repo_type=None, allow_patterns=None, local_files_only=False, **kw):
        asked.append((repo_id, repo_type, tuple(allow_patterns), local_files_only))
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for p in fake_hub.remote.iterdir():
            if any(p.match(pat) for pat in allow_patterns):
                shutil.copy(p, local / p.name)
        return str(local)

    with monkeypatch.context() as m:
        m.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        assert np.array_equal(sample_npz(REPO, tmp_path / "hub"), want)
        bench = ["bench", REPO, "--num", "6", "--nfe", "1", "--solvers", "ddim", "--json"]
        r = runner.invoke(app, [*bench, "--teacher-checkpoint", str(tiny_run["teacher"])])
        assert r.exit_code == 0, r.output
    assert asked[0] == (REPO, "model", ("model.safetensors", "config.json", "run.json"), False)
    assert sorted(p.name for p in (tmp_path / "snapshot").iterdir()) == ["config.json", "model.safetensors", "run.json"]
    ours = json.loads(r.stdout)
    r = runner.invoke(
        app, [*bench[:1], str(tiny_run["run"]), *bench[2:], "--teacher-checkpoint", str(tiny_run["teacher"])]
    )
    theirs = json.loads(r.stdout)
    pick = lambda res: [(row["method"], row["nfe"], row["rmse"]) for row in res["rows"]]  # noqa: E731
    assert pick(ours) == pick(theirs)

    # the real huggingface_hub code, offline, on a Hub cache holding the pushed files
    cache = tmp_path / "hf-cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(fake_hub.remote, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert np.array_equal(sample_npz(REPO, tmp_path / "cached"), want)
    r = runner.invoke(app, ["sample", "me/not-pushed", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "offline (HF_HUB_OFFLINE)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_push_sample_draws_the_cards_grid_as_opdiff_sample_does(tiny_run, tmp_path):
    """`opdiff push --sample N` (issue 16): a run without samples gets the grid `opdiff sample --num N --format grid`
    writes (held-out seeds), byte for byte; --sample with --samples, or out of range, is one line and writes nothing."""
    r = runner.invoke(
        app, ["sample", str(tiny_run["run"]), "--num", "6", "--format", "grid", "--out", str(tmp_path / "s")]
    )
    assert r.exit_code == 0, r.output
    before = sorted(p.relative_to(tiny_run["run"]) for p in tiny_run["run"].rglob("*"))
    r = runner.invoke(app, ["push", str(tiny_run["run"]), REPO, "--sample", "6", "--local-dir", str(tmp_path / "repo")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "repo" / "grid.png").read_bytes() == (tmp_path / "s" / "grid.png").read_bytes()
    assert "![samples](grid.png)" in (tmp_path / "repo" / "README.md").read_text()
    assert sorted(p.relative_to(tiny_run["run"]) for p in tiny_run["run"].rglob("*")) == before  # nothing drawn into it
    for extra, message in ((["--samples", str(tmp_path / "s")], "drop --samples"), ([], "from 1 to 1024")):
        sample = "6" if extra else "0"
        r = runner.invoke(
            app, ["push", str(tiny_run["run"]), REPO, "--sample", sample, *extra, "--local-dir", str(tmp_path / "x")]
        )
        assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
        assert not (tmp_path / "x").exists()


def test_bench_offline_reads_a_hub_run_from_the_hub_cache_only(tmp_path, monkeypatch):
    """`opdiff bench --offline` (issue 16) with HF_HUB_OFFLINE unset: the real `snapshot_download` is asked for the
    Hub cache only, and a run that is not there is one line naming --offline."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    real, asked = huggingface_hub.snapshot_download, []

    def cache_only(repo_id, **kw):
        asked.append(kw.get("local_files_only"))
        if not kw.get("local_files_only"):
            pytest.fail("went to the Hub")
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    r = runner.invoke(app, ["bench", "me/not-pushed", "--offline", "--num", "2"])
    assert asked == [True], r.output
    assert r.exit_code == 2 and "offline (--offline)" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_fid_takes_a_hub_run_id_and_reads_other_hub_ids_as_image_datasets(tiny_run, tmp_path, monkeypatch):
    """`opdiff fid USER/NAME` (issue 16): a model repository holding a run is sampled as the local run is (the same
    seeds, the same FID); --offline asks the Hub cache only; an id no model repository answers (a dataset's) is
    read as images, as before."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from operator_diffusion import images

    asked = []

    def snapshot_download(repo_id, *, repo_type=None, allow_patterns=None, local_files_only=False, **kw):
        asked.append((repo_id, repo_type, local_files_only))
        if repo_id != REPO:
            response = httpx2.Response(
                404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
            )
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)
        local = tmp_path / "snapshot"
        local.mkdir(exist_ok=True)
        for name in allow_patterns:
            shutil.copy(tiny_run["run"] / name, local / name)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    read = []

    def read_hf_dataset(name, split="train", column=None, num=None):  # a Hub dataset, without the network
        read.append(name)
        return images.load_images("digits", num=num)

    monkeypatch.setattr(images, "read_hf_dataset", read_hf_dataset)
    fid = ["fid", "--ref", "digits", "--feature-extractor", "digits", "--num", "16", "--json"]
    results = {}
    for source, extra in ((REPO, []), (REPO, ["--offline"]), (str(tiny_run["run"]), []), ("me/a-dataset", [])):
        r = runner.invoke(app, [fid[0], source, *fid[1:], *extra])
        assert r.exit_code == 0, r.output
        results[(source, tuple(extra))] = json.loads(r.stdout)
    assert asked == [(REPO, "model", False), (REPO, "model", True), ("me/a-dataset", "model", False)]
    hub, local = results[(REPO, ())], results[(str(tiny_run["run"]), ())]
    assert hub["fid"] == local["fid"] == results[(REPO, ("--offline",))]["fid"] and hub["n_source"] == 16
    assert hub["source"].startswith(f"{REPO} (DSNO, seeds 48-63)")
    assert read == ["me/a-dataset"] and results[("me/a-dataset", ())]["n_source"] == 16


def test_bad_push_and_hub_input_is_one_line_exit_2(tiny_run, fake_hub, tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run["run"], unfinished)
    (unfinished / "model.safetensors").unlink()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    cases = [
        (["push", str(tiny_run["run"]), "not a repo"], "is not a Hub repository id"),
        (["push", str(tiny_run["run"]), "me/bad name!"], "is not a Hub repository id"),
        (["push", str(tiny_run["run"]), "a/b/c"], "is not a Hub repository id"),
        (["push", str(unfinished), REPO], "not a finished `opdiff train` run"),
        (["push", str(tiny_run["data"]), REPO], "not a finished `opdiff train` run"),
        (["push", str(tmp_path / "nowhere"), REPO], "is not an `opdiff train` run folder"),
        (["push", str(tiny_run["run"]), REPO, "--bench", str(tmp_path)], "holds no bench.md"),
        (["push", str(tiny_run["run"]), REPO, "--local-dir", str(tmp_path / "full")], "not an empty folder"),
        (["sample", "no/such/run", "--out", str(tmp_path / "s")], "neither an `opdiff train` run folder"),
        (["sample", "/no/such-run", "--out", str(tmp_path / "s")], "neither an `opdiff train` run folder"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert fake_hub.calls == [] and not fake_hub.remote.exists()  # nothing went up
    assert (tmp_path / "full" / "keep").read_text() == "mine" and not (tmp_path / "s").exists()

    def missing(repo_id, **kw):
        response = httpx2.Response(404, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}"))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    r = runner.invoke(app, ["sample", "me/missing", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "nor a Hub model repository you can read" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
