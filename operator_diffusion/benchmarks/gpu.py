"""GPU figures (``python -m operator_diffusion.benchmarks gpu``; issue 18): one short script for a lent GPU.

It carries nothing but the project and needs no network: the backbones are built from presets (throughput does
not depend on the weights) and the data is collected on the spot. In one run, on one CUDA device, in float32
and under bf16 autocast:

* DSNO / 1 NFE at batch 1, 16 and 256 for the digits and cifar10 presets, per placement preset, eager and (where
  ``torch.compile`` works) compiled with ``mode="reduce-overhead"`` (CUDA graphs): the frame-pruned sample against
  one teacher evaluation, timed side by side with ``torch.cuda.synchronize`` around every call;
* the training step of DSNO and of the one-step baseline (``opdiff train`` itself, through Accelerate);
* collection throughput (``opdiff collect`` end to end: teacher solves and parquet shards);
* the temporal layers' overhead on the training step (``benchmarks.overhead``: DSNO's forward + backward against
  the plain network's on the same B·M items, the layers as shipped and swapped for stand-ins);
* peak GPU memory of each measurement;
* a check of the SD 1.5 memory estimate (``benchmarks.memory``, worked out on the meta device): real training steps
  of DSNO on a random-weight SD 1.5 UNet (no download) at B = 1 and 2 and at the estimate's largest B, for each
  bf16 option, with ``torch.cuda.max_memory_allocated`` beside the estimate's prediction for that B.

On a machine without CUDA it measures nothing and says so; ``sample_rows(device="cpu", ...)`` runs the same code
on the CPU, which is how the tests keep it working.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import device_medians, precision_autocast

PRESETS = ("digits", "cifar10")
BATCHES = (1, 16, 256)
PRECISIONS = ("fp32", "bf16")
PLACEMENTS = ("full", "through-mid")
COMPILE_MODE = "reduce-overhead"


@dataclass
class SampleRow:
    preset: str
    batch: int
    precision: str
    compiled: bool
    teacher_ms: float
    ratio: dict[str, float] = field(default_factory=dict)  # placement -> DSNO sample / 1 NFE
    peak_mib: float | None = None
    error: str | None = None  # why a compiled row could not be measured


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def sample_rows(
    device: str = "cuda",
    presets=PRESETS,
    batches=BATCHES,
    precisions=PRECISIONS,
    placements=PLACEMENTS,
    compile_modes=(None, COMPILE_MODE),
    repeats: int = 20,
    num_times: int = 4,
) -> list[SampleRow]:
    """DSNO / 1 NFE per (preset, batch, precision, eager or compiled), one column per placement."""
    from ..adapter import DSNO
    from ..backbones import load_backbone

    dev = torch.device(device)
    rows = []
    for preset in presets:
        torch.manual_seed(0)
        bb = load_backbone("opdiff-unet", preset=preset).to(dev).eval()
        s = bb.schedule
        times = torch.linspace(s.t_max, s.t_min, num_times + 1, dtype=torch.float64)[1:]
        models = {p: DSNO(bb, times, modes=2, init="small", placement=p).to(dev).eval() for p in placements}
        for precision in precisions:
            for mode in compile_modes:
                for batch in batches:
                    x = torch.randn(batch, *bb.image_shape, device=dev)
                    t = torch.full((batch,), 0.5, device=dev)
                    teacher = lambda x=x, t=t: bb(x, t)  # noqa: E731
                    samples = {p: (lambda x=x, m=m: m(x, frames=[-1])) for p, m in models.items()}
                    row = SampleRow(preset, batch, precision, mode is not None, float("nan"))
                    try:
                        if mode is not None:
                            teacher = torch.compile(teacher, mode=mode)
                            samples = {p: torch.compile(f, mode=mode) for p, f in samples.items()}
                        fns = {"teacher": teacher, **samples}

                        def call(f):
                            def run():
                                with torch.inference_mode(), precision_autocast(dev, precision):
                                    f()

                            return run

                        if dev.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(dev)
                        m = device_medians({k: call(f) for k, f in fns.items()}, repeats, dev)
                    except Exception as e:  # a compiler that is missing or fails: recorded, the run goes on
                        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                        rows.append(row)
                        continue
                    row.teacher_ms = 1e3 * m["teacher"]
                    row.ratio = {p: m[p] / m["teacher"] for p in placements}
                    row.peak_mib = _peak_mib(dev)
                    rows.append(row)
    return rows


def training_rows(device: str = "cuda", precisions=PRECISIONS, batch: int = 256, steps: int = 30) -> list[dict]:
    """Median seconds per ``opdiff train`` step of DSNO and the baseline on a digits-shaped collection."""
    from ..backbones import load_backbone
    from ..collection import collect
    from ..collection_plan import CollectConfig
    from ..training import TrainConfig
    from .train import _step_seconds

    dev = torch.device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        collect(
            load_backbone("opdiff-unet", preset="digits"),
            root / "data",
            CollectConfig(num=2 * batch, steps=16, solver="ddim", shard_size=2 * batch, batch_size=batch),
            device=dev,
        )
        for precision in precisions:
            common = dict(
                data=str(root / "data"),
                init_from="scratch",
                batch_size=batch,
                max_steps=steps,
                save_every=10**6,
                log_every=10**6,
                warmup=0,
                mixed_precision="no" if precision == "fp32" else precision,
            )
            out = {}
            for name, extra in (("dsno", {}), ("baseline", {"baseline": True})):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                out[name] = _step_seconds(TrainConfig(out=str(root / f"{name}-{precision}"), **common, **extra), steps)
                out[f"{name}_peak_mib"] = _peak_mib(dev)
            rows.append({"precision": precision, "batch": batch, **out})
    return rows


def collection_rows(
    device: str = "cuda", precisions=PRECISIONS, num: int = 4096, batch: int = 1024, presets=PRESETS
) -> list[dict]:
    """Trajectories per second of ``collect`` (its default solver and steps) per preset (cifar10: num / 16)."""
    from ..backbones import load_backbone
    from ..collection import collect
    from ..collection_plan import CollectConfig

    dev = torch.device(device)
    rows = []
    for preset in presets:
        n = max(min(batch, num), num // 16) if preset == "cifar10" else num
        torch.manual_seed(0)
        bb = load_backbone("opdiff-unet", preset=preset)
        with torch.no_grad():  # a zero output layer would make the data trivial
            for p in bb.network.parameters():
                p.add_(0.05 * torch.randn_like(p))
        for precision in precisions:
            config = CollectConfig(num=n, batch_size=min(batch, n), shard_size=n, precision=precision)
            with tempfile.TemporaryDirectory() as tmp:
                collect(bb, Path(tmp) / "warm-up", CollectConfig(num=2, batch_size=2, precision=precision), device=dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                collect(bb, Path(tmp) / "c", config, device=dev)
                seconds = time.perf_counter() - t0
            rows.append(
                {"preset": preset, "precision": precision, "num": n, "per_s": n / seconds, "peak_mib": _peak_mib(dev)}
            )
    return rows


def sd_memory_rows(
    device: str = "cuda", unet_config="sd1.5", options=None, batches=(1, 2), at_estimate: bool = True, steps: int = 2
) -> list[dict]:
    """Measured peak memory of ``steps`` real training steps (bf16 autocast, Adam, the EMA on the device, as ``opdiff
    train``) of DSNO on a random-weight text-to-image UNet (built once), beside ``benchmarks.memory``'s estimate for
    the same B; for each option, at ``batches`` and (``at_estimate``) at the estimate's largest B. A step that runs
    out of memory is recorded as such. On the CPU (the tests) the peak is None and only the code path runs."""
    from ..adapter import DSNO
    from ..backbones import load_backbone
    from ..finetune import freeze
    from ..runs import EMA, trainable_parameters
    from .memory import OPTIONS, TIMES, estimate, meta_dsno, persistent_bytes

    dev = torch.device(device)
    meta = meta_dsno(unet_config)
    torch.manual_seed(0)
    model = DSNO(load_backbone("diffusers-text2image", unet_config=unet_config), TIMES, init="small").to(dev).train()
    bb = model.backbone
    rows = []
    for option in options or [o for o in OPTIONS if o.precision == "bf16"]:
        est = estimate(meta, option)
        trainable = freeze(model, option.trainable)
        persistent = persistent_bytes(model, trainable)
        if option.checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.network.disable_gradient_checkpointing()
        optimizer = torch.optim.Adam(trainable_parameters(model), lr=1e-6)
        ema = EMA(model, 0.999)
        sizes = list(batches) + ([est.max_batch] if at_estimate and est.max_batch not in batches else [])
        for batch in sizes:
            row = {"option": option.label, "checkpointing": option.checkpointing, "batch": batch, "peak_gib": None}
            row["estimate_gib"] = (est.persistent + est.fixed + batch * est.per_example) / 2**30
            row["persistent_gib"] = persistent / 2**30
            try:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                x = torch.randn(batch, *bb.state_shape, device=dev)
                cond = {k: torch.randn(batch, *v, device=dev) for k, v in bb.conditioning_shapes.items()}
                t0 = time.perf_counter()
                for _ in range(steps):  # the first step creates Adam's moments
                    with precision_autocast(dev, option.precision):
                        loss = model(x, **cond).float().abs().mean()
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ema.update(model)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                row["step_s"] = (time.perf_counter() - t0) / steps
                peak = _peak_mib(dev)
                row["peak_gib"] = None if peak is None else peak / 1024
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                optimizer.zero_grad(set_to_none=True)
            rows.append(row)
        del optimizer, ema
    return rows


def overhead_rows(device: str = "cuda") -> list[dict]:
    """The overhead benchmark's step table on the GPU: digits at B = 32 and 256, cifar10 at B = 16, fp32 and bf16."""
    from .overhead import step_overheads

    rows = []
    for precision in PRECISIONS:
        rows += step_overheads((32, 256), repeats=20, device=device, preset="digits", precision=precision)
        rows += step_overheads((16,), repeats=20, device=device, preset="cifar10", precision=precision)
    return rows


class _Report(list):
    """The report's lines; ``measured(part)`` runs one part of it. A part that fails adds one line saying how, and
    the others still run (a lent GPU is rare: one failure must not cost the rest). The lines not yet shown are
    printed as each part ends, so that a run cut short by its time limit still shows what it measured."""

    shown = 0

    def measured(self, part) -> list:
        try:
            rows = part()
        except Exception as e:
            first = str(e).splitlines()[0][:200] if str(e) else ""
            self.append(f"{part.__name__} failed: {type(e).__name__}: {first}")
            rows = []
        print("\n".join(self[self.shown :]), flush=True)
        self.shown = len(self)
        return rows


def report(machine) -> str:
    """The benchmarks page section (``__main__``); without CUDA, a line saying nothing was measured."""
    lines = _Report(
        [
            "## GPU figures (issue 18)",
            "",
            "Command: `python -m operator_diffusion.benchmarks gpu`  ",
            f"Machine: {machine()}",
            "",
        ]
    )
    if not torch.cuda.is_available():
        return "\n".join(lines + ["No CUDA device on this machine: nothing measured.", ""])
    lines += [
        f"GPU: {torch.cuda.get_device_name(0)}. DSNO / 1 NFE: the frame-pruned DSNO sample (M = 4, 2 modes) against "
        "one teacher evaluation on the same batch, medians of 20 interleaved calls with the device synchronised "
        f"around each; *compiled*: both under `torch.compile(mode={COMPILE_MODE!r})` (CUDA graphs).",
        "",
        "| preset | B | precision | compiled | 1 NFE | " + " | ".join(f"DSNO / 1 NFE ({p})" for p in PLACEMENTS),
        "|---|---:|---|---|---:|" + "---:|" * len(PLACEMENTS),
    ]
    for r in lines.measured(sample_rows):
        if r.error:
            lines.append(f"| {r.preset} | {r.batch} | {r.precision} | {r.compiled} | failed: {r.error} |")
            continue
        cells = " | ".join(f"{r.ratio[p]:.2f}×" for p in PLACEMENTS)
        lines.append(f"| {r.preset} | {r.batch} | {r.precision} | {r.compiled} | {r.teacher_ms:.2f} ms | {cells} |")
    lines += [
        "",
        "| training step (digits) | B | DSNO | baseline | DSNO / baseline | peak MiB (DSNO) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in lines.measured(training_rows):
        lines.append(
            f"| {r['precision']} | {r['batch']} | {1e3 * r['dsno']:.1f} ms | {1e3 * r['baseline']:.1f} ms | "
            f"{r['dsno'] / r['baseline']:.2f} | {r['dsno_peak_mib']:.0f} |"
        )
    from .overhead import STAND_INS, overhead_cells

    lines += [
        "",
        "Temporal overhead on the training step (issue 18's ≤ 10%; `benchmarks overhead` on the GPU): DSNO's forward + "
        "backward at the full placement over the plain network's on the same B·M items, with the layers as shipped "
        "and swapped for stand-ins (hooks only; one elementwise pass each; the block-circulant time-domain kernel).",
        "",
        "| preset | precision | B | plain step | " + " | ".join(STAND_INS) + " |",
        "|---|---|---:|---:|" + "---:|" * len(STAND_INS),
    ]
    for r in lines.measured(overhead_rows):
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['batch']} | {1e3 * r['plain']:.2f} ms | {overhead_cells(r)} |"
        )
    lines += ["", "| collection | precision | trajectories | per second | peak MiB |", "|---|---|---:|---:|---:|"]
    for r in lines.measured(collection_rows):
        lines.append(f"| {r['preset']} | {r['precision']} | {r['num']} | {r['per_s']:.0f} | {r['peak_mib']:.0f} |")
    lines += [
        "",
        "SD 1.5 UNet (random weights), 512² latents, M = 4, bf16 autocast, Adam and the EMA on the device: measured "
        "peak (`torch.cuda.max_memory_allocated`) against the meta-device estimate of `benchmarks sd-memory` for the "
        "same B.",
        "",
        "| trains | checkpointing | B | measured peak GiB | estimate GiB | measured / estimate | step s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in lines.measured(sd_memory_rows):
        if r.get("error"):
            lines.append(
                f"| {r['option']} | {r['checkpointing']} | {r['batch']} | {r['error']} | {r['estimate_gib']:.1f} | | |"
            )
            continue
        lines.append(
            f"| {r['option']} | {r['checkpointing']} | {r['batch']} | {r['peak_gib']:.1f} | {r['estimate_gib']:.1f} | "
            f"{r['peak_gib'] / r['estimate_gib']:.2f} | {r['step_s']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)
