"""The fault figures of issue 16 ("reliability figures"), on real `opdiff` processes (operator_diffusion.benchmarks.
faults; `python -m operator_diffusion.benchmarks faults` runs the fuller version): collect SIGKILLed at 5 random
moments and resumed each time, train SIGKILLed 3 times with the presets' dropout, Ctrl-C mid-collection, and a disk
that fills up during a collection (a real 4 MB tmpfs where the machine lets the test mount one; the write call
failing with ENOSPC everywhere). Each is compared with an uninterrupted run of the same command, made in-process."""

from __future__ import annotations

import errno
import shutil

import pytest
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.benchmarks import faults
from operator_diffusion.collection_store import content_hash, iter_shards, shard_damage
from operator_diffusion.runs import reset_accelerate_state

runner = CliRunner()
NUM, SHARD = 24, 2  # 12 shards: room for 5 kills at distinct shard counts


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The tiny teacher and its uninterrupted collection (the faults' argv, run in this process)."""
    root = tmp_path_factory.mktemp("faults")
    teacher = faults.tiny_teacher(root / "teacher.safetensors")
    r = runner.invoke(app, faults.collect_argv(teacher, root / "reference", NUM, SHARD))
    assert r.exit_code == 0, r.output
    return teacher, root / "reference"


def test_collect_killed_at_five_random_moments_resumes_to_the_same_content_and_seeds(collection, tmp_path):
    teacher, reference = collection
    figure = faults.collect_kills(tmp_path, teacher, reference, kills=5, num=NUM, shard_size=SHARD)
    assert figure.ok, figure.detail
    c = figure.counts
    assert c["landed"] == 5 and c["seeds"] == c["distinct_seeds"] == NUM and c["same_hash"], c
    assert max(c["at_shards"]) < NUM // SHARD, c  # every kill mid-run, before the last shard


def test_train_killed_three_times_with_dropout_ends_bitwise_equal(collection, tmp_path):
    _, data = collection
    r = runner.invoke(app, faults.train_argv(data, tmp_path / "reference", 30, 5))
    reset_accelerate_state()
    assert r.exit_code == 0, r.output
    figure = faults.train_kills(tmp_path / "killed", data, tmp_path / "reference", kills=3, steps=30, save_every=5)
    assert figure.ok, figure.detail
    assert figure.counts["landed"] == 3 and figure.counts["bitwise_equal"] and figure.counts["tensors"] > 100


def test_sigint_mid_collection_is_one_line_without_traceback_and_resumes(collection, tmp_path):
    teacher, reference = collection
    figure = faults.collect_sigint(tmp_path, teacher, reference, num=NUM, shard_size=SHARD, at_shards=3)
    assert figure.ok, figure.detail
    assert figure.counts == {"exit": 130, "stderr_lines": 1, "same_hash": True}


def test_a_disk_that_fills_up_during_collect_on_a_real_tmpfs(collection, tmp_path):
    teacher, reference = collection
    figure = faults.collect_full_disk(tmp_path, teacher, reference, num=NUM, shard_size=SHARD, at_shards=3)
    if figure is None:
        pytest.skip("this machine does not let the test mount a tmpfs (the ENOSPC test below still runs)")
    assert figure.ok, figure.detail
    assert figure.counts["kept"] == figure.counts["intact"] >= 3 and figure.counts["same_hash"]


def test_enospc_at_the_shard_write_is_one_line_keeps_earlier_shards_and_resumes(collection, tmp_path, monkeypatch):
    """The full disk simulated where it happens, at the write of the fourth shard (pyarrow's parquet writer raising
    ENOSPC after writing part of the file): one line, exit 1, the three shards before it intact, no partial file."""
    import pyarrow.parquet as pq

    teacher, reference = collection
    out = tmp_path / "c"
    real, calls = pq.write_table, []

    def full_disk(table, where, *a, **k):
        calls.append(where)
        if len(calls) == 4:
            with open(where, "wb") as f:
                f.write(b"PAR1 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *a, **k)

    argv = faults.collect_argv(teacher, out, NUM, SHARD)
    with monkeypatch.context() as m:
        m.setattr(pq, "write_table", full_disk)
        r = runner.invoke(app, argv)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1 and "Traceback" not in r.output, r.output
    assert "No space left on device" in lines[0] and "run the same command again to resume" in lines[0]
    assert "train-00003-of-00012.parquet" in lines[0]
    kept = sorted((out / "data").glob("train-*.parquet"))
    assert [p.name for p in kept] == [f"train-0000{k}-of-00012.parquet" for k in range(3)]
    assert all(shard_damage(p) is None for p in kept) and not list((out / "data").glob(".*"))
    assert runner.invoke(app, argv).exit_code == 0
    assert content_hash(out, verify=True) == content_hash(reference)
    assert sum(len(s["seed"]) for s in iter_shards(out)) == NUM
    shutil.rmtree(out)
