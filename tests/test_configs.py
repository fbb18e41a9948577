"""The stage configs of sample, bench and fid (operator_diffusion.configs): each refuses a bad plain value with one
line that names the flag, and the CLI's flags default to the configs' own fields."""

from __future__ import annotations

import dataclasses

import pytest

from operator_diffusion.configs import (
    BenchConfig,
    FIDConfig,
    SampleConfig,
    field_default,
    parse_int_list,
    parse_solver_grids,
    parse_solver_options,
    parse_time_list,
    split_items,
)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"formats": ("gif",)}, "unknown --format gif"),
        ({"formats": ()}, "unknown --format (empty)"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"solver": "ddim"}, "only apply with --teacher"),
        ({"teacher_checkpoint": "t.safetensors"}, "only apply with --teacher"),
        ({"teacher": True, "query_times": (0.5,)}, "drop --query-times"),
        ({"teacher": True, "steps": 0}, "--steps must be at least 1"),
        ({"num": 0}, "--num must be at least 1"),
        ({"times": "a,b"}, "bad --times"),
    ],
)
def test_sample_config_refuses(change, message):
    with pytest.raises(ValueError, match=None) as e:
        SampleConfig(run="r", out="o", **change)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nfes": (0, 2)}, "--nfe needs positive integers, got '0,2'"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"reference_steps": 0}, "--reference-steps must be at least 1"),
        ({"ref_num": 10}, "only apply with --ref"),
        ({"cache_dir": "c"}, "only apply with --ref"),
        ({"inception_path": "i.pt"}, "only apply with --ref"),
        ({"tune_seeds": "5-8"}, "--tune-seeds only applies with --tune"),
        ({"num": 0}, "--num must be at least 1"),
    ],
)
def test_bench_config_refuses(change, message):
    with pytest.raises(ValueError) as e:
        BenchConfig(run="r", **change)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num": 1}, "--num must be at least 2"),
        ({"ref_num": 1}, "--ref-num must be at least 2"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"source": "cleanfid:cifar10/32/train"}, "can only be the --ref"),
        ({"ref": "cleanfid:cifar10/32/train", "ref_num": 10}, "--ref-num does not apply"),
        ({"ref": "cleanfid:cifar10"}, "cleanfid:NAME/RES/SPLIT"),
    ],
)
def test_fid_config_refuses(change, message):
    with pytest.raises(ValueError) as e:
        FIDConfig(**{"source": "digits", "ref": "digits", **change})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_configs_are_frozen_and_normalise_their_lists():
    c = BenchConfig(run="r", nfes=(5, 1, 5), solvers=["ddim"])
    assert c.nfes == (1, 5) and c.solvers == ("ddim",)
    assert SampleConfig(run="r", out="o", formats=("png", "png", "npz")).formats == ("png", "npz")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.nfes = (2,)  # type: ignore[misc]


def test_flag_parsers():
    assert parse_int_list("1, 2,5", "--nfe") == (1, 2, 5)
    assert parse_time_list("0.5,0.25", "--times") == (0.5, 0.25)
    assert split_items(["png,npz", "grid"]) == ("png", "npz", "grid")
    assert parse_solver_grids(["unipc=logsnr"]) == {"unipc": "logsnr"}
    assert parse_solver_options(["unipc:order=2,variant=bh1"]) == {"unipc": {"order": 2, "variant": "bh1"}}
    for call, message in [
        (lambda: parse_int_list("two", "--nfe"), "bad --nfe"),
        (lambda: parse_int_list("", "--nfe"), "--nfe needs positive integers"),
        (lambda: parse_time_list("x", "--query-times"), "bad --query-times"),
        (lambda: parse_time_list(",", "--query-times"), "--query-times is empty"),
        (lambda: parse_solver_grids(["unipc"]), "bad --solver-grid 'unipc'"),
        (lambda: parse_solver_options(["ddim"]), "bad --solver-options 'ddim'"),
        (lambda: parse_solver_options(["ddim:order"]), "is not KEY=VALUE"),
    ]:
        with pytest.raises(ValueError, match=None) as e:
            call()
        assert message in str(e.value)


def _cli_defaults(command: str) -> dict:
    import typer

    from opdiff_cli.main import app

    click = typer.main.get_command(app).commands[command]
    return {p.name: p.default for p in click.params}


# CLI parameter -> config field, where the names differ
RENAMED = {"bench": {"nfe": "nfes"}, "sample": {}, "fid": {}}


@pytest.mark.parametrize("command, config", [("sample", SampleConfig), ("bench", BenchConfig), ("fid", FIDConfig)])
def test_cli_defaults_are_the_config_fields_defaults(command, config):
    defaults = _cli_defaults(command)
    fields = {f.name for f in dataclasses.fields(config)}
    compared = 0
    for param, default in defaults.items():
        name = RENAMED[command].get(param, param)
        if name not in fields or default is None:
            continue
        try:
            expected = field_default(config, name)
        except KeyError:  # a required field (run, out, source, ref)
            continue
        if isinstance(expected, dict):  # repeatable SOLVER=... items, parsed into the mapping
            continue
        if isinstance(default, str) and isinstance(expected, tuple):  # --nfe "1,2,3": the tuple as text
            expected = ",".join(map(str, expected))
        if isinstance(default, (list, tuple)):
            default = tuple(default)
        assert default == expected, (command, param, default, expected)
        compared += 1
    assert compared >= 4, (command, compared)
