"""Fault figures of issue 16 ("reliability figures to report in the closing note"), measured on real `opdiff`
processes: ``collect`` killed with SIGKILL at random moments and resumed each time, ``train`` killed the same way
with the presets' dropout (0.1), Ctrl-C (SIGINT) mid-collection, and a disk that fills up during a collection.

Each figure compares against an uninterrupted run of the same command: the collection's content hash and its seed
column (every seed once, none lost), or the final weights tensor by tensor (bitwise). A kill lands at a random
moment of the work itself: once the run has written a randomly drawn number of shards (or logged a randomly drawn
number of steps), after a further random delay, so it can fall in the middle of a shard's write or a checkpoint's.

The test suite runs these with small counts (tests/test_faults.py); ``python -m operator_diffusion.benchmarks
faults`` runs the fuller version and prints the figures."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

CLI = (sys.executable, "-m", "opdiff_cli.main")
POLL_S = 0.005
TIMEOUT_S = 300.0


@dataclass
class Attempt:
    """One process: its exit code, whether the signal reached it while it ran, the progress it had then, stderr."""

    code: int
    signalled: bool
    progress: int
    stderr: str


@dataclass
class Figure:
    """One reliability figure: what was done, whether it held, and the counts behind it."""

    name: str
    ok: bool
    detail: str
    counts: dict = field(default_factory=dict)


def tiny_teacher(path: Path, seed: int = 0) -> Path:
    """The suite's tiny 1×8×8 x0-predicting opdiff-unet teacher (seeded, output layer nonzero), saved."""
    import torch

    from ..backbones import load_backbone

    torch.manual_seed(seed)
    teacher = load_backbone("opdiff-unet", preset="tiny", in_channels=1, dropout=0.0, prediction="x0")
    torch.nn.init.normal_(teacher.network.out_conv.weight, std=0.05)
    teacher.save_weights(path)
    return path


def collect_argv(teacher: Path, out: Path, num: int, shard_size: int) -> list[str]:
    options = ["-o", "preset=tiny", "-o", "in_channels=1", "-o", "dropout=0.0", "-o", "prediction=x0"]
    sizes = ["--steps", "16", "--num", str(num), "--shard-size", str(shard_size), "--batch-size", str(shard_size)]
    return ["collect", "--backbone", "opdiff-unet", *options, "--checkpoint", str(teacher), *sizes, "--out", str(out)]


def train_argv(data: Path, out: Path, steps: int, save_every: int) -> list[str]:
    """`opdiff train` of a tiny student with the presets' dropout (digits, cifar10 and opdiff-unet's default: 0.1),
    whose draws must repeat exactly on resume."""
    flags = {"--batch-size": 8, "--max-steps": steps, "--save-every": save_every, "--log-every": 1, "--warmup": 1}
    flags.update({"--lr": "1e-3", "--ema": 0.9, "-o": "dropout=0.1"})
    return ["train", "--data", str(data), "--out", str(out), *(str(v) for item in flags.items() for v in item)]


def shards_written(out: Path) -> int:
    return len(list((out / "data").glob("train-*.parquet")))


def steps_logged(out: Path) -> int:
    with contextlib.suppress(OSError):
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    return 0


def _terminal_signals() -> None:
    """In the child, before exec: Ctrl-C as a terminal delivers it. A background job of a non-interactive shell
    (``cmd &`` in a script, nohup) starts with SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler: the SIGINT test would measure the launcher, not the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(
    argv: Sequence[str],
    log: Path,
    progress: Callable[[], int] | None = None,
    target: int = 0,
    delay: float = 0.0,
    sig: int = signal.SIGKILL,
) -> Attempt:
    """Run `opdiff ARGV` (stdout and stderr to ``log`` and ``log``.err); with ``progress``, send ``sig`` once
    ``progress() >= target`` and ``delay`` seconds more have passed, if it still runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out, open(f"{log}.err", "w") as err:
        proc = subprocess.Popen([*CLI, *argv], stdout=out, stderr=err, env=env, preexec_fn=_terminal_signals)
        signalled, reached = False, 0
        try:
            start = time.monotonic()
            while progress is not None and proc.poll() is None:
                if progress() >= target:
                    time.sleep(delay)
                    if proc.poll() is None:
                        reached = progress()
                        proc.send_signal(sig)
                        signalled = True
                    break
                if time.monotonic() - start > TIMEOUT_S:
                    break
                time.sleep(POLL_S)
            code = proc.wait(timeout=TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Attempt(code, signalled, reached, Path(f"{log}.err").read_text())


def kill_targets(rng: random.Random, kills: int, low: int, high: int) -> list[int]:
    """``kills`` increasing progress counts drawn from [low, high): each kill lands after the previous one's."""
    return sorted(rng.sample(range(low, high), kills))


def reference_collection(work: Path, num: int, shard_size: int) -> tuple[Path, Path]:
    """The tiny teacher and its uninterrupted collection (``collect_argv``), under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    teacher = tiny_teacher(work / "teacher.safetensors")
    reference = run(collect_argv(teacher, work / "reference", num, shard_size), work / "reference.log")
    if reference.code != 0:
        raise RuntimeError(f"the uninterrupted collection failed: {reference.stderr[-500:]}")
    return teacher, work / "reference"


def collect_kills(
    work: Path, teacher: Path, reference: Path, kills: int = 5, num: int = 40, shard_size: int = 2, seed: int = 16
) -> Figure:
    """SIGKILL a collection at ``kills`` random moments, resuming each time; then finish it. Holds when the content
    hash equals the uninterrupted ``reference``'s (``collect_argv`` of the same teacher and sizes), every seed
    0..num-1 is there exactly once, no temporary file is left, and every kill landed while the process ran."""
    import numpy as np

    from ..collection_store import content_hash, iter_shards

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "killed"
    argv = collect_argv(teacher, out, num, shard_size)
    shards = -(-num // shard_size)
    attempts = []
    for i, target in enumerate(kill_targets(rng, kills, 1, shards - 2)):
        attempts.append(
            run(argv, work / f"kill{i}.log", lambda: shards_written(out), target, rng.uniform(0, 0.3), signal.SIGKILL)
        )
    final = run(argv, work / "final.log")
    seeds = np.concatenate([s["seed"] for s in iter_shards(out, verify=True)]) if final.code == 0 else np.array([])
    same = final.code == 0 and content_hash(out, verify=True) == content_hash(reference)
    landed = sum(a.signalled and a.code == -signal.SIGKILL for a in attempts)
    leftovers = [p.name for p in (out / "data").glob(".*")]
    exact = sorted(seeds.tolist()) == list(range(num))
    counts = {
        "kills": kills,
        "landed": landed,
        "at_shards": [a.progress for a in attempts],
        "shards": shards,
        "seeds": len(seeds),
        "distinct_seeds": len(set(seeds.tolist())),
        "same_hash": same,
        "leftovers": leftovers,
    }
    ok = same and landed == kills and exact and not leftovers
    detail = (
        f"collect ({shards} shards of {shard_size}) SIGKILLed {landed}/{kills} times, at "
        f"{', '.join(map(str, counts['at_shards']))} shards written, resumed each time: content hash "
        f"{'equals' if same else 'DIFFERS from'} the uninterrupted run's; {counts['distinct_seeds']} distinct seeds "
        f"in {len(seeds)} rows for {num} (each seed exactly once: {exact}); temporary files left: {len(leftovers)}"
    )
    return Figure("collect-sigkill", ok, detail, counts)


def train_kills(
    work: Path, data: Path, reference: Path, kills: int = 3, steps: int = 40, save_every: int = 5, seed: int = 16
) -> Figure:
    """SIGKILL `opdiff train` (``train_argv``: dropout 0.1) at ``kills`` random steps, resuming each time; then finish
    it. Holds when the final weights equal the uninterrupted ``reference`` run's (the same argv) bitwise, every kill
    landed mid-run and the last run resumed."""
    import torch
    from safetensors.torch import load_file

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "killed"
    argv = train_argv(data, out, steps, save_every)
    attempts = [
        run(argv, work / f"kill{i}.log", lambda: steps_logged(out), target, rng.uniform(0, 0.05), signal.SIGKILL)
        for i, target in enumerate(kill_targets(rng, kills, 2, steps - 4))
    ]
    final = run(argv, work / "final.log")
    landed = sum(a.signalled and a.code == -signal.SIGKILL for a in attempts)
    resumed = "resumed from step" in Path(work / "final.log").read_text()
    equal, compared = False, 0
    if final.code == 0:
        a, b = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
        compared = len(a)
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    at = [a.progress for a in attempts]
    detail = (
        f"train ({steps} steps, checkpoint every {save_every}, dropout 0.1) SIGKILLed {landed}/{kills} times, at steps "
        f"{', '.join(map(str, at))}, resumed each time: final weights {'bitwise equal to' if equal else 'DIFFER from'} "
        f"the uninterrupted run's ({compared} tensors)"
    )
    counts = {"kills": kills, "landed": landed, "at_steps": at, "tensors": compared, "bitwise_equal": equal}
    return Figure("train-sigkill", equal and landed == kills and resumed, detail, counts)


def collect_sigint(
    work: Path, teacher: Path, reference: Path, num: int = 40, shard_size: int = 2, at_shards: int = 3
) -> Figure:
    """Ctrl-C (SIGINT) a collection after ``at_shards`` shards, then run it again. Holds when the interrupted run
    says so in one line (exit 130, no traceback) and the resumed collection equals the uninterrupted one."""
    from ..collection_store import content_hash

    work.mkdir(parents=True, exist_ok=True)
    out = work / "interrupted"
    argv = collect_argv(teacher, out, num, shard_size)
    stopped = run(argv, work / "sigint.log", lambda: shards_written(out), at_shards, 0.0, signal.SIGINT)
    lines = stopped.stderr.strip().splitlines()
    resumed = run(argv, work / "resumed.log")
    same = resumed.code == 0 and content_hash(out) == content_hash(reference)
    one_line = len(lines) == 1 and lines[0].startswith("interrupted:") and "Traceback" not in stopped.stderr
    ok = stopped.signalled and stopped.code == 130 and one_line and same
    detail = (
        f"collect interrupted by SIGINT at {stopped.progress} shards: exit {stopped.code}, stderr {len(lines)} line(s) "
        f"(`{lines[-1] if lines else ''}`), no traceback: {'Traceback' not in stopped.stderr}; resumed to the "
        f"uninterrupted content hash: {same}"
    )
    return Figure("collect-sigint", ok, detail, {"exit": stopped.code, "stderr_lines": len(lines), "same_hash": same})


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m"):
    """A tmpfs of ``size`` mounted at ``path`` for the block (yields False, mounting nothing, where the machine does
    not allow it: not root, no mount, a container without the capability)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = False
    if hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            mounted = (
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=30
                ).returncode
                == 0
            )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], capture_output=True, timeout=30)


def fill(folder: Path, name: str = "filler") -> int:
    """Fill the file system of ``folder`` with one file until ENOSPC; returns the bytes written."""
    written, chunk = 0, b"\0" * 65536
    with open(folder / name, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError:
                break
    with contextlib.suppress(OSError):  # the last partial chunk: fill the pages it left
        with open(folder / name, "ab", buffering=0) as f:
            for _ in range(16):
                f.write(b"\0" * 4096)
    return written


def collect_full_disk(
    work: Path, teacher: Path, reference: Path, num: int = 40, shard_size: int = 2, at_shards: int = 3
) -> Figure | None:
    """A disk that fills up during a collection, on a small tmpfs (None where the machine cannot mount one): once
    ``at_shards`` shards are written another file takes the rest of the disk. Holds when the collection stops with
    one error line naming the lack of space (exit 1, no traceback), the shards already written still verify against
    their recorded hashes, and once the space is freed the same command finishes the collection with the
    uninterrupted content hash."""
    from ..collection_store import content_hash, shard_damage

    work.mkdir(parents=True, exist_ok=True)
    disk = work / "disk"
    with small_tmpfs(disk) as mounted:
        if not mounted:
            return None
        out = disk / "collection"
        argv = collect_argv(teacher, out, num, shard_size)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(work / "full.log", "w") as log, open(work / "full.log.err", "w") as err:
            proc = subprocess.Popen([*CLI, *argv], stdout=log, stderr=err, env=env)
            while proc.poll() is None and shards_written(out) < at_shards:
                time.sleep(POLL_S)
            proc.send_signal(signal.SIGSTOP)  # hold it while the disk fills: no shard may slip in meanwhile
            filled = fill(disk)
            kept = sorted((out / "data").glob("train-*.parquet"))
            proc.send_signal(signal.SIGCONT)
            code = proc.wait(timeout=TIMEOUT_S)
        stderr = (work / "full.log.err").read_text()
        lines = stderr.strip().splitlines()
        intact = [p for p in kept if p.is_file() and shard_damage(p) is None]
        (disk / "filler").unlink()
        resumed = run(argv, work / "resumed.log")
        same = resumed.code == 0 and content_hash(out) == content_hash(reference)
    clear = len(lines) == 1 and lines[0].startswith("error:") and "space" in lines[0] and "Traceback" not in stderr
    ok = code == 1 and clear and len(intact) == len(kept) >= at_shards and same
    detail = (
        f"collect on a 4 MB tmpfs filled after {len(kept)} shards ({filled:,} bytes of filler): exit {code}, "
        f"{len(lines)} stderr line(s) (`{lines[-1].replace(str(out), 'OUT') if lines else ''}`); "
        f"{len(intact)}/{len(kept)} earlier shards "
        f"verify; resumed after freeing the space to the uninterrupted content hash: {same}"
    )
    counts = {"exit": code, "stderr_lines": len(lines), "kept": len(kept), "intact": len(intact), "same_hash": same}
    return Figure("collect-full-disk", ok, detail, counts)


def report(work: Path, collect_kill_count: int = 10, train_kill_count: int = 5) -> list[Figure]:
    """Every figure, on a fuller scale than the tests: ``collect_kill_count`` kills of an 80-trajectory collection,
    ``train_kill_count`` kills of a 60-step training (from that collection)."""
    num, shard_size = 80, 2
    teacher, reference = reference_collection(work / "reference", num, shard_size)
    figures = [collect_kills(work / "collect-kills", teacher, reference, collect_kill_count, num, shard_size)]
    trained = run(train_argv(reference, work / "train-reference", 60, 5), work / "train-reference.log")
    if trained.code != 0:
        raise RuntimeError(f"the uninterrupted training failed: {trained.stderr[-500:]}")
    figures.append(train_kills(work / "train-kills", reference, work / "train-reference", train_kill_count, 60, 5))
    figures.append(collect_sigint(work / "sigint", teacher, reference, num, shard_size))
    disk = collect_full_disk(work / "full-disk", teacher, reference, num, shard_size)
    if disk is not None:
        figures.append(disk)
    return figures
