"""Trajectory collection (the collect stage: ``operator_diffusion.collection`` and its modules): what is stored,
how it is laid out, resumption, sharding across processes, refusals, the Hub upload and the training cache.

References are independent of the writer: a direct ``solve`` on noise drawn here from the documented
per-seed rule, the grid from ``time_grid``, ``datasets.load_dataset`` for the Hub layout, and content
hashes of uninterrupted single-process runs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from operator_diffusion import collection_store, teacher_solve, trajectory_cache
from operator_diffusion.backbones import load_backbone
from operator_diffusion.collection import NonFiniteTrajectoryError, collect
from operator_diffusion.collection_plan import CollectConfig, output_indices, plan_collection
from operator_diffusion.collection_store import (
    CARD_NAME,
    INFO_NAME,
    CollectionMismatchError,
    collection_status,
    content_hash,
    item_shape,
    load_collection,
    push_to_hub,
    read_shard,
)
from operator_diffusion.prediction import classifier_free_guidance
from operator_diffusion.schedules import time_grid
from operator_diffusion.solvers import solve
from operator_diffusion.teacher_solve import choose_precision, time_calls
from operator_diffusion.trajectory_cache import TrajectoryCache

# UniPC's former defaults, pinned: the round-off bounds below were measured on this computation (UniPC-2 rounds
# differently across batch sizes: up to 4 float16 ulp on 4 of 1,920 values)
CONFIG = CollectConfig(
    num=10,
    solver="unipc",
    steps=10,
    grid="logsnr",
    times=4,
    time_kind="quadratic",
    shard_size=4,
    batch_size=3,
    solver_options={"order": 3, "lower_order_final": False},
)
SHAPE = (3, 8, 8)  # the tiny preset


def teacher(seed: int = 0, **kw):
    """A tiny U-Net with every parameter perturbed (its zero-initialised output conv would give ε ≡ 0)."""
    torch.manual_seed(seed)
    bb = load_backbone("opdiff-unet", preset="tiny", **kw)
    with torch.no_grad():
        for p in bb.network.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bb


def noise(seeds) -> torch.Tensor:
    """x_T by the documented rule, written out independently of the library."""
    return torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])


def reference(eps_fn, schedule, cfg: CollectConfig, labels=None, **kw):
    """A direct ``solve`` per batch, composing batches within shards as documented ([start, start+B), …):
    the composition fixes the float round-off, so the comparison can be to float16 rounding."""
    ts = time_grid(schedule, cfg.steps, cfg.grid)
    parts = []
    for s0 in range(0, cfg.num, cfg.shard_size):
        stop = min(s0 + cfg.shard_size, cfg.num)
        for b0 in range(s0, stop, cfg.batch_size):
            seeds = range(b0, min(b0 + cfg.batch_size, stop))
            extra = None if labels is None else {"labels": torch.as_tensor(labels)[list(seeds)]}
            with torch.no_grad():
                parts.append(
                    solve(
                        eps_fn,
                        noise([cfg.seed + k for k in seeds]),
                        schedule,
                        ts,
                        cfg.solver,
                        extra_args=extra,
                        **cfg.solver_options,
                        **kw,
                    )
                )
    return parts


def stored(path) -> dict[str, np.ndarray]:
    shape = item_shape(json.loads(Path(path, INFO_NAME).read_text())["collection"])
    shards = [read_shard(p, shape) for p in sorted(Path(path, "data").glob("train-*.parquet"))]
    return {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}


def snapshot(root: Path) -> dict:
    """Every path under root with its size and modification time: 'nothing touched' means equal snapshots."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def bb():
    return teacher()


@pytest.fixture(scope="module")
def done(bb, tmp_path_factory):
    """One uninterrupted single-process collection (accelerate's default process layout)."""
    out = tmp_path_factory.mktemp("collection") / "c"
    result = collect(bb, out, CONFIG)
    assert result.complete and result.written == (0, 1, 2)
    return out


# --------------------------------------------------------------------------------------------------
# Output times
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps, m, kind, expected",
    [
        (10, 4, "uniform", [3, 5, 8, 10]),  # round-half-up of 2.5, 5, 7.5, 10
        (10, 4, "quadratic", [4, 8, 9, 10]),  # 10·(1 − (1 − i/4)²) = 4.375, 7.5, 9.375, 10
        (511, 16, "quadratic", None),
        (8, 2, "uniform", [4, 8]),
    ],
)
def test_output_indices_follow_the_formula_and_end_at_t_min(steps, m, kind, expected):
    idx = output_indices(steps, m, kind)
    u = [(i / m) if kind == "uniform" else 1 - (1 - i / m) ** 2 for i in range(1, m + 1)]
    assert idx == (expected or [int(math.floor(steps * v + 0.5)) for v in u])
    assert idx[-1] == steps and idx == sorted(set(idx))


@pytest.mark.parametrize(
    "steps, m, kind, match",
    [
        (8, 4, "quadratic", "collide"),
        (3, 4, "uniform", "steps >= 4"),
        (10, 1, "uniform", "at least 2"),
        (10, 4, "cubic", "valid"),
    ],
)
def test_output_indices_refuse_impossible_placements(steps, m, kind, match):
    with pytest.raises(ValueError, match=match):
        output_indices(steps, m, kind)


# --------------------------------------------------------------------------------------------------
# What is stored
# --------------------------------------------------------------------------------------------------
def test_stored_denoised_trajectories_equal_a_direct_solve(bb, done):
    info = json.loads((done / INFO_NAME).read_text())["collection"]
    ts = time_grid(bb.schedule, CONFIG.steps, CONFIG.grid)
    idx = output_indices(CONFIG.steps, CONFIG.times, CONFIG.time_kind)
    assert info["output_indices"] == idx and info["output_times"] == ts[idx].tolist()
    assert info["nfe_per_trajectory"] == CONFIG.steps + 1  # the final x̂_0 costs one evaluation
    data = stored(done)
    assert data["seed"].tolist() == list(range(10)) and data["trajectory"].dtype == np.float16
    ref = torch.cat([r.denoised for r in reference(bb.eps_fn, bb.schedule, CONFIG, record=idx)])
    final = torch.cat([r.sample for r in reference(bb.eps_fn, bb.schedule, CONFIG, denoise_to_zero=True)])
    got = torch.from_numpy(data["trajectory"].astype(np.float32))
    assert got.shape == (10, 4, *SHAPE)
    torch.testing.assert_close(got, ref.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(got[:, -1], final.half().float(), rtol=0, atol=0)
    assert got.abs().max() > 0.1  # not a trivial teacher


def test_state_target_in_float32_stores_the_ode_states(bb, tmp_path):
    cfg = replace(CONFIG, target="state", dtype="float32", time_kind="uniform", num=5)
    collect(bb, tmp_path / "s", cfg)
    ref = reference(bb.eps_fn, bb.schedule, cfg, record=[3, 5, 8, 10], record_denoised=False)
    got = torch.from_numpy(stored(tmp_path / "s")["trajectory"])
    assert (
        got.dtype == torch.float32
        and json.loads((tmp_path / "s" / INFO_NAME).read_text())["collection"]["nfe_per_trajectory"] == 10
    )
    torch.testing.assert_close(got, torch.cat([r.states for r in ref]), rtol=0, atol=0)
    torch.testing.assert_close(got[:, -1], torch.cat([r.sample for r in ref]), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["edm", "ve"])
def test_a_ve_or_edm_teacher_collects_from_its_prior_sigma_max_times_the_noise(tmp_path, schedule):
    """A VE/EDM trajectory starts at x_T = σ_max·randn(seed) (``DiffusionProcess.prior``): the stored states equal a
    direct solve from that x_T, and the identity records the rule."""
    bb = teacher(schedule=schedule)
    cfg = replace(CONFIG, target="state", dtype="float32", time_kind="uniform", num=5)
    collect(bb, tmp_path / "s", cfg)
    sigma_max = bb.schedule.sigma_max
    ts = time_grid(bb.schedule, cfg.steps, cfg.grid)
    got = torch.from_numpy(stored(tmp_path / "s")["trajectory"])
    for s0 in range(0, cfg.num, cfg.shard_size):  # batches composed within shards, as documented
        stop = min(s0 + cfg.shard_size, cfg.num)
        for b0 in range(s0, stop, cfg.batch_size):
            seeds = list(range(b0, min(b0 + cfg.batch_size, stop)))
            with torch.no_grad():
                ref = solve(
                    bb.eps_fn,
                    sigma_max * noise(seeds),
                    bb.schedule,
                    ts,
                    cfg.solver,
                    record=[3, 5, 8, 10],
                    record_denoised=False,
                    **cfg.solver_options,
                )
            torch.testing.assert_close(got[seeds], ref.states, rtol=0, atol=0)
    info = json.loads((tmp_path / "s" / INFO_NAME).read_text())["collection"]
    assert info["noise"].startswith(f"x_T = {sigma_max!r} * torch.randn(C, H, W")


def test_time_list_selects_grid_points_and_off_grid_times_are_refused(bb, tmp_path):
    ts = time_grid(bb.schedule, 10, "logsnr")
    cfg = replace(CONFIG, num=3, time_list=(float(ts[10]), float(ts[2]), float(ts[6])))
    collect(bb, tmp_path / "ok", cfg)
    info = json.loads((tmp_path / "ok" / INFO_NAME).read_text())["collection"]
    assert info["output_indices"] == [2, 6, 10] and info["time_kind"] == "list"
    off = replace(cfg, time_list=(float(ts[2]) * (1 + 1e-6), float(ts[10])))
    with pytest.raises(ValueError, match=r"not a point of the solver grid; nearest grid times: .*\(index 2\)"):
        collect(bb, tmp_path / "off", off)
    assert not (tmp_path / "off").exists()


def test_conditional_labels_and_guidance(tmp_path):
    bb = teacher(num_classes=3)
    cfg = replace(CONFIG, num=5, guidance=2.0)
    collect(bb, tmp_path / "g", cfg)
    data = stored(tmp_path / "g")
    labels = []
    for s in range(5):  # the label is drawn from the example's generator right after its noise
        g = torch.Generator().manual_seed(s)
        torch.randn(SHAPE, generator=g)
        labels.append(int(torch.randint(3, (), generator=g)))
    assert data["label"].tolist() == labels
    eps = classifier_free_guidance(bb.eps_fn, 2.0, bb.null_label)
    ref = torch.cat([r.denoised for r in reference(eps, bb.schedule, cfg, labels=labels, record=[4, 8, 9, 10])])
    torch.testing.assert_close(
        torch.from_numpy(data["trajectory"].astype(np.float32)), ref.half().float(), rtol=0, atol=0
    )
    collect(bb, tmp_path / "list", replace(cfg, labels=(2, 0), guidance=None))
    assert stored(tmp_path / "list")["label"].tolist() == [2, 0, 2, 0, 2]


# --------------------------------------------------------------------------------------------------
# Layout: card, info, datasets
# --------------------------------------------------------------------------------------------------
def test_hub_layout_loads_with_datasets_and_card_comes_first(bb, done, tmp_path):
    import datasets

    names = sorted(p.name for p in (done / "data").iterdir())
    assert names == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    ds = datasets.load_dataset(str(done), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["trajectory"] == datasets.Array4D((4, *SHAPE), "float16") and "label" not in ds.features
    np.testing.assert_array_equal(
        np.asarray(ds.with_format("numpy")["trajectory"]), stored(done)["trajectory"].astype(np.float32)
    )
    ds2, info = load_collection(done, cache_dir=str(tmp_path / "hf"))
    assert len(ds2) == 10 and info["format_version"] == 1 and info["collection"]["solver"] == CONFIG.solver
    card = (done / CARD_NAME).read_text()
    assert card.startswith("---\n") and "data/train-*.parquet" in card and CONFIG.solver in card

    seen = []  # at the first progress report no shard exists yet, but the card and the info do

    def report(n):
        seen.append(
            (
                (tmp_path / "c" / CARD_NAME).is_file(),
                (tmp_path / "c" / INFO_NAME).is_file(),
                list((tmp_path / "c" / "data").glob("*.parquet")),
            )
        )

    collect(bb, tmp_path / "c", replace(CONFIG, num=2), process_index=0, num_processes=1, progress=report)
    assert seen[0] == (True, True, [])


def test_collections_in_folders_of_the_same_name_do_not_share_a_datasets_cache(bb, tmp_path):
    # regression: `load_dataset(folder)` keyed its Arrow cache on the folder name and card, so a second
    # collection in another folder called "data" came back with the first one's trajectories
    cache = str(tmp_path / "hf")
    first, second = tmp_path / "a" / "data", tmp_path / "b" / "data"
    collect(bb, first, replace(CONFIG, num=4))
    collect(bb, second, replace(CONFIG, num=4, seed=100))
    for path in (first, second):
        ds, _ = load_collection(path, cache_dir=cache)
        np.testing.assert_array_equal(
            np.asarray(ds.with_format("numpy")["trajectory"]), stored(path)["trajectory"].astype(np.float32)
        )


def test_status_counts_shards_and_bytes(done):
    s = collection_status(done)
    assert (s["complete_shards"], s["num_shards"], s["complete_examples"]) == (3, 3, 10)
    assert s["bytes_per_trajectory"] == 4 * 3 * 8 * 8 * 2 and s["reference_bytes_per_trajectory"] == 17 * 3 * 8 * 8 * 4


# --------------------------------------------------------------------------------------------------
# Resumption, batch size, processes
# --------------------------------------------------------------------------------------------------
class Stop(Exception):
    pass


def test_resume_after_interruption_gives_the_same_content(bb, done, tmp_path):
    out = tmp_path / "r"
    count = [0]

    def stop_in_third_shard(n):
        count[0] += n
        if count[0] > 8:
            raise Stop

    with pytest.raises(Stop):
        collect(bb, out, CONFIG, process_index=0, num_processes=1, progress=stop_in_third_shard)
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00003.parquet",
        "train-00001-of-00003.parquet",
    ]
    (out / "data" / "train-00001-of-00003.parquet").write_bytes(b"truncated")  # a damaged shard gets rewritten
    (out / "data" / ".train-00002-of-00003.parquet.tmp").write_bytes(b"stale")
    result = collect(bb, out, CONFIG)
    assert result.skipped == (0,) and result.written == (1, 2)
    assert content_hash(out) == content_hash(done)
    assert not list((out / "data").glob(".*"))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batch_size_changes_only_float_round_off(bb, done, tmp_path, batch_size):
    """CPU GEMM/conv kernels round differently with the batch size (measured: F.linear on 12 rows vs 3+3+3+3
    differs in the last bit), so stored values may move by an ulp or two of float16, rarely; seeds and
    layout are identical, and a fixed batch size reproduces the bits (the resume and process tests)."""
    collect(bb, tmp_path / "b", replace(CONFIG, batch_size=batch_size))
    a, b = stored(tmp_path / "b"), stored(done)
    assert a["seed"].tolist() == b["seed"].tolist()
    ulp = np.maximum(np.spacing(np.abs(b["trajectory"])).astype(np.float32), 2**-14)  # at least the smallest normal
    diff = np.abs(a["trajectory"].astype(np.float32) - b["trajectory"].astype(np.float32))
    assert (diff <= 2 * ulp).all() and (diff > 0).mean() < 0.01


def test_two_processes_write_alternate_shards_and_match_one_process(bb, done, tmp_path):
    out = tmp_path / "p"
    second = collect(bb, out, CONFIG, process_index=1, num_processes=2)  # may start first
    assert second.written == (1,) and second.missing == (0, 2) and not second.complete
    first = collect(bb, out, CONFIG, process_index=0, num_processes=2)
    assert first.written == (0, 2) and first.complete
    assert content_hash(out) == content_hash(done)


class FakeState:
    """accelerate.PartialState of process ``index`` of 2, with the barriers counted."""

    def __init__(self, index: int):
        self.process_index, self.num_processes, self.is_main_process = index, 2, index == 0
        self.device, self.barriers = torch.device("cpu"), 0

    def wait_for_everyone(self):
        self.barriers += 1


def test_accelerate_layout_main_writes_metadata_and_verifies(bb, done, tmp_path, monkeypatch):
    import accelerate

    out = tmp_path / "a"
    main, other = FakeState(0), FakeState(1)
    monkeypatch.setattr(accelerate, "PartialState", lambda: main)
    with pytest.raises(RuntimeError, match=r"incomplete after all processes finished: shards \[1\]"):
        collect(bb, out, CONFIG)  # run alone, the main process finds process 1's shard missing at the end
    assert main.barriers == 2 and (out / INFO_NAME).is_file()
    monkeypatch.setattr(accelerate, "PartialState", lambda: other)
    result = collect(bb, out, CONFIG)
    assert result.written == (1,) and result.complete and other.barriers == 2
    assert content_hash(out) == content_hash(done)


def test_accelerate_auto_precision_other_processes_adopt_the_main_processes_choice(bb, tmp_path, monkeypatch):
    """Under accelerate a non-main process resolves "auto" only after the barrier, from the info the main
    process wrote meanwhile (simulated by the barrier itself): it never measures, so all processes agree."""
    import accelerate

    cfg = replace(CONFIG, precision="auto")
    main_out, out = tmp_path / "main", tmp_path / "b"
    fake_timing(monkeypatch, {"fp32": 0.2, "bf16": 0.1})
    collect(bb, main_out, cfg, process_index=0, num_processes=2)  # what the main process writes: bf16, measured
    monkeypatch.setattr(teacher_solve, "time_calls", lambda *a, **k: pytest.fail("a non-main process measured"))
    other = FakeState(1)

    def barrier():
        if other.barriers == 0:  # the main process has written the card and info, no shards yet
            shutil.copytree(main_out, out, ignore=shutil.ignore_patterns("*.parquet"))
        other.barriers += 1

    other.wait_for_everyone = barrier
    monkeypatch.setattr(accelerate, "PartialState", lambda: other)
    with pytest.raises(RuntimeError, match=r"incomplete after all processes finished: shards \[0, 2\]"):
        collect(bb, out, cfg)
    for p in (main_out / "data").glob("*.parquet"):
        shutil.copy(p, out / "data")
    collect(bb, tmp_path / "u", replace(CONFIG, precision="bf16"), process_index=0, num_processes=1)
    assert content_hash(out) == content_hash(tmp_path / "u")


def test_content_hash_refuses_an_incomplete_collection(bb, tmp_path):
    collect(bb, tmp_path / "i", CONFIG, process_index=1, num_processes=2)
    with pytest.raises(ValueError, match="incomplete"):
        content_hash(tmp_path / "i")


def test_bf16_precision_runs_the_network_under_autocast_and_the_solver_in_float32(bb, tmp_path):
    """The stored bf16 trajectories equal a direct solve whose ε̂ comes from the network under CPU bf16
    autocast (cast back to float32 before the solver uses it), and differ from the fp32 ones by bf16
    rounding only; the precision is part of the identity, so a fp32 folder is not resumed in bf16."""
    cfg = replace(CONFIG, num=4, shard_size=4, batch_size=4, dtype="float32", precision="bf16")
    info = collect(bb, tmp_path / "b", cfg).info["collection"]
    assert info["precision"] == "bf16"

    def eps_bf16(x, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bb.eps_fn(x, t).float()

    idx = output_indices(cfg.steps, cfg.times, cfg.time_kind)
    ref_bf16 = reference(eps_bf16, bb.schedule, cfg, record=idx)[0].denoised
    ref_fp32 = reference(bb.eps_fn, bb.schedule, cfg, record=idx)[0].denoised
    got = torch.from_numpy(stored(tmp_path / "b")["trajectory"])
    torch.testing.assert_close(got, ref_bf16, rtol=0, atol=0)
    gap = (got - ref_fp32).abs().max() / ref_fp32.abs().max()
    assert 0 < gap < 2**-5  # bf16 keeps 8 significant bits; the ODE may amplify them a few times, not more
    with pytest.raises(ValueError, match='precision: "bf16" → "fp32"'):
        collect(bb, tmp_path / "b", replace(cfg, precision="fp32"))


def test_time_calls_takes_the_median_of_interleaved_rounds_after_a_warm_up():
    """On a fake clock each call advances by a scripted amount: the warm-up (first call) is excluded, the
    rounds alternate between the calls, and the result is the median of each call's own durations; a
    ``settled`` test ends the rounds early."""
    clock, order = [0.0], []
    script = {"a": iter([100.0, 1.0, 7.0, 3.0]), "b": iter([50.0, 0.5, 0.25, 9.0])}

    def call(name):
        order.append(name)
        clock[0] += next(script[name])

    got = time_calls({"a": lambda: call("a"), "b": lambda: call("b")}, repeats=3, timer=lambda: clock[0])
    assert got == {"a": 3.0, "b": 0.5}
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]
    clock[0], order[:] = 0.0, []
    script = {"a": iter([1.0, 1.0, 5.0]), "b": iter([1.0, 3.0, 0.1])}
    got = time_calls(
        {"a": lambda: call("a"), "b": lambda: call("b")},
        repeats=3,
        timer=lambda: clock[0],
        settled=lambda m: m["b"] >= 2 * m["a"],
    )
    assert got == {"a": 1.0, "b": 3.0} and order == ["a", "b", "a", "b"]  # settled after the first round


@pytest.mark.parametrize(
    "fp32, bf16, expected",
    [(1.0, 0.5, "bf16"), (1.0, 0.89, "bf16"), (1.0, 0.92, "fp32"), (1.0, 1.0, "fp32"), (0.1, 1.0, "fp32")],
)
def test_choose_precision_takes_bf16_only_when_clearly_faster(bb, fp32, bf16, expected):
    """bf16 needs at most 90% of fp32's time per evaluation; the timed calls are the teacher's ε on a batch of
    the collection's shape, in fp32 and under bf16 autocast (which rounds, so the two differ slightly)."""
    seen = {}

    def measure(calls):
        seen.update({p: f() for p, f in calls.items()})
        return {"fp32": fp32, "bf16": bf16}

    chosen, record = choose_precision(bb, "cpu", batch_size=5, measure=measure)
    assert chosen == expected and record["precision"] == expected
    assert record["seconds_per_eval"] == {"fp32": fp32, "bf16": bf16} and record["batch_size"] == 5
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["device"] == "cpu"
    assert seen["fp32"].shape == seen["bf16"].shape == (5, *SHAPE) and seen["bf16"].dtype == torch.float32
    gap = (seen["bf16"] - seen["fp32"]).abs().max() / seen["fp32"].abs().max()
    assert 0 < gap < 2**-5


def fake_timing(monkeypatch, seconds):
    """Replace the clock-based measurement of ``choose_precision``; returns the list of measured call sets."""
    measured = []
    monkeypatch.setattr(
        teacher_solve, "time_calls", lambda calls, *a, **k: measured.append(sorted(calls)) or dict(seconds)
    )
    return measured


@pytest.mark.parametrize(
    "expected, seconds", [("bf16", {"fp32": 0.2, "bf16": 0.1}), ("fp32", {"fp32": 0.1, "bf16": 1.0})]
)
def test_auto_precision_is_resolved_before_the_identity(bb, tmp_path, monkeypatch, expected, seconds):
    """The identity records the measured choice, never "auto": the collection equals one made with that
    precision given explicitly, and the measurement is kept in the info outside the identity."""
    cfg = replace(CONFIG, num=4, shard_size=4, batch_size=4)
    measured = fake_timing(monkeypatch, seconds)
    result = collect(bb, tmp_path / "auto", replace(cfg, precision="auto"))
    assert measured == [["bf16", "fp32"]]
    ident = result.info["collection"]
    assert ident["precision"] == expected and "auto" not in json.dumps(ident)
    assert result.info["precision_choice"]["seconds_per_eval"] == seconds
    assert result.precision_choice["precision"] == expected and result.precision_choice["source"] == "measured"
    explicit = collect(bb, tmp_path / "explicit", replace(cfg, precision=expected))
    assert explicit.info["collection"] == ident and "precision_choice" not in explicit.info
    assert content_hash(tmp_path / "auto") == content_hash(tmp_path / "explicit")
    assert plan_collection(bb, replace(cfg, precision="auto")).identity["precision"] == expected


def test_auto_precision_adopts_the_precision_of_the_collection_it_resumes(bb, tmp_path, monkeypatch):
    """A bf16 collection, half written, is finished by "auto" in bf16 without measuring, even where the
    measurement would pick fp32; the result equals an uninterrupted bf16 run."""
    cfg = replace(CONFIG, precision="bf16")
    out = tmp_path / "r"
    collect(bb, out, cfg, process_index=0, num_processes=2)
    measured = fake_timing(monkeypatch, {"fp32": 0.1, "bf16": 1.0})
    result = collect(bb, out, replace(cfg, precision="auto"))
    assert measured == [] and result.precision_choice == {"precision": "bf16", "source": "collection"}
    assert result.written == (1,) and result.skipped == (0, 2) and result.info["collection"]["precision"] == "bf16"
    collect(bb, tmp_path / "u", cfg)
    assert content_hash(out) == content_hash(tmp_path / "u")
    # without the folder, this machine's (fake) measurement decides, and the folder refuses that collection
    assert plan_collection(bb, replace(cfg, precision="auto")).identity["precision"] == "fp32" and len(measured) == 1
    with pytest.raises(CollectionMismatchError, match="precision"):
        collection_store.check_output_dir(out, plan_collection(bb, replace(cfg, precision="fp32")))


# --------------------------------------------------------------------------------------------------
# Refusals leave the folder untouched
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(times=1), "at least 2"),
        (dict(steps=3), "steps >= 4"),
        (dict(steps=8), "collide"),
        (dict(solver="rk4"), "unknown solver 'rk4'; valid: ddim, deis"),
        (dict(solver_options={"orderr": 2}), "no option orderr"),
        (dict(target="noise"), "unknown target"),
        (dict(dtype="bfloat16"), "unknown dtype"),
        (dict(precision="fp16"), "unknown precision 'fp16'; valid: fp32, bf16"),
        (dict(labels="random"), "unconditional"),
        (dict(guidance=2.0), "unconditional"),
        (dict(shard_size=0), "shard_size"),
        (dict(steps=12), r"different collection \(.*steps: 10 → 12.*choose a new --out"),
        (dict(seed=5), r"seed: 0 → 5"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(bb, done, change, match):
    before = snapshot(done)
    with pytest.raises(ValueError, match=match):
        collect(bb, done, replace(CONFIG, **change))
    assert snapshot(done) == before


def test_other_weights_and_foreign_folders_are_refused(done, tmp_path):
    before = snapshot(done)
    with pytest.raises(CollectionMismatchError, match="weights_sha256") as e:
        collect(teacher(seed=1), done, CONFIG)
    assert e.value.fields == ["weights_sha256"] and snapshot(done) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CollectionMismatchError, match="not empty and holds no opdiff collection"):
        collect(teacher(), foreign, CONFIG)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_nan_from_the_teacher_names_the_seeds_and_keeps_complete_shards(tmp_path):
    bb = teacher()
    bad = noise([5])[0]

    def nan_for_seed_5(x, t, labels=None):  # NaN for the item that started from seed 5's noise
        eps = type(bb).eps_fn(bb, x, t, labels)
        hit = (x == bad).flatten(1).all(1)
        return torch.where(hit[:, None, None, None], torch.nan, eps)

    bb.eps_fn = nan_for_seed_5
    with pytest.raises(NonFiniteTrajectoryError, match=r"seeds \[5\]") as e:
        collect(bb, tmp_path / "n", replace(CONFIG, seed=0))
    assert e.value.seeds == [5]
    assert sorted(p.name for p in (tmp_path / "n" / "data").iterdir()) == ["train-00000-of-00003.parquet"]


# --------------------------------------------------------------------------------------------------
# Hub upload (offline) and the training cache
# --------------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: 'uploads' copy the allowed files into a local folder."""

    calls: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, repo_type))

    def upload_folder(self, *, folder_path, repo_id, repo_type, allow_patterns, commit_message=""):
        import fnmatch

        remote = self.root / repo_id
        copied = []
        for p in sorted(Path(folder_path).rglob("*")):
            rel = p.relative_to(folder_path).as_posix()
            if p.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (remote / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(p, remote / rel)
                copied.append(rel)
        self.calls.append(("upload_folder", repo_type, copied))


def fake_hub(monkeypatch, root: Path) -> type[FakeHub]:
    import huggingface_hub

    hub = type("Hub", (FakeHub,), {"calls": [], "root": root})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    return hub


def test_push_to_hub_uploads_card_first_and_reloads(done, tmp_path, monkeypatch):
    import datasets

    hub = fake_hub(monkeypatch, tmp_path / "hub")
    (done / ".opdiff-cache").mkdir(exist_ok=True)  # local caches never travel
    url = push_to_hub(done, "me/trajectories")
    assert url.endswith("datasets/me/trajectories")
    assert hub.calls[0] == ("create_repo", "me/trajectories", "dataset")
    assert hub.calls[1] == ("upload_folder", "dataset", [CARD_NAME, INFO_NAME])
    shards = [f"train-{k:05d}-of-00003.parquet" for k in range(3)]  # with their recorded sha256
    assert hub.calls[2][2] == [f"data/{n}" for n in shards] + [f"shard_sha256/{n}.sha256" for n in shards]
    remote = tmp_path / "hub" / "me" / "trajectories"
    ds = datasets.load_dataset(str(remote), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["trajectory"] == datasets.Array4D((4, *SHAPE), "float16") and ds["seed"] == list(range(10))


class _Bomb:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_loading_a_trajectory_cache_never_unpickles(done, tmp_path, monkeypatch):
    """A cache travels with its dataset folder (``.opdiff-cache``), so loading it must not run code: with pickle
    files planted in it and every unpickler disabled, build and load still work and nothing ran."""
    import pickle

    cache_dir = tmp_path / "cache"
    first = TrajectoryCache.build(done, cache_dir)
    marker = tmp_path / "marker"
    for name in ("tensors/other.pickle", "tensors/meta.pkl", "tensors/_tensordict/other.pickle", "evil.pickle"):
        (cache_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (cache_dir / name).write_bytes(pickle.dumps(_Bomb(marker)))

    def refuse(*args, **kwargs):
        raise AssertionError("the trajectory cache unpickled something")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"), (np, "load")):
        monkeypatch.setattr(mod, name, refuse)
    again = TrajectoryCache.build(done, cache_dir)
    loaded = TrajectoryCache.load(cache_dir)
    assert not marker.exists()
    idx = torch.arange(10)
    for c in (again, loaded):
        assert torch.equal(c[idx]["trajectory"], first[idx]["trajectory"]) and c.content_sha256 == first.content_sha256


def test_trajectory_cache_reuse_is_keyed_on_a_cheap_fingerprint(done, tmp_path, monkeypatch):
    """A second build with unchanged shards (identity, sizes, mtimes) does not re-hash the collection; a shard
    touched since makes it hash again (and reuse the cache when the content is the same)."""
    cache_dir = tmp_path / "cache"
    first = TrajectoryCache.build(done, cache_dir)
    calls = []
    real = trajectory_cache.content_hash
    monkeypatch.setattr(trajectory_cache, "content_hash", lambda path, **kw: calls.append(path) or real(path, **kw))
    assert TrajectoryCache.build(done, cache_dir).content_sha256 == first.content_sha256 and calls == []
    shard = sorted((done / "data").glob("train-*.parquet"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert TrajectoryCache.build(done, cache_dir).content_sha256 == first.content_sha256 and len(calls) == 1
    assert TrajectoryCache.build(done, cache_dir).content_sha256 == first.content_sha256 and len(calls) == 1


def test_trajectory_cache_matches_the_arrow_data_and_rebuilds_when_stale(bb, done, tmp_path):
    cache = TrajectoryCache.build(done, tmp_path / "cache")
    data = stored(done)
    assert len(cache) == 10 and cache.content_sha256 == content_hash(done)
    idx = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:6]
    batch = cache[idx]
    assert batch["trajectory"].dtype == torch.float16 and batch.batch_size == torch.Size([6])
    np.testing.assert_array_equal(batch["trajectory"].numpy(), data["trajectory"][idx.numpy()])
    np.testing.assert_array_equal(batch["seed"].numpy(), data["seed"][idx.numpy()])
    torch.testing.assert_close(
        cache.times,
        torch.tensor(json.loads((done / INFO_NAME).read_text())["collection"]["output_times"], dtype=torch.float64),
    )
    meta = tmp_path / "cache" / "opdiff_cache.json"
    stamp = meta.stat().st_mtime_ns
    assert TrajectoryCache.build(done, tmp_path / "cache").content_sha256 == cache.content_sha256
    assert meta.stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = tmp_path / "other"
    collect(bb, other, replace(CONFIG, seed=100, num=5))
    rebuilt = TrajectoryCache.build(other, tmp_path / "cache")  # same cache folder, other content: stale
    assert len(rebuilt) == 5 and rebuilt[torch.arange(5)]["seed"].tolist() == list(range(100, 105))
    assert len(TrajectoryCache.load(tmp_path / "cache")) == 5


# --------------------------------------------------------------------------------------------------
# Damaged shards: each shard's sha256 is recorded at write time (issue 16, item 16)
# --------------------------------------------------------------------------------------------------
def damage_middle(path: Path) -> None:
    """Overwrite bytes in the middle of a parquet file: the footer (and so the row count) stays intact."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(range(64))
    path.write_bytes(bytes(data))


def test_a_shard_damaged_in_the_middle_is_named_and_rewritten_on_resume(bb, done, tmp_path):
    import hashlib

    out = tmp_path / "c"
    shutil.copytree(done, out)
    shard = out / "data" / "train-00001-of-00003.parquet"
    record = out / "shard_sha256" / f"{shard.name}.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(shard.read_bytes()).hexdigest()  # sha256sum's format
    damage_middle(shard)
    assert collection_store.shard_complete(shard, 4)  # the footer still says 4 rows: only the hash tells
    status = collection_status(out, verify=True)
    assert not status["complete"] and status["complete_shards"] == 2 and str(shard) in status["damaged"][0]
    with pytest.raises(ValueError, match=f"shard '{shard}' is damaged.*re-run the same `opdiff collect`"):
        TrajectoryCache.build(out, tmp_path / "cache")
    with pytest.raises(ValueError, match="is damaged"):
        load_collection(out, cache_dir=str(tmp_path / "hf"))
    with pytest.warns(UserWarning, match=f"shard '{shard}' is damaged .*: rewriting it"):
        result = collect(bb, out, CONFIG)
    assert result.written == (1,) and result.skipped == (0, 2)
    assert content_hash(out, verify=True) == content_hash(done)


def test_a_damaged_shard_is_caught_when_the_training_cache_fingerprint_changes(done, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(done, out)
    first = TrajectoryCache.build(out, tmp_path / "cache")
    damage_middle(out / "data" / "train-00000-of-00003.parquet")  # a new mtime: the fingerprint changes
    with pytest.raises(ValueError, match="train-00000-of-00003.parquet' is damaged"):
        TrajectoryCache.build(out, tmp_path / "cache")
    assert TrajectoryCache.load(tmp_path / "cache").content_sha256 == first.content_sha256  # the cache is kept


def test_train_names_a_damaged_shard_in_one_line(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from opdiff_cli.main import app

    data = tmp_path / "data"
    shutil.copytree(tiny_run["data"], data, ignore=shutil.ignore_patterns(".opdiff-cache"))
    shard = data / "data" / "train-00000-of-00002.parquet"
    damage_middle(shard)
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.stderr.count("\n") == 1 and f"shard '{shard}' is damaged" in " ".join(res.stderr.split()), res.stderr
    assert not (tmp_path / "run").exists()


def test_a_collection_written_before_shard_hashes_still_loads(done, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(done, out, ignore=shutil.ignore_patterns("shard_sha256"))
    assert collection_status(out, verify=True)["complete"]
    assert TrajectoryCache.build(out, tmp_path / "cache").content_sha256 == content_hash(done)
