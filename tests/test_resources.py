"""Size inputs bounded by what the machine holds (issue 16, item 15: ``collect --steps 1000000000`` grew to 15.6 GB
in 30 s, silently). The machine is faked (``resources.available_memory`` / ``free_disk``), so the tests do not
depend on this one's memory; each refusal comes before anything is allocated or written."""

from __future__ import annotations

import shutil

import pytest

from operator_diffusion import collection_plan, resources
from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection import collect
from operator_diffusion.collection_plan import CollectConfig, plan_collection
from operator_diffusion.runs import reset_accelerate_state
from operator_diffusion.trajectory_cache import TrajectoryCache

from conftest import TINY_TEACHER


@pytest.fixture
def machine(monkeypatch):
    """Set the fake machine's available memory and free disk (bytes)."""

    def set_(memory: int = 16 * 10**9, disk: int = 100 * 10**9) -> None:
        monkeypatch.setattr(resources, "available_memory", lambda: memory)
        monkeypatch.setattr(resources, "free_disk", lambda path: disk)

    return set_


def test_the_probes_steps_are_refused_before_the_grid_is_built(machine, monkeypatch, tmp_path):
    machine(memory=16 * 10**9)
    monkeypatch.setattr(collection_plan, "time_grid", lambda *a, **k: pytest.fail("the grid was built"))
    teacher = load_backbone("opdiff-unet", **TINY_TEACHER)
    with pytest.raises(ValueError, match=r"--steps 1000000000 \(its solver grid\) needs at least .* memory.*16\.0 GB"):
        collect(teacher, tmp_path / "c", CollectConfig(num=4, steps=10**9))
    assert not (tmp_path / "c").exists()


def test_a_small_collection_fits_and_the_grid_bound_is_the_grid(machine):
    teacher = load_backbone("opdiff-unet", **TINY_TEACHER)
    machine(memory=10**6)  # 1 MB: a 16-step grid, a batch of 4 and a shard of 4 tiny trajectories fit
    plan_collection(teacher, CollectConfig(num=4, steps=16, batch_size=4, shard_size=4))
    with pytest.raises(ValueError, match="lower --steps"):  # 20,001 × 8 bytes × copies is over 1 MB
        plan_collection(teacher, CollectConfig(num=4, steps=20_000, batch_size=4, shard_size=4))


def test_collect_refuses_what_the_disk_cannot_hold(machine, tmp_path):
    machine(disk=1000)
    teacher = load_backbone("opdiff-unet", **TINY_TEACHER)
    # 4 output times × 1×8×8 float16 = 512 bytes per trajectory: 2 fit in 1000 bytes, 4 do not
    with pytest.raises(ValueError, match=r"--num 4 \(512 bytes per trajectory\) needs about 2.0 KB of disk"):
        collect(teacher, tmp_path / "c", CollectConfig(num=4, steps=16))
    assert not (tmp_path / "c").exists()


def test_train_bounds_batch_size_times_output_times(machine, tiny_run, tmp_path):
    from operator_diffusion.training import TrainConfig, plan_run

    machine(memory=80_000)  # B·M = 32 items of 1×8×8 float32, six copies: 49 KB fit; 64 items (98 KB) do not
    config = TrainConfig(data=str(tiny_run["data"]), out=str(tmp_path / "run"), batch_size=8, max_steps=2)
    plan_run(config)
    reset_accelerate_state()
    with pytest.raises(ValueError, match=r"--batch-size 16 \(64 items of 4 output times per step\) needs at least"):
        plan_run(TrainConfig(data=str(tiny_run["data"]), out=str(tmp_path / "run"), batch_size=16, max_steps=2))
    reset_accelerate_state()
    assert not (tmp_path / "run").exists()


def test_the_training_cache_is_not_built_on_a_full_disk(machine, tiny_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_run["data"], data, ignore=shutil.ignore_patterns(".opdiff-cache"))
    machine(disk=100)
    with pytest.raises(ValueError, match="the training cache of .* needs about .* of disk"):
        TrajectoryCache.build(data)
    assert not (data / ".opdiff-cache").exists()


def test_teacher_train_bounds_the_batch_before_and_after_reading_the_images(machine, monkeypatch, tmp_path):
    from operator_diffusion import teacher

    def config(batch_size):
        return teacher.TeacherConfig(data="digits", out=str(tmp_path / "t"), batch_size=batch_size, max_steps=2)

    # 1×8×8 digits, six float32 copies per step: a batch of 128 needs 196,608 bytes, one of 256 393,216
    machine(memory=300_000)
    teacher.plan_teacher(config(128))
    with pytest.raises(ValueError, match=r"--batch-size 256 \(64 values per image\) needs at least 393.2 KB"):
        teacher.plan_teacher(config(256))
    machine(memory=16 * 10**9)  # a batch beyond any machine is refused before the images are read
    monkeypatch.setattr(teacher, "load_images", lambda *a, **k: pytest.fail("the images were read"))
    with pytest.raises(ValueError, match=r"--batch-size 10000000000000 \(even at one value per image\) needs"):
        teacher.plan_teacher(config(10**13))
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "args, memory, message",
    [
        # --oracle gaussian --dim 4 --num 2 --points 16: grid 16·8·4 = 512 bytes, x_T 2·4·8 = 64, a batch of 2
        # trajectories 2·16·4·(8 + 8) = 2,048, spectra 2·9·8 = 144: 3,000 bytes hold it
        ([], 3000, None),
        (["--points", "32"], 3000, "--batch 16 × --points 32 (one batch of trajectories of 4 values each) needs"),
        (["--num", "200"], 3000, "--num 200 (its x_T draws of 4 values each) needs at least 6.4 KB"),
        (["--steps-per-interval", "40"], 3000, "(a solver grid of 601 times) needs at least 19.2 KB"),
        (["--dim", "400"], 3000, "lower --num or --dim"),
    ],
)
def test_spectrum_bounds_its_sizes_by_memory(machine, tmp_path, args, memory, message):
    from typer.testing import CliRunner

    from opdiff_cli.main import app

    machine(memory=memory)
    base = [
        "spectrum",
        "--oracle",
        "gaussian",
        "--dim",
        "4",
        "--num",
        "2",
        "--points",
        "16",
        "--out",
        str(tmp_path / "s"),
    ]
    result = CliRunner().invoke(app, [*base, *args])
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert message in " ".join(result.stderr.split()) and not (tmp_path / "s").exists(), result.stderr


def test_spectrum_of_a_backbone_is_bounded_by_its_state_size_once_built(machine, tmp_path):
    from typer.testing import CliRunner

    from opdiff_cli.main import app

    # a batch of 2 trajectories at 16 points: 384 bytes at one value per state, 24,576 with the tiny net's 1×8×8
    machine(memory=20_000)
    args = ["spectrum", "--backbone", "opdiff-unet", "-o", "preset=tiny", "-o", "in_channels=1", "--num", "2"]
    result = CliRunner().invoke(app, [*args, "--points", "16", "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert "(one batch of trajectories of 64 values each) needs at least 24.6 KB" in " ".join(result.stderr.split())
    assert not (tmp_path / "s").exists()


def test_a_cgroup_limit_caps_the_available_memory(tmp_path, monkeypatch):
    """A container's memory limit binds before the host's MemAvailable: cgroup v2 and v1 files written here; "max"
    (v2) means no limit."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("268435456\n")
    assert resources.cgroup_memory_left(v2) == 1073741824 - 268435456
    (v2 / "memory.max").write_text("max\n")
    assert resources.cgroup_memory_left(v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2000\n")
    (v1 / "memory.usage_in_bytes").write_text("3000\n")
    assert resources.cgroup_memory_left(tmp_path / "v1") == 0
    assert resources.cgroup_memory_left(tmp_path / "none") is None
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "v1")
    monkeypatch.setattr(resources, "_host_available_memory", lambda: 10**12)
    assert resources.available_memory() == 0
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "none")
    assert resources.available_memory() == 10**12
