"""The reliability table (issue 16, "reliability figures"): bad inputs across every command, each answered by one
line on stderr with exit code 2 (1 where the input is fine and the run itself fails: a loss that diverges), no
traceback, no existing file changed (every file's bytes under the run, its data, its teacher and a workspace of the
user's files are compared before and after) and, for a usage error, nothing on stdout (no progress line before the
error) and nothing created.

The commands run in-process through Typer's CliRunner on the session's tiny run (tests/conftest.py).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from opdiff_cli.main import app
from operator_diffusion.runs import reset_accelerate_state

runner = CliRunner()
TINY = ["--backbone", "opdiff-unet", "-o", "preset=tiny", "-o", "in_channels=1", "-o", "prediction=x0"]
COLLECT = ["collect", *TINY, "--steps", "16", "--num", "4"]
TRAIN = ["train", "--data", "{data}", "--batch-size", "8", "--max-steps", "2"]
SPECTRUM = ["spectrum", "--oracle", "gaussian", "--dim", "4", "--num", "2", "--points", "16"]
TEACHER = ["teacher", "train", "--data", "digits", "--max-steps", "2", "--batch-size", "8"]

# (id, arguments ({name} is a path below), exit code, a part of the message)
CASES = [
    # collect
    ("collect-seed-huge", [*COLLECT, "--seed", "99999999999999999999999", "--out", "{new}"], 2, "out of range"),
    ("collect-seed-negative", [*COLLECT, "--seed", "-1", "--out", "{new}"], 2, "--seed -1 is out of range"),
    ("collect-num-zero", [*COLLECT[:-2], "--num", "0", "--out", "{new}"], 2, "num must be an integer >= 1"),
    ("collect-num-text", [*COLLECT[:-2], "--num", "many", "--out", "{new}"], 2, "Invalid value for '--num'"),
    ("collect-no-num", ["collect", *TINY, "--out", "{new}"], 2, "Missing option '--num'"),
    ("collect-unknown-flag", [*COLLECT, "--stepz", "3", "--out", "{new}"], 2, "No such option: --stepz"),
    ("collect-backbone-unknown", ["collect", "--backbone", "nosuch", "--num", "2", "--out", "{new}"], 2, "unknown"),
    ("collect-option-typo", [*COLLECT, "-o", "presett=tiny", "--out", "{new}"], 2, "did you mean 'preset'"),
    ("collect-option-no-equals", [*COLLECT, "-o", "dropout", "--out", "{new}"], 2, "is not KEY=VALUE"),
    ("collect-option-bad-number", [*COLLECT, "-o", "dropout={bad", "--out", "{new}"], 2, "dropout of 'opdiff-unet'"),
    ("collect-out-is-a-file", [*COLLECT, "--out", "{file}"], 2, "is a file"),
    ("collect-out-foreign", [*COLLECT, "--out", "{foreign}"], 2, "holds no opdiff collection"),
    ("collect-out-damaged-info", [*COLLECT, "--out", "{damaged}"], 2, "opdiff_collection.json' is damaged"),
    ("collect-out-other-collection", [*COLLECT, "--out", "{data}"], 2, "holds a different collection"),
    ("collect-device-unknown", [*COLLECT, "--device", "nosuch", "--out", "{new}"], 2, "bad --device 'nosuch'"),
    ("collect-dtype-unknown", [*COLLECT, "--dtype", "float8", "--out", "{new}"], 2, "unknown dtype 'float8'"),
    ("collect-solver-unknown", [*COLLECT, "--solver", "rk99", "--out", "{new}"], 2, "unknown solver 'rk99'"),
    ("collect-grid-unknown", [*COLLECT, "--grid", "spiral", "--out", "{new}"], 2, "unknown grid 'spiral'"),
    ("collect-time-list-text", [*COLLECT, "--time-list", "a,b", "--out", "{new}"], 2, "comma-separated times"),
    ("collect-checkpoint-pickle", [*COLLECT, "--checkpoint", "{pickle}", "--out", "{new}"], 2, "not a safetensors"),
    ("collect-checkpoint-truncated", [*COLLECT, "--checkpoint", "{truncated}", "--out", "{new}"], 2, "{truncated}"),
    ("collect-checkpoint-missing", [*COLLECT, "--checkpoint", "{new}", "--out", "{new}"], 2, "does not exist"),
    ("collect-guidance-unconditional", [*COLLECT, "--guidance", "2", "--out", "{new}"], 2, "guidance"),
    # sizes beyond any machine (issue 16, item 15): refused from the plan's estimate before anything is allocated
    ("collect-steps-beyond-memory", [*COLLECT, "--steps", "10000000000000", "--out", "{new}"], 2, "of memory"),
    ("collect-batch-beyond-memory", [*COLLECT, "--batch-size", "10000000000000", "--out", "{new}"], 2, "of memory"),
    (
        "collect-shard-beyond-memory",
        [*COLLECT[:-2], "--num", "10000000000000", "--shard-size", "10000000000000", "--out", "{new}"],
        2,
        "--shard-size 10000000000000 (one shard in memory) needs at least",
    ),  # fmt: skip
    ("collect-num-beyond-disk", [*COLLECT[:-2], "--num", "10000000000000000", "--out", "{new}"], 2, "of disk"),
    # train
    ("train-out-is-a-file", [*TRAIN, "--out", "{file}"], 2, "is a file, not a folder"),
    ("train-data-damaged-info", ["train", "--data", "{damaged}", "--out", "{new}"], 2, "json' is damaged"),
    ("train-data-missing", ["train", "--data", "{new}", "--out", "{new}"], 2, "neither a folder nor a Hub"),
    ("train-data-empty-folder", ["train", "--data", "{empty}", "--out", "{new}"], 2, "holds no opdiff collection"),
    ("train-option-bad-number", [*TRAIN, "-o", "dropout={bad", "--out", "{new}"], 2, "takes a number"),
    ("train-option-typo", [*TRAIN, "-o", "dropuot=0", "--out", "{new}"], 2, "did you mean 'dropout'"),
    ("train-lr-negative", [*TRAIN, "--lr", "-1", "--out", "{new}"], 2, "lr"),
    ("train-weights-inverted", [*TRAIN, "--weight-min", "10", "--weight-max", "1", "--out", "{new}"], 2, "swap"),
    ("train-init-from-missing", [*TRAIN, "--init-from", "{new}", "--out", "{new}"], 2, "does not exist"),
    ("train-init-from-truncated", [*TRAIN, "--init-from", "{truncated}", "--out", "{new}"], 2, "{truncated}"),
    ("train-init-from-pickle", [*TRAIN, "--init-from", "{pickle}", "--out", "{new}"], 2, "not a safetensors"),
    ("train-out-other-run", [*TRAIN, "--lr", "0.5", "--out", "{run}"], 2, "holds another run"),
    ("train-loss-unknown", [*TRAIN, "--loss", "l3", "--out", "{new}"], 2, "unknown loss 'l3'"),
    ("train-baseline-unknown", [*TRAIN, "--baseline", "two-step", "--out", "{new}"], 2, "--baseline takes"),
    ("train-fp16-on-cpu", [*TRAIN, "--mixed-precision", "fp16", "--out", "{new}"], 2, "fp16 mixed precision"),
    ("train-batch-too-large", [*TRAIN, "--batch-size", "4096", "--out", "{new}"], 2, "fewer than one batch"),
    ("train-batch-beyond-memory", [*TRAIN, "--batch-size", "10000000000000", "--out", "{new}"], 2, "of memory"),
    ("train-seed-huge", [*TRAIN, "--seed", "99999999999999999999999", "--out", "{new}"], 2, "--seed"),
    ("train-modes-too-many", [*TRAIN, "--modes", "9", "--out", "{new}"], 2, "modes"),
    ("train-diverges", [*TRAIN, "--lr", "1e9", "--warmup", "0", "--max-steps", "6", "--out", "{new}"], 1, "loss"),
    # sample
    ("sample-run-missing", ["sample", "{new}", "--out", "{new}"], 2, "neither an `opdiff train` run folder"),
    ("sample-run-pickle", ["sample", "{pickle}", "--out", "{new}"], 2, "safetensors"),
    ("sample-model-truncated", ["sample", "{cutrun}", "--out", "{new}"], 2, "{cutrun}/model.safetensors' is not a"),
    ("bench-model-truncated", ["bench", "{cutrun}"], 2, "{cutrun}/model.safetensors' is not a readable"),
    (
        "fid-run-model-truncated",
        ["fid", "{cutrun}", "--ref", "digits", "--feature-extractor", "digits"],
        2,
        "{cutrun}/",
    ),
    ("sample-config-damaged", ["sample", "{badrun}", "--out", "{new}"], 2, "config.json' is damaged"),
    ("sample-seeds-reversed", ["sample", "{run}", "--seeds", "5-1", "--out", "{new}"], 2, "below the start"),
    ("sample-seeds-too-many", ["sample", "{run}", "--seeds", "0-99999999999", "--out", "{new}"], 2, "more than"),
    ("sample-seeds-huge", ["sample", "{run}", "--seeds", "99999999999999999999", "--out", "{new}"], 2, "2^63"),
    ("sample-format-unknown", ["sample", "{run}", "--format", "gif", "--out", "{new}"], 2, "unknown --format gif"),
    ("sample-out-is-a-file", ["sample", "{run}", "--num", "2", "--out", "{file}"], 2, "is a file"),
    ("sample-out-holds-samples", ["sample", "{run}", "--num", "2", "--out", "{samples}"], 2, "--overwrite"),
    (
        "sample-teacher-pickle",
        ["sample", "{run}", "--teacher", "--teacher-checkpoint", "{pickle}", "--out", "{new}"],
        2,
        "not a safetensors",
    ),  # fmt: skip
    ("sample-num-zero", ["sample", "{run}", "--num", "0", "--out", "{new}"], 2, "--num must be at least 1"),
    # bench
    ("bench-nfe-zero", ["bench", "{run}", "--nfe", "0"], 2, "--nfe needs positive integers"),
    ("bench-solver-unknown", ["bench", "{run}", "--solvers", "nosuch"], 2, "unknown --solvers nosuch"),
    ("bench-grid-unknown", ["bench", "{run}", "--grid", "spiral"], 2, "unknown --grid 'spiral'"),
    ("bench-out-is-a-file", ["bench", "{run}", "--out", "{file}"], 2, "is a file"),
    ("bench-training-seeds", ["bench", "{run}", "--seeds", "0-3"], 2, "training"),
    ("bench-solver-grid-malformed", ["bench", "{run}", "--solver-grid", "unipc"], 2, "bad --solver-grid"),
    ("bench-backbone-checkpoint", ["bench", "{teacher}"], 2, "cannot load the DSNO run"),
    # fid
    ("fid-source-missing", ["fid", "{new}", "--ref", "digits"], 2, "cannot read SOURCE"),
    ("fid-num-one", ["fid", "digits", "--ref", "digits", "--num", "1"], 2, "--num must be at least 2"),
    ("fid-save-stats-exists", ["fid", "digits", "--ref", "digits", "--save-stats", "{file}"], 2, "already exists"),
    ("fid-ref-cleanfid-malformed", ["fid", "digits", "--ref", "cleanfid:cifar10"], 2, "cleanfid:NAME/RES/SPLIT"),
    ("fid-extractor-pickle", ["fid", "digits", "--ref", "digits", "--feature-extractor", "{pickle}"], 2, "extractor"),
    # spectrum
    ("spectrum-no-teacher", ["spectrum"], 2, "give exactly one teacher"),
    ("spectrum-oracle-unknown", ["spectrum", "--oracle", "nosuch"], 2, "unknown --oracle 'nosuch'"),
    ("spectrum-points-few", [*SPECTRUM[:-2], "--points", "4"], 2, "--points must be at least 16"),
    ("spectrum-energy-above-one", [*SPECTRUM, "--energy", "2"], 2, "--energy must be in (0, 1]"),
    ("spectrum-checkpoint-pickle", ["spectrum", "--checkpoint", "{pickle}"], 2, "safetensors"),
    ("spectrum-checkpoint-truncated", ["spectrum", "--checkpoint", "{truncated}"], 2, "{truncated}"),
    ("spectrum-out-is-a-file", [*SPECTRUM, "--out", "{file}"], 2, "is a file"),
    ("spectrum-option-bad-number", ["spectrum", *TINY, "-o", "dropout={bad"], 2, "takes a number"),
    ("spectrum-seed-huge", [*SPECTRUM, "--seed", "99999999999999999999999"], 2, "--seed"),
    ("spectrum-num-beyond-memory", [*SPECTRUM, "--num", "10000000000000", "--out", "{new}"], 2, "of memory"),
    ("spectrum-points-beyond-memory", [*SPECTRUM, "--points", "10000000000000"], 2, "lower --points"),
    ("spectrum-dim-beyond-memory", [*SPECTRUM, "--dim", "10000000000000"], 2, "lower --num or --dim"),
    ("spectrum-backbone-num-beyond-memory", ["spectrum", *TINY, "--num", "10000000000000"], 2, "of memory"),
    # inspect
    ("inspect-backbone-unknown", ["inspect", "-b", "nosuch"], 2, "unknown backbone 'nosuch'"),
    ("inspect-checkpoint-pickle", ["inspect", "{pickle}"], 2, "safetensors"),
    ("inspect-modes-too-many", ["inspect", "-o", "preset=tiny", "--modes", "99"], 2, "modes"),
    ("inspect-option-typo", ["inspect", "-o", "presett=tiny"], 2, "did you mean 'preset'"),
    # teacher
    ("teacher-data-missing", ["teacher", "train", "--data", "{new}", "--out", "{new}"], 2, "is not an image source"),
    ("teacher-out-is-a-file", [*TEACHER, "--out", "{file}"], 2, "is a file"),
    ("teacher-prediction-unknown", [*TEACHER, "--prediction", "z", "--out", "{new}"], 2, "prediction"),
    ("teacher-lr-negative", [*TEACHER, "--lr", "-1", "--out", "{new}"], 2, "lr"),
    ("teacher-out-dsno-run", [*TEACHER, "--out", "{run}"], 2, "not a teacher run"),
    ("teacher-seed-huge", [*TEACHER, "--seed", "99999999999999999999999", "--out", "{new}"], 2, "--seed"),
    ("teacher-batch-beyond-memory", [*TEACHER, "--batch-size", "10000000000000", "--out", "{new}"], 2, "of memory"),
    # demo, data info, the command line itself
    ("demo-out-is-a-file", ["demo", "--out", "{file}"], 2, "is a file"),
    ("demo-out-foreign", ["demo", "--out", "{foreign}"], 2, "holds files the demo does not write (thesis.tex)"),
    ("data-info-damaged", ["data", "info", "{damaged}"], 2, "opdiff_collection.json' is damaged"),
    ("data-info-empty-folder", ["data", "info", "{empty}"], 2, "holds no opdiff collection"),
    ("command-unknown", ["colect"], 2, "No such command 'colect'"),
]


def fill(text: str, paths: dict) -> str:
    """``text`` with each ``{name}`` of ``paths`` replaced (and nothing else: ``-o dropout={bad`` stays)."""
    for name, path in paths.items():
        text = text.replace("{" + name + "}", str(path))
    return text


def snapshot(roots) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def places(tiny_run, tmp_path_factory):
    """The paths the table's arguments name: the tiny run, its data and teacher, and a workspace of the user's own
    files (a plain file, a pickle, a folder of someone else's, a damaged collection and run, earlier samples)."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "notes.txt").write_text("the user's own file\n")
    (ws / "weights.safetensors").write_bytes(pickle.dumps({"w": np.zeros(3)}))  # a pickle, whatever its name
    (ws / "foreign").mkdir()
    (ws / "foreign" / "thesis.tex").write_text("\\section{Not opdiff's}\n")
    (ws / "empty").mkdir()
    shutil.copytree(tiny_run["data"], ws / "damaged", ignore=shutil.ignore_patterns(".opdiff-cache"))
    info = ws / "damaged" / "opdiff_collection.json"
    info.write_text(info.read_text()[:200] + "\x01")  # cut off, with a control character
    shutil.copytree(tiny_run["run"], ws / "badrun", ignore=shutil.ignore_patterns("checkpoints"))
    (ws / "badrun" / "config.json").write_text('{"format_version": 1, "collection": ')
    teacher = Path(tiny_run["teacher"]).read_bytes()
    (ws / "truncated.safetensors").write_bytes(teacher[: len(teacher) // 2])  # cut off mid-tensor
    shutil.copytree(tiny_run["run"], ws / "cutrun", ignore=shutil.ignore_patterns("checkpoints"))
    model = (ws / "cutrun" / "model.safetensors").read_bytes()
    (ws / "cutrun" / "model.safetensors").write_bytes(model[: len(model) // 2])
    (ws / "samples" / "images").mkdir(parents=True)
    (ws / "samples" / "opdiff_samples.json").write_text("{}\n")
    (ws / "samples" / "images" / "000000.png").write_bytes(b"an earlier sample")
    return {
        "run": tiny_run["run"],
        "data": tiny_run["data"],
        "teacher": tiny_run["teacher"],
        "file": ws / "notes.txt",
        "pickle": ws / "weights.safetensors",
        "foreign": ws / "foreign",
        "empty": ws / "empty",
        "damaged": ws / "damaged",
        "badrun": ws / "badrun",
        "truncated": ws / "truncated.safetensors",
        "cutrun": ws / "cutrun",
        "samples": ws / "samples",
        "ws": ws,
    }


def test_the_table_has_forty_distinct_bad_inputs_across_all_commands():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) >= 40
    commands = {c[1][0] if c[1][0] not in ("teacher", "data") else " ".join(c[1][:2]) for c in CASES}
    assert {"collect", "train", "sample", "bench", "fid", "spectrum", "inspect", "teacher train", "demo"} <= commands


@pytest.mark.parametrize("case, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_changes_nothing(places, case, args, code, message):
    new = places["ws"] / f"new-{case}"
    paths = {**places, "new": new}
    argv = [fill(a, paths) for a in args]
    roots = [Path(places["run"]).parent, places["ws"]]
    before = snapshot(roots)
    result = runner.invoke(app, argv)
    reset_accelerate_state()
    lines = result.stderr.splitlines()
    assert result.exit_code == code, (argv, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None))), result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fill(message, paths) in " ".join(result.stderr.split()), result.stderr
    after = snapshot(roots)
    changed = [p for p, data in before.items() if after.get(p) != data]
    assert not changed, changed
    if code == 2:  # a usage error creates nothing either, and starts no progress bar
        assert not new.exists() and set(after) == set(before), sorted(set(after) - set(before))[:3]
        assert result.stdout == "", result.stdout
    shutil.rmtree(new, ignore_errors=True)


def test_version_is_printed_without_a_command():
    """`opdiff --version` answered "Missing command" (exit 2)."""
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.split() == ["opdiff", version("operator-diffusion")], result.output
