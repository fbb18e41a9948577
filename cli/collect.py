"""`opdiff collect` (teacher trajectories → a Hugging Face dataset folder) and `opdiff data info`.

The commands map flags to the collect stage (``operator_diffusion.collection`` and its modules) and print;
bad input exits with code 2 (nothing written), a fault while collecting (NaN from the teacher, I/O) with code 1.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, List, Optional

import typer

from ._common import (
    check_seed_flag,
    console,
    err_console,
    fail,
    parse_options,
    print_rows,
    progress_bar,
    read_prompts,
    resolve_device,
)

data_app = typer.Typer(help="Inspect trajectory datasets written by `opdiff collect`.", no_args_is_help=True)


def parse_config(items: list[str], flag: str) -> dict[str, Any]:
    """``key=value`` items (``_common.parse_options``) and JSON objects, merged left to right."""
    out: dict[str, Any] = {}
    for item in items:
        if not item.lstrip().startswith("{"):
            out.update(parse_options([item], flag))
            continue
        try:
            obj = json.loads(item)
        except json.JSONDecodeError as e:
            fail(f"{flag}: {item!r} is not a JSON object ({e})")
        if not isinstance(obj, dict):
            fail(f"{flag}: {item!r} is not a JSON object")
        out.update(obj)
    return out


def parse_labels(text: str | None):
    """'random', one class index, or a comma list of class indices (cycled over the examples)."""
    from operator_diffusion.seeds import parse_label_spec

    try:
        return parse_label_spec(text)
    except ValueError as e:
        fail(str(e))


def parse_times(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        fail(f"--time-list takes comma-separated times, got {text!r}")


def _load_teacher(name: str | None, options: dict, checkpoint: Path | None, seed: int):
    """The backbone (``backbones.load_teacher``: a checkpoint saved by opdiff is enough on its own; random weights
    seeded by ``seed`` without one, so that a checkpoint-free run is reproducible)."""
    import torch

    from operator_diffusion.backbones import load_teacher

    torch.manual_seed(seed)
    try:
        backbone = load_teacher(name, checkpoint, **options)
    except ImportError as e:
        fail(str(e), code=1)
    except (ValueError, TypeError, OSError) as e:  # OSError: a missing path, a Hub id that cannot load
        fail(str(e))
    return backbone


def collect(
    backbone: Optional[str] = typer.Option(
        None, "--backbone", help="Teacher backbone name (see `opdiff backbones`); default: the --checkpoint's own."
    ),
    checkpoint: Optional[Path] = typer.Option(
        None,
        "--checkpoint",
        help="Teacher weights (.safetensors); one saved by opdiff carries its backbone config, so it is enough alone.",
    ),
    backbone_config: List[str] = typer.Option(
        [],
        "--backbone-config",
        "--backbone-option",
        "-o",
        help="Backbone option key=value (e.g. preset=tiny) or a JSON object; repeatable.",
    ),
    solver: Optional[str] = typer.Option(
        None,
        "--solver",
        help="Teacher ODE solver (see `opdiff solvers`); default unipc (see docs/collect.md); PSLD teachers: csps-d "
        "with lam=-0.25 (`opdiff solvers --schedule psld`).",
    ),
    steps: Optional[int] = typer.Option(
        None, "--steps", help="Solver steps (the grid has steps+1 times; PSLD teachers: 99); default 49."
    ),
    grid: Optional[str] = typer.Option(
        None,
        "--grid",
        help="Solver grid: uniform, quadratic, logsnr, edm (PSLD teachers: uniform, quadratic); default quadratic.",
    ),
    times: int = typer.Option(4, "--times", help="Number M of output times on the grid."),
    time_kind: str = typer.Option(
        "quadratic", "--time-kind", help="Output placement: quadratic (DSNO's CIFAR choice) or uniform."
    ),
    time_list: Optional[str] = typer.Option(
        None, "--time-list", help="Explicit output times t1,t2,... (grid points); overrides --times."
    ),
    target: str = typer.Option(
        "denoised", "--target", help="Store the teacher's x̂_0 predictions (denoised) or its states (state)."
    ),
    num: int = typer.Option(..., "--num", help="Number of trajectories."),
    out: Path = typer.Option(..., "--out", help="Output folder (Hub dataset layout); re-run to resume."),
    labels: Optional[str] = typer.Option(
        None, "--labels", help="Conditional teachers: random (default), a class, or a comma list."
    ),
    guidance: Optional[float] = typer.Option(
        None, "--guidance", help="Classifier-free guidance scale W >= 0 (class labels: needs a null label)."
    ),
    prompts: Optional[Path] = typer.Option(
        None,
        "--prompts",
        help="Text-conditioned teachers: a file of prompts, one per line (or a .csv/.json/.jsonl/.parquet table's "
        "text column); example k takes line k mod the number of lines.",
    ),
    prompt_column: Optional[str] = typer.Option(
        None, "--prompt-column", help="The column of a --prompts table (default: text, prompt or caption)."
    ),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="The null branch of --guidance for prompts (default: the empty prompt)."
    ),
    seed: int = typer.Option(0, "--seed", help="Example k uses seed+k."),
    batch_size: int = typer.Option(
        64, "--batch-size", help="Trajectories per solve (changes only float round-off; keep it to resume bit-exactly)."
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Run the teacher under torch.compile: 1.3-1.5x faster evaluations on CPU after a one-off compile of "
        "about a minute, so it pays for long collections only (changes only float round-off; falls back to eager "
        "with a warning where compiling fails).",
    ),
    shard_size: int = typer.Option(1000, "--shard-size", help="Examples per parquet shard."),
    dtype: str = typer.Option("float16", "--dtype", help="Storage dtype: float16 or float32."),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="Teacher network arithmetic: fp32, bf16 (autocast; faster on GPUs and AVX-512 BF16 CPUs, ~10× slower on "
        "AVX2-only CPUs), or auto (time both here at --batch-size, bf16 only if ≥10% faster; a resumed folder "
        "keeps its recorded precision).",
    ),
    solver_option: List[str] = typer.Option(
        [], "--solver-option", help="Solver option key=value (e.g. order=2); repeatable."
    ),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available, else cpu) | cpu | cuda | cuda:N."),
    push_to_hub: Optional[str] = typer.Option(
        None, "--push-to-hub", help="Upload the finished folder as this Hub dataset repo."
    ),
) -> None:
    """Collect teacher PF-ODE trajectories at M grid times into a sharded, resumable Hugging Face dataset."""
    from operator_diffusion import collection_store as store
    from operator_diffusion.collection_plan import CollectConfig, plan_collection

    check_seed_flag(seed, max(num, 1))  # before the teacher's random initialisation is seeded with it

    config = CollectConfig(
        num=num,
        solver=solver,
        steps=steps,
        grid=grid,
        times=times,
        time_kind=time_kind,
        time_list=parse_times(time_list),
        target=target,
        dtype=dtype,
        precision=precision,
        seed=seed,
        shard_size=shard_size,
        labels=parse_labels(labels),
        guidance=guidance,
        prompts=read_prompts(prompts, prompt_column),
        negative_prompt=negative_prompt,
        batch_size=batch_size,
        compile=compile,
        solver_options=parse_options(solver_option, "--solver-option"),
    )
    device = resolve_device(device)
    teacher = _load_teacher(backbone, parse_config(backbone_config, "--backbone-config"), checkpoint, seed)
    try:
        plan = plan_collection(teacher, config, checkpoint, out_dir=out, device=device)
        store.check_output_dir(out, plan)
    except ValueError as e:
        fail(str(e))
    if plan.precision_choice is not None:
        err_console.print(_precision_line(plan.precision_choice, out), highlight=False, soft_wrap=True)
    started = time.perf_counter()
    try:
        result = _collect_with_progress(teacher, out, plan, device)
    except (ArithmeticError, RuntimeError, OSError, ValueError) as e:  # inputs were checked above: a fault
        fail(str(e), code=1)
    _report(result, plan, time.perf_counter() - started)
    if push_to_hub:
        try:
            url = store.push_to_hub(out, push_to_hub)
        except Exception as e:  # network, authentication, repository errors: report them in one line
            fail(f"upload to {push_to_hub!r} failed: {type(e).__name__}: {e}", code=1)
        console.print(f"uploaded to {url}")


def _collect_with_progress(teacher, out: Path, plan, device):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from operator_diffusion.collection import collect as run

    columns = (
        TextColumn("collecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trajectories"),
        TimeRemainingColumn(),
    )
    with progress_bar(*columns, console=console, transient=True) as bar:
        task = bar.add_task("collect", total=plan.config.num)
        return run(teacher, out, plan, device=device, progress=lambda n: bar.advance(task, n))


def _precision_line(choice: dict, out: Path) -> str:
    """One line on how --precision auto was resolved: the two measured timings, or the resumed folder's precision."""
    if choice["source"] == "collection":
        return (
            f"precision auto: {choice['precision']}, as recorded in the collection in {str(out)} (not measured again)"
        )
    sec = choice["seconds_per_eval"]
    return (
        f"precision auto: {choice['precision']} (per network evaluation at batch {choice['batch_size']} on "
        f"{choice['device']}, CPU capability {choice['cpu_capability']}: fp32 {sec['fp32'] * 1e3:.3g} ms, "
        f"bf16 {sec['bf16'] * 1e3:.3g} ms)"
    )


def _report(result, plan, seconds: float) -> None:
    written = len(result.written)
    console.print(
        f"{str(result.out_dir)}: {written} shard(s) written, {len(result.skipped)} already complete, "
        f"{plan.num_shards} in all; {plan.identity['nfe_per_trajectory']} NFE per trajectory; {seconds:.1f} s"
        + ("" if result.complete else f"; missing shards {list(result.missing)[:10]}")
    )


@data_app.command("info")
def data_info(
    path: Path = typer.Argument(..., help="A collection folder written by `opdiff collect`."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show a trajectory dataset's configuration, completeness and storage per trajectory."""
    from operator_diffusion.collection_store import collection_status

    try:
        status = collection_status(path, verify=True)  # a damaged shard is not complete: it is named
    except (FileNotFoundError, ValueError, KeyError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    print_rows(_info_rows(status), {"field": "field", "value": "value"}, f"opdiff collection {str(path)}", False)


def _info_rows(status: dict) -> list[dict[str, Any]]:
    info = status["info"]
    c = info["collection"]
    times = ", ".join(f"{t:.6g} ({i})" for t, i in zip(c["output_times"], c["output_indices"]))
    disk = status["disk_bytes_per_trajectory"]
    ref = status["reference_bytes_per_trajectory"]
    rows = {
        "teacher": f"{c['backbone'].get('name')} ({'×'.join(map(str, c['image_shape']))}, schedule "
        f"{c['schedule'].get('name')})",
        "solver": f"{c['solver']} {c['solver_options']}, {c['steps']} steps, {c['grid']} grid",
        "NFE per trajectory": c["nfe_per_trajectory"],
        "output times (grid index)": f"{times} ({c['time_kind']})",
        "target / dtype": f"{c['target']} / {c['dtype']}",
        "seeds": f"{c['seed']} .. {c['seed'] + c['num'] - 1}",
        "labels / guidance": f"{c['labels']} / {c['guidance']}",
        **(
            {
                "prompts": f"{c['prompts']['num_distinct']} distinct of {c['prompts']['num_lines']} lines, negative "
                f"prompt {c['prompts']['negative_prompt']!r}, embeddings in {c['prompts']['file']}"
            }
            if "prompts" in c
            else {}
        ),
        "shards complete": f"{status['complete_shards']} of {status['num_shards']} ({c['shard_size']} examples each)",
        "examples complete": f"{status['complete_examples']} of {c['num']}",
        **(
            {"damaged": "; ".join(status["damaged"]) + "; re-run the same `opdiff collect`"}
            if status["damaged"]
            else {}
        ),
        "bytes per trajectory": f"{status['bytes_per_trajectory']:,} stored"
        + (f", {disk:,.0f} on disk" if disk else "")
        + f" (reference format, 17 float32 steps: {ref:,})",
        "checkpoint sha256": c["checkpoint_sha256"],
        "weights sha256": c["weights_sha256"],
        "created": f"{info['created']} by opdiff {info['opdiff_version']}",
    }
    return [{"field": k, "value": v} for k, v in rows.items()]
