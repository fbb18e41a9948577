"""Sampling: DSNO's one-NFE outputs and the teacher's solver outputs for the same seeds, and writing them.

Every sample is a function of its seed alone: x_T (z_T for a PSLD teacher, whose samples are the x half) and
(for ``labels="random"``) the class label come from
``seeds.example_inputs`` — the noise rule of `opdiff collect` — so seed s gives the same image
whatever the batch size, and DSNO's sample for seed s is comparable with the teacher's trajectory for s.
(On CPU, convolutions round differently at different batch sizes: values agree to float round-off, not bit
for bit.)

Writers (``SampleWriter``) lay a sample folder out as::

    OUT/opdiff_samples.json        what was sampled (run, seeds, times, labels, teacher solver), format version
    OUT/images/<seed>.png          the final-time samples (what clean-fid and `opdiff fid` read)
    OUT/samples.npz                uint8 images (N, H, W, C) or (N, T, H, W, C), seeds, labels, times
    OUT/grid.png                   the first samples tiled (small images enlarged)
    OUT/trajectories/<seed>.png    with several times: each sample's outputs left to right (DSNO Figure 2)
    OUT/trajectories.png           the first trajectories, one per row
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .configs import SAMPLE_FORMATS as FORMATS
from .configs import SAMPLE_NUM
from .images import SAMPLES_IMAGES, SAMPLES_INFO, image_grid, save_png, to_uint8, upscale
from .schedules import time_grid
from .seeds import parse_label_spec, parse_labels, parse_seeds  # noqa: F401  (re-exported)

FORMAT_VERSION = 1
GRID_MAX = 64  # samples in grid.png
STRIPS_MAX = 16  # trajectories in trajectories.png
VIEW_MIN_SIZE = 64  # grids of smaller images are enlarged (nearest neighbour) to at least this size

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------
# Seeds and labels
# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
@dataclass
class SampleBatch:
    """Outputs (B, T, C, H, W) float32 on CPU for ``seeds`` at ``times`` (descending; the last is the sample); for
    a latent backbone, ``images``: the outputs decoded to pixels in [-1, 1] (B, T, 3, H', W'), what is written."""

    seeds: list[int]
    labels: Tensor | None
    outputs: Tensor
    times: list[float]
    images: Tensor | None = None

    @property
    def pixels(self) -> Tensor:
        """What the writers turn into images: the decoded images of a latent backbone, else the outputs."""
        return self.outputs if self.images is None else self.images


def decode_outputs(backbone, outputs: Tensor) -> Tensor | None:
    """(B, T, C, H, W) data-space outputs decoded frame by frame with ``backbone.decode`` (float32, CPU), or None for
    a backbone whose states are the images themselves (``decoded_shape`` equal to ``image_shape``)."""
    if tuple(backbone.decoded_shape) == tuple(backbone.image_shape):
        return None
    b, t = outputs.shape[:2]
    with torch.inference_mode():
        images = backbone.decode(outputs.flatten(0, 1))  # the decoder moves them where it runs
    return images.float().cpu().reshape(b, t, *images.shape[1:])


def sample_prompts(backbone, prompts: Sequence[str] | None, negative_prompt: str = ""):
    """A ``prompts.PromptTable`` of the prompts to sample (seed s takes prompt s mod their number), encoded and
    stored in float16 as a collection's are; None for a backbone without prompts. ValueError on a mismatch."""
    from .prompts import PromptTable

    if not backbone.takes_prompts:
        if prompts:
            raise ValueError(f"this model ({backbone.name}) takes no text prompts; drop --prompt/--prompts")
        return None
    if not prompts:
        raise ValueError("this model is text-conditioned: pass --prompt TEXT or --prompts FILE")
    return PromptTable.build(backbone, list(prompts), negative_prompt)


def seed_conditioning(prompts, seeds: Sequence[int], device) -> dict[str, Tensor]:
    """The conditioning inputs beyond labels of ``seeds``: seed s takes row s mod L of the prompt ``prompts``
    table's list (the stored float16 embeddings); none without prompts."""
    if prompts is None:
        return {}
    return {k: v.to(device) for k, v in prompts.inputs(prompts.rows(seeds)).items()}


def seed_inputs(
    seeds: Sequence[int], backbone, labels, batch_size: int, device
) -> Iterator[tuple[list[int], Tensor, Tensor | None]]:
    """(seeds, x_T, labels) per batch of at most ``batch_size`` seeds, by the collection's noise rule, on ``device``
    (for a PSLD backbone x_T is the phase-space prior draw z_T, (B, 2C, H, W))."""
    from .seeds import example_inputs

    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    for i in range(0, len(seeds), batch_size):
        chunk = list(seeds[i : i + batch_size])
        x, y = example_inputs(chunk, backbone.image_shape, labels, backbone.num_classes, backbone.schedule)
        yield chunk, x.to(device), None if y is None else y.to(device)


def dsno_batches(
    model,
    seeds: Sequence[int],
    labels=None,
    times: Sequence[float] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    frames: Sequence[int] | None = None,
    prompts=None,
    compile: bool = False,
) -> Iterator[SampleBatch]:
    """DSNO's outputs, one forward pass per batch: at its training times, or at ``times`` (App. A.3); only the
    output frames ``frames`` (indices into those times, e.g. ``[-1]``: the samples), frame-pruned, when given.
    A text-conditioned model takes ``prompts`` (``sample_prompts``); a latent one's outputs are also decoded.
    ``compile``: the forward pass under torch.compile (``compilation``)."""
    from .compilation import compiled

    bb = model.backbone
    model.to(device).eval()
    out_times = [float(t) for t in (model.times if times is None else times)]
    if frames is not None:
        frames = model.check_frames(frames, len(out_times))
        out_times = [out_times[i] for i in frames]
    forward = compiled(model, compile, "DSNO")
    for chunk, x, y in seed_inputs(seeds, bb, labels, batch_size, device):
        cond = seed_conditioning(prompts, chunk, device)
        with torch.inference_mode():
            out = forward(x, y, times=times, frames=frames, **cond).float().cpu()
        yield SampleBatch(chunk, None if y is None else y.cpu(), out, out_times, decode_outputs(bb, out))


@dataclass(frozen=True)
class TeacherSolver:
    """How the teacher samples: ``solver`` with ``steps`` steps on a ``grid`` from t_max to ``t_end``; the
    output is the collection ``target`` at t_end (the denoised x̂_0 costs one more evaluation).

    ``to_zero``: diffusers' final step to σ = 0 instead — the solve stops one grid point early, at t_{N−1}, and
    returns x̂_0 there (what a first-order step from t_{N−1} to σ = 0 lands on), so N evaluations are N − 1 steps
    and that final x̂_0, all of them advancing the solution (the output is then always the denoised x̂_0)."""

    solver: str
    steps: int
    grid: str
    t_end: float
    target: str = "denoised"
    options: dict = field(default_factory=dict)
    to_zero: bool = False

    def grid_times(self, schedule) -> Tensor:
        ts = time_grid(schedule, self.steps, self.grid, t_end=self.t_end)
        if self.to_zero:
            if self.steps < 2:
                raise ValueError("a final step to σ = 0 needs at least 2 grid steps (1 is the one-shot denoiser)")
            return ts[:-1]
        return ts

    @property
    def output_target(self) -> str:
        return "denoised" if self.to_zero else self.target

    def nfe(self, schedule) -> int:
        """Network evaluations per sample (a dry run on a free ε: the solvers' own count); also validates the
        solver, its options and the grid, and refuses a stochastic (PSLD reverse-SDE) solver."""
        from .collection_plan import check_deterministic, solver_nfe

        check_deterministic(self.solver, schedule, "a sample must be a function of its seed")
        ts = self.grid_times(schedule)
        return solver_nfe(schedule, ts, self.solver, [len(ts) - 1], self.output_target, self.options)

    def describe(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        zero = ", last step to σ = 0" if self.to_zero else ""
        return f"{self.solver} ({self.steps} step{'s' if self.steps > 1 else ''}, {self.grid} grid{opts}{zero})"


def teacher_batches(
    backbone,
    seeds: Sequence[int],
    solver: TeacherSolver,
    labels=None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    guidance: float | None = None,
    prompts=None,
    compile: bool = False,
) -> Iterator[SampleBatch]:
    """The teacher's outputs (B, 1, C, H, W) at ``solver.t_end`` for the same seeds (same noise rule); with
    ``prompts`` (``sample_prompts``) guided against its negative prompt; a latent teacher's are also decoded.
    ``compile``: the teacher under torch.compile (``compilation``)."""
    from .teacher_solve import EpsFunction, record_trajectories

    nulls = None if prompts is None else prompts.null_inputs()
    teacher = EpsFunction.from_backbone(backbone, guidance, device, null_inputs=nulls, compile=compile)
    ts = solver.grid_times(backbone.schedule)
    for chunk, x, y in seed_inputs(seeds, backbone, labels, batch_size, device):
        extra = {} if y is None else {"labels": y}
        extra.update(seed_conditioning(prompts, chunk, device))
        with torch.inference_mode():
            out = record_trajectories(
                teacher.eps_fn,
                x,
                teacher.schedule,
                ts,
                [len(ts) - 1],
                solver.solver,
                solver.output_target,
                extra,
                **solver.options,
            )
        out = out.float().cpu()
        yield SampleBatch(chunk, None if y is None else y.cpu(), out, [float(ts[-1])], decode_outputs(backbone, out))


def collect_batches(
    batches: Iterator[SampleBatch], total: int, progress: Progress | None = None, sync: Callable[[], None] | None = None
) -> tuple[SampleBatch, float]:
    """Run a generator to the end: all outputs concatenated, and the wall time (seconds) it took."""
    parts: list[SampleBatch] = []
    start = time.perf_counter()
    done = 0
    for b in batches:
        parts.append(b)
        done += len(b.seeds)
        if progress is not None:
            progress(done, total)
    if sync is not None:
        sync()
    seconds = time.perf_counter() - start
    labels = None if parts[0].labels is None else torch.cat([b.labels for b in parts])
    images = None if parts[0].images is None else torch.cat([b.images for b in parts])
    merged = SampleBatch(
        [s for b in parts for s in b.seeds], labels, torch.cat([b.outputs for b in parts]), parts[0].times, images
    )
    return merged, seconds


# --------------------------------------------------------------------------------------------------
# Teachers of runs
# --------------------------------------------------------------------------------------------------
def run_teacher(info: dict, checkpoint: str | os.PathLike | None = None):
    """The teacher a run was distilled from: the collection's backbone config with the teacher's weights.

    Weights, in order: ``checkpoint`` when given (a .safetensors file, or a model folder holding one:
    ``training.weights_in_directory``); else, when the collection was made from a checkpoint file, the first file
    whose sha256 is the collection's ``checkpoint_sha256`` among the run's ``--init-from`` file, the file the
    collection recorded (``teacher_checkpoint``) and the teachers shipped with opdiff (the digits teacher); else
    the backbone rebuilt from where its weights came from (``teacher_source``: a diffusers model folder or Hub id),
    else the run's ``--init-from`` file, else the backbone's config itself. The weights must hash to the
    collection's ``weights_sha256``: samples of another network would be no comparison."""
    coll = info.get("collection", {})
    if "backbone" not in coll:
        raise ValueError(
            "this run's config.json does not record the teacher (trained by an older opdiff); "
            "pass the teacher with --teacher-checkpoint and its backbone options"
        )
    if checkpoint is not None and Path(checkpoint).is_dir():
        from .training import weights_in_directory

        checkpoint = weights_in_directory(Path(checkpoint), "--teacher-checkpoint")
    if checkpoint is None and coll.get("checkpoint_sha256") is not None:
        checkpoint = find_teacher_checkpoint(info)
        if checkpoint is None:
            recorded = info.get("teacher_checkpoint")
            where = f" (the collection's file {recorded!r} is gone or changed)" if recorded else ""
            raise ValueError(
                f"cannot find the teacher's weights of this run{where}; pass them with --teacher-checkpoint PATH"
            )
    why = None
    if checkpoint is None:  # weights the backbone loads itself: its recorded source, the run's --init-from file
        teacher, why = teacher_from_source(info)
        if teacher is not None:
            return teacher.eval()
        init = (info.get("train") or {}).get("init_from")
        if init and Path(init).is_file():
            try:
                teacher = _teacher_with(coll, init)
            except ValueError:  # another architecture's file
                teacher = None
            if teacher is not None and _holds_teacher(teacher, coll):
                return teacher.eval()
    backbone = _teacher_with(coll, checkpoint)
    if not _holds_teacher(backbone, coll):
        if why is not None:
            raise ValueError(
                f"cannot find the teacher's weights of this run: {why}; pass them with --teacher-checkpoint PATH "
                "(the teacher's .safetensors, or its model folder)"
            )
        raise ValueError(
            f"{str(checkpoint or 'the configured backbone')!r} is not the teacher this run was distilled "
            "from (its weights differ from the collection's); pass the checkpoint the trajectories were "
            "collected with"
        )
    return backbone.eval()


def _teacher_with(coll: dict, checkpoint: str | os.PathLike | None):
    """The collection's backbone architecture, with the weights of ``checkpoint`` when given."""
    from .backbones import load_backbone

    backbone = load_backbone(**coll["backbone"])
    if checkpoint is not None:
        backbone.load_weights(checkpoint)
    return backbone


def _holds_teacher(backbone, coll: dict) -> bool:
    """Whether ``backbone``'s weights are the collection's (``weights_sha256``; True when none was recorded)."""
    from .provenance import weights_sha256

    expected = coll.get("weights_sha256")
    return expected is None or weights_sha256(backbone) == expected


def teacher_from_source(info: dict):
    """(teacher, None) rebuilt from the collection's ``teacher_source`` (``Backbone.source()``: e.g. the diffusers
    model folder or Hub id it was collected from) when its weights are still the collection's, else (None, why)."""
    from .backbones import load_backbone

    source = info.get("teacher_source")
    if not source:
        return None, "the collection does not record where its teacher's weights came from"
    where = source.get("pretrained") or source.get("checkpoint") or source.get("name")
    try:
        teacher = load_backbone(**source)
    except (OSError, ValueError, TypeError, ImportError) as e:  # gone, moved, offline, another plugin version
        return None, f"its source {str(where)!r} does not load ({' '.join(str(e).split())})"
    if not _holds_teacher(teacher, info.get("collection", {})):
        return None, f"its source {str(where)!r} holds other weights now"
    return teacher, None


def find_teacher_checkpoint(info: dict) -> str | None:
    """The first existing file whose sha256 is the collection's ``checkpoint_sha256``: the run's ``--init-from``,
    the collection's recorded ``teacher_checkpoint``, then the shipped teachers (``assets/*.safetensors``)."""
    from .provenance import file_sha256

    want = info.get("collection", {}).get("checkpoint_sha256")
    assets = Path(__file__).parent / "assets"
    candidates = [(info.get("train") or {}).get("init_from"), info.get("teacher_checkpoint")]
    candidates += [str(p) for p in sorted(assets.glob("*.safetensors"))]
    seen: set[str] = set()
    for c in candidates:
        if not c or c in seen or not Path(c).is_file():
            continue
        seen.add(c)
        if file_sha256(c) == want:
            return c
    return None


def run_solver(
    info: dict,
    solver: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    options: dict | None = None,
) -> TeacherSolver:
    """The teacher solver of a run's collection, with any field overridden; it ends at DSNO's last time."""
    coll = info["collection"]
    same = solver in (None, coll["solver"])
    opts = dict(coll.get("solver_options", {})) if same and options is None else dict(options or {})
    return TeacherSolver(
        solver or coll["solver"],
        int(steps or coll["steps"]),
        grid or coll["grid"],
        float(coll["output_times"][-1]),
        coll.get("target", "denoised"),
        opts,
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", offline: bool = False):
    """(DSNO, info) from a run directory (``opdiff train``'s output, or its Hub id or Hub-layout folder:
    ``hub.resolve_run``, from the Hub cache only when ``offline``) or a DSNO .safetensors checkpoint."""
    from .adapter import DSNO
    from .hub import resolve_run
    from .training import load_run

    path = resolve_run(path, offline)
    if path.is_dir():
        return load_run(path, map_location=device)
    if path.is_file():
        return DSNO.load(path, map_location=device), {}
    raise FileNotFoundError(f"{str(path)!r} is neither an `opdiff train` run folder nor a DSNO checkpoint")


def open_run(path: str | os.PathLike, device: str | torch.device = "cpu", what: str = "the run", offline: bool = False):
    """(DSNO, info) of a run folder or DSNO checkpoint (``load_model``); anything unloadable is a one-line
    ValueError naming ``what``."""
    try:
        return load_model(path, device=device, offline=offline)
    except FileNotFoundError as e:
        raise ValueError(f"{what}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load {what} {str(path)!r}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------
def view_factor(height: int) -> int:
    """Nearest-neighbour enlargement that makes an image at least VIEW_MIN_SIZE pixels tall."""
    return max(1, math.ceil(VIEW_MIN_SIZE / height))


def trajectory_strip(frames: np.ndarray, pad: int = 1) -> np.ndarray:
    """(T, H, W, C) pixels → one row image, earliest time on the left (DSNO Figure 2)."""
    return image_grid(frames, nrow=len(frames), pad=pad)


def output_paths(out: Path, formats: Sequence[str], several_times: bool) -> list[Path]:
    """Everything a sample folder will hold (to refuse overwriting before anything is written)."""
    paths = [out / SAMPLES_INFO]
    if "png" in formats:
        paths.append(out / SAMPLES_IMAGES)
        if several_times:
            paths.append(out / "trajectories")
    if "npz" in formats:
        paths.append(out / "samples.npz")
    if "grid" in formats:
        paths.append(out / "grid.png")
        if several_times:
            paths.append(out / "trajectories.png")
    return paths


def seed_name(seed: int) -> str:
    return f"{seed:06d}.png"


class SampleWriter:
    """Streams batches into a sample folder: PNGs as they come, the npz and grids at ``close``."""

    def __init__(self, out: str | os.PathLike, formats: Sequence[str], meta: dict, overwrite: bool = False):
        bad = [f for f in formats if f not in FORMATS]
        if bad or not formats:
            raise ValueError(f"unknown format(s) {bad or formats}; valid: {', '.join(FORMATS)}")
        self.out, self.formats, self.meta = Path(out), tuple(formats), meta
        self.overwrite = overwrite
        self.pixels: list[np.ndarray] = []
        self.seeds: list[int] = []
        self.labels: list[np.ndarray] = []
        self.times: list[float] | None = None
        self._started = False

    def check(self, several_times: bool) -> None:
        """Refuse an occupied output before anything is computed or written."""
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"--out {str(self.out)!r} is a file, not a folder")
        existing = [str(p) for p in output_paths(self.out, self.formats, several_times) if p.exists()]
        if existing and not self.overwrite:
            raise FileExistsError(
                f"{', '.join(existing[:3])} already exist(s); pass --overwrite or choose another --out"
            )

    def add(self, batch: SampleBatch) -> None:
        several = batch.outputs.shape[1] > 1
        if not self._started:
            self.check(several)
            if self.overwrite:
                self._remove_old_samples()
            self.out.mkdir(parents=True, exist_ok=True)
            if "png" in self.formats:
                (self.out / SAMPLES_IMAGES).mkdir(exist_ok=True)
                if several:
                    (self.out / "trajectories").mkdir(exist_ok=True)
            self.times, self._started = batch.times, True
        pixels = to_uint8(batch.pixels)  # (B, T, H, W, C)
        if "png" in self.formats:
            factor = view_factor(pixels.shape[2])
            for seed, frames in zip(batch.seeds, pixels):
                save_png(frames[-1], self.out / SAMPLES_IMAGES / seed_name(seed))
                if several:
                    save_png(trajectory_strip(upscale(frames, factor)), self.out / "trajectories" / seed_name(seed))
        keep = "npz" in self.formats or len(self.seeds) < max(GRID_MAX, STRIPS_MAX)
        if keep:
            self.pixels.append(pixels if "npz" in self.formats else pixels[: max(GRID_MAX, STRIPS_MAX)])
        self.seeds.extend(batch.seeds)
        if batch.labels is not None:
            self.labels.append(batch.labels.numpy())

    def _remove_old_samples(self) -> None:
        """``--overwrite``: the PNGs an earlier ``opdiff sample`` wrote here (``NNNNNN.png`` under images/ and
        trajectories/) go, so the folder holds this run's samples only (``opdiff fid`` reads every PNG in it)."""
        for sub in (SAMPLES_IMAGES, "trajectories"):
            folder = self.out / sub
            if folder.is_dir():
                for p in folder.glob("*.png"):
                    if p.stem.isdigit() and p.name == seed_name(int(p.stem)):
                        p.unlink()

    def close(self) -> dict[str, str]:
        """Write the npz, grids and the info file; returns what was written."""
        if not self._started:
            raise ValueError("no samples were generated")
        pixels = np.concatenate(self.pixels)
        several = pixels.shape[1] > 1
        files: dict[str, str] = {}
        labels = np.concatenate(self.labels) if self.labels else None
        if "npz" in self.formats:
            arrays = {
                "images": pixels if several else pixels[:, 0],
                "seeds": np.asarray(self.seeds, dtype=np.int64),
                "times": np.asarray(self.times, dtype=np.float64),
            }
            if labels is not None:
                arrays["labels"] = labels.astype(np.int64)
            tmp = self.out / "samples.tmp.npz"
            np.savez(tmp, **arrays)
            tmp.replace(self.out / "samples.npz")
            files["npz"] = str(self.out / "samples.npz")
        if "grid" in self.formats:
            factor = view_factor(pixels.shape[2])
            save_png(image_grid(upscale(pixels[:GRID_MAX, -1], factor)), self.out / "grid.png")
            files["grid"] = str(self.out / "grid.png")
            if several:
                strips = np.stack([trajectory_strip(upscale(f, factor)) for f in pixels[:STRIPS_MAX]])
                save_png(image_grid(strips, nrow=1, pad=2), self.out / "trajectories.png")
                files["trajectories"] = str(self.out / "trajectories.png")
        if "png" in self.formats:
            files["images"] = str(self.out / SAMPLES_IMAGES)
        info = {
            "format_version": FORMAT_VERSION,
            "opdiff_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **self.meta,
            "num": len(self.seeds),
            "times": self.times,
            "files": files,
        }
        (self.out / SAMPLES_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return files


def side_by_side(left: str | os.PathLike, right: str | os.PathLike, out: str | os.PathLike, gap: int = 8) -> None:
    """Two grid images joined horizontally (DSNO | teacher) with a white gap."""
    from .images import read_image

    a, b = read_image(left), read_image(right)
    if a.shape[-1] != b.shape[-1]:
        a, b = np.repeat(a, 3 // a.shape[-1], -1), np.repeat(b, 3 // b.shape[-1], -1)
    h = max(a.shape[0], b.shape[0])
    canvas = np.full((h, a.shape[1] + gap + b.shape[1], a.shape[-1]), 255, dtype=np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap :] = b
    save_png(canvas, out)


def summary(model, info: dict) -> dict[str, Any]:
    """What a sample folder records about the model it came from."""
    return {
        "model": model.config(),
        "run_info": {k: info[k] for k in ("data_content_sha256", "init_from_sha256") if k in info},
        "collection": {
            k: info.get("collection", {}).get(k) for k in ("solver", "steps", "grid", "target", "output_times")
        },
    }


# --------------------------------------------------------------------------------------------------
# The stage: `opdiff sample` from a SampleConfig
# --------------------------------------------------------------------------------------------------
class NonFiniteSamples(RuntimeError):
    """DSNO produced NaN or Inf: the checkpoint is broken (not a usage error)."""


def select_times(spec: str, times: Sequence[float]) -> list[int]:
    """Indices of the frames to keep: ``final`` (the sample), ``all``, or a list of times among ``times``."""
    from .configs import parse_time_list

    if spec == "final":
        return [len(times) - 1]
    if spec == "all":
        return list(range(len(times)))
    idx = []
    for w in parse_time_list(spec, "--times"):
        hits = [i for i, t in enumerate(times) if abs(t - w) <= 1e-6 * max(1.0, abs(t))]
        if not hits:
            raise ValueError(
                f"--times {w:g} is not an output time of this model; its times are "
                f"{', '.join(f'{t:.6g}' for t in times)}"
            )
        idx.append(hits[0])
    return sorted(set(idx))


@dataclass(frozen=True)
class SamplePlan:
    """A ``SampleConfig`` checked against its run (``plan_sample``): what ``run_sample`` draws and writes."""

    config: Any  # SampleConfig
    device: str
    model: Any  # DSNO
    info: dict
    seeds: list[int]
    labels: Any
    prompts: Any  # sample_prompts' table (text-conditioned models), else None
    query: tuple[float, ...] | None
    out_times: list[float]  # the model's output times (or the query times)
    keep: list[int]  # the indices among out_times that are written
    meta: dict
    teacher: Any = None  # with config.teacher: the teacher backbone, its solver, their NFE and the folder's meta
    teacher_solver: TeacherSolver | None = None
    teacher_meta: dict | None = None
    guidance: float | None = None


def plan_sample(config) -> SamplePlan:
    """Check ``config`` (a ``configs.SampleConfig``) against its run before anything is computed: the device, the
    run, the seeds (held out by default), labels and prompts, the query and kept times, the teacher, its solver
    and the output folders. ValueError (FileExistsError for an occupied folder) says what to change."""
    from .provenance import resolve_device
    from .seeds import resolve_seeds, seeds_text

    c = config
    dev = resolve_device(c.device)
    model, info = open_run(c.run, dev)
    seed_list = resolve_seeds(c.seeds, c.num, SAMPLE_NUM, info)
    coll_prompts = info.get("collection", {}).get("prompts") or {}
    label_mode = parse_labels(c.labels, model.backbone.num_classes)
    table = sample_prompts(model.backbone, list(c.prompts), coll_prompts.get("negative_prompt", ""))
    query = None if c.query_times is None else tuple(c.query_times)
    if query is not None:
        try:
            model.query_times(list(query))
        except ValueError as e:
            raise ValueError(f"bad --query-times: {e}") from None
    out_times = [float(t) for t in (model.times if query is None else query)]
    keep = select_times(c.times, out_times)
    teacher = solver = nfe = None
    guidance = info.get("collection", {}).get("guidance") if table is not None else None  # the teacher's W
    if c.teacher:
        if not info:
            raise ValueError("--teacher needs a run folder (a bare checkpoint does not record its teacher)")
        try:
            solver = run_solver(info, c.solver, c.steps, c.grid)
            teacher = run_teacher(info, c.teacher_checkpoint)
            nfe = solver.nfe(teacher.schedule)  # also validates solver and grid
        except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
            raise ValueError(f"cannot set up the teacher: {e}") from None
    prompt_meta = {"prompts": list(c.prompts)} if table is not None else {}
    meta = {
        "source": "dsno",
        "run": str(c.run),
        "seeds": seeds_text(c.seeds, seed_list),
        "labels": label_mode,
        "query_times": None if query is None else list(query),
        **prompt_meta,
        **summary(model, info),
    }
    tmeta = None
    if c.teacher:
        tmeta = {
            "source": "teacher",
            "run": str(c.run),
            "seeds": meta["seeds"],
            "labels": label_mode,
            "solver": solver.describe(),
            "nfe": nfe,
            **({**prompt_meta, "guidance": guidance, "negative_prompt": table.negative_prompt} if table else {}),
        }
    plan = SamplePlan(
        c,
        dev,
        model,
        info,
        seed_list,
        label_mode,
        table,
        query,
        out_times,
        keep,
        meta,
        teacher,
        solver,
        tmeta,
        guidance,
    )
    for writer, several in _writers(plan):
        writer.check(several)
    return plan


def _writers(plan: SamplePlan) -> list[tuple[SampleWriter, bool]]:
    """The sample folder's writer (and the teacher's, in out/teacher), each with whether it writes several times."""
    c, out = plan.config, Path(plan.config.out)
    writers = [(SampleWriter(out, c.formats, plan.meta, c.overwrite), len(plan.keep) > 1)]
    if plan.teacher_meta is not None:
        writers.append((SampleWriter(out / "teacher", c.formats, plan.teacher_meta, c.overwrite), False))
    return writers


def run_sample(plan: SamplePlan, progress: Callable[[str, int, int], None] | None = None) -> dict[str, str]:
    """Draw and write ``plan``'s samples (then the teacher's, and side_by_side.png with grids); returns the files
    written by name. Only the kept frames are computed: the blocks after the last temporal layer run on them
    alone (frame pruning). NaN or Inf from DSNO raises ``NonFiniteSamples``."""
    c, n = plan.config, len(plan.seeds)
    (writer, _), *teacher = _writers(plan)

    def drain(batches, label: str, into: SampleWriter) -> dict[str, str]:
        done = 0
        for batch in batches:
            if into is writer and not torch.isfinite(batch.outputs).all():
                raise NonFiniteSamples(
                    f"DSNO produced NaN/Inf for seeds among {batch.seeds[:5]}…; the checkpoint is broken"
                )
            into.add(batch)
            done += len(batch.seeds)
            if progress is not None:
                progress(label, done, n)
        return into.close()

    batches = dsno_batches(
        plan.model,
        plan.seeds,
        plan.labels,
        plan.query,
        c.batch_size,
        plan.device,
        frames=plan.keep,
        prompts=plan.prompts,
        compile=c.compile,
    )
    files = drain(batches, "DSNO (1 NFE)", writer)
    if teacher:
        tb = teacher_batches(
            plan.teacher,
            plan.seeds,
            plan.teacher_solver,
            plan.labels,
            c.batch_size,
            plan.device,
            plan.guidance,
            prompts=plan.prompts,
            compile=c.compile,
        )
        tfiles = drain(tb, f"teacher {plan.teacher_solver.describe()}", teacher[0][0])
        files.update({f"teacher_{k}": v for k, v in tfiles.items()})
        if "grid" in c.formats:
            side = Path(c.out) / "side_by_side.png"
            side_by_side(files["grid"], tfiles["grid"], side)
            files["side_by_side"] = str(side)
    return files
