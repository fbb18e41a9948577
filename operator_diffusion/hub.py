"""Trained runs on the Hugging Face Hub: ``push_run`` uploads a finished ``opdiff train`` run as a model repository
(the EMA model, its JSON records, a model card and PNGs; never a pickle), and ``resolve_run`` turns a Hub id back into
a local run folder, so ``opdiff sample`` and ``opdiff bench`` take either.

The repository is a run folder in the Hub layout::

    README.md            the model card: YAML front matter (library_name: opdiff, tags, base_model), the bench table,
                         the sample grid, the collection's provenance, the commands that reproduce and sample it
    model.safetensors    the DSNO (EMA weights), as written by `opdiff train`
    config.json          the run's record (train config, model config, collection identity, format_version)
    run.json             the run's identity
    metrics.jsonl        the training log
    bench.json           `opdiff bench --out`'s JSON, when the run has one
    grid.png             `opdiff sample`'s grid, when the run has one
    opdiff_push.json     what was pushed: format_version, the files with their sha256, the versions that pushed them
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .provenance import file_sha256, versions
from .runs import METRICS_FILE, RUN_INFO, read_json
from .seeds import training_seeds
from .training import CONFIG_FILE, FORMAT_VERSION, MODEL_FILE

__all__ = [
    "PUSH_FORMAT_VERSION",
    "RUN_FILES",
    "check_repo_id",
    "find_bench",
    "find_grid",
    "model_card",
    "push_run",
    "resolve_run",
    "stage_run",
]

PUSH_FORMAT_VERSION = 1
PUSH_INFO = "opdiff_push.json"
CARD = "README.md"
BENCH_MD, BENCH_JSON, GRID = "bench.md", "bench.json", "grid.png"
RUN_FILES = (MODEL_FILE, CONFIG_FILE, RUN_INFO)  # what sampling and bench read: the download's allow_patterns
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.jsonl", CARD, "*.png")  # never a pickle, .bin or .pt


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE") or bool(
        constants.HF_HUB_OFFLINE
    )


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model id ``namespace/name``, else a one-line ValueError (huggingface_hub's rule)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(repo_id)
    try:
        if text.count("/") != 1:
            raise HFValidationError("it must be namespace/name, e.g. me/dsno-digits")
        validate_repo_id(text)
    except HFValidationError as e:
        raise ValueError(f"{text!r} is not a Hub repository id: {' '.join(str(e).split())}") from None
    return text


def finished_run_info(run: Path) -> dict:
    """``config.json`` of a finished run folder, else a ValueError/FileNotFoundError in one line."""
    if not run.is_dir():
        raise FileNotFoundError(f"{str(run)!r} is not an `opdiff train` run folder")
    if not (run / MODEL_FILE).is_file() or not (run / CONFIG_FILE).is_file():
        raise ValueError(
            f"{str(run)!r} holds no {MODEL_FILE} and {CONFIG_FILE}; it is not a finished `opdiff train` run "
            "(resume it to finish)"
        )
    info = read_json(run / CONFIG_FILE, "restore it from a copy, or train the run again")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"run {str(run)!r} has format_version {version}; this opdiff reads {FORMAT_VERSION}")
    return info


def _first_folder_with(run: Path, name: str, given: Path | None) -> Path | None:
    """``given`` (which must hold ``name``), else ``run`` or the first of its subfolders (sorted) holding ``name``;
    checkpoints/ and logs/ are never searched."""
    if given is not None:
        given = Path(given)
        if not (given / name).is_file():
            raise FileNotFoundError(f"{str(given)!r} holds no {name}")
        return given
    for folder in [run, *sorted(p for p in run.iterdir() if p.is_dir() and p.name not in ("checkpoints", "logs"))]:
        if (folder / name).is_file():
            return folder
    return None


def find_bench(run: Path, bench: Path | None = None) -> Path | None:
    """The folder of the run's bench report (``opdiff bench --out``: bench.md beside bench.json)."""
    return _first_folder_with(Path(run), BENCH_MD, bench)


def find_grid(run: Path, samples: Path | None = None) -> Path | None:
    """The folder of the run's sample grid (``opdiff sample --out``: grid.png)."""
    return _first_folder_with(Path(run), GRID, samples)


# --------------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------------
def teacher_hub_id(info: dict) -> str | None:
    """The teacher's Hub id when it was loaded from the Hub (``teacher_source.pretrained`` that is no local path)."""
    source = info.get("teacher_source") or {}
    pretrained = source.get("pretrained")
    if not isinstance(pretrained, str) or Path(pretrained).is_absolute() or pretrained.startswith((".", "~")):
        return None
    try:
        return check_repo_id(pretrained)
    except ValueError:
        return None


def _cmd(*words: Any) -> str:
    return " ".join(shlex.quote(str(w)) for w in words if w is not None)


def _backbone_flags(info: dict) -> list[str]:
    """The collect flags that rebuild the teacher: its source (a Hub id or folder) or its config and checkpoint."""
    coll, source = info["collection"], info.get("teacher_source")
    flags = ["--backbone", coll["backbone"]["name"]]
    if source:
        skip = ("name", "scheduler_config", "prediction", "null_label")
        for k, v in source.items():
            if k not in skip and v is not None and v != {}:
                flags += ["-o", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
        return flags
    config = {k: v for k, v in coll["backbone"].items() if k != "name"}
    flags += ["-o", json.dumps(config, separators=(",", ":"))]
    if info.get("teacher_checkpoint"):
        flags += ["--checkpoint", info["teacher_checkpoint"]]
    return flags


def reproduce_commands(info: dict, data: str = "data", out: str = "run") -> list[str]:
    """``opdiff collect`` and ``opdiff train`` command lines that remake this run's collection and run."""
    c, t = info["collection"], info["train"]
    collect = ["opdiff", "collect", *_backbone_flags(info)]
    collect += ["--solver", c["solver"]]
    for k, v in (c.get("solver_options") or {}).items():
        collect += ["--solver-option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
    collect += ["--steps", c["steps"], "--grid", c["grid"]]
    if c.get("time_kind") in ("quadratic", "uniform"):
        collect += ["--times", len(c["output_times"]), "--time-kind", c["time_kind"]]
    else:
        collect += ["--time-list", ",".join(repr(float(x)) for x in c["output_times"])]
    collect += ["--target", c["target"], "--dtype", c["dtype"], "--num", c["num"], "--seed", c["seed"]]
    if c.get("labels") is not None:
        labels = c["labels"]
        collect += ["--labels", labels if isinstance(labels, str) else ",".join(map(str, labels))]
    if c.get("guidance") is not None:
        collect += ["--guidance", c["guidance"]]
    if c.get("prompts"):
        collect += ["--prompts", "PROMPTS_FILE"]  # the prompt table travels with the collection, not the run
    collect += ["--out", data]
    train = ["opdiff", "train", "--data", data, "--out", out]
    if t.get("init_from") and not info.get("init_is_teacher", False):
        train += ["--init-from", t["init_from"]]
    if t.get("backbone"):
        train += ["--backbone", t["backbone"]]
    for k, v in (t.get("backbone_options") or {}).items():
        train += ["-o", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    flags = {
        "modes": "--modes",
        "placement": "--placement",
        "weighting": "--weighting",
        "weight_min": "--weight-min",
        "weight_max": "--weight-max",
        "loss": "--loss",
        "huber_c": "--huber-c",
        "final_weight": "--final-weight",
        "batch_size": "--batch-size",
        "grad_accum": "--grad-accum",
        "lr": "--lr",
        "warmup": "--warmup",
        "lr_decay": "--lr-decay",
        "ema": "--ema",
        "mixed_precision": "--mixed-precision",
        "seed": "--seed",
    }
    for key, flag in flags.items():
        if t.get(key) is not None:
            train += [flag, t[key]]
    train += ["--max-steps", info["ema_updates"]]  # one EMA update per optimizer step
    if t.get("baseline"):
        train += ["--baseline", "one-step"]
    return [_cmd(*collect), _cmd(*train)]


def _demote(markdown: str, levels: int = 2) -> str:
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in markdown.splitlines())


def model_card(info: dict, repo_id: str, bench_md: str | None, grid: bool, pushed: dict) -> str:
    """README.md of a pushed run: YAML front matter, the bench report, the grid, provenance and the commands."""
    c = info["collection"]
    hub_teacher = teacher_hub_id(info)
    kind = "one-step baseline" if info["model"].get("baseline") else "DSNO"
    seeds = training_seeds(info)
    conditional = bool(c.get("num_classes"))
    tags = ["opdiff", "dsno", "diffusion", "one-step", "distillation", "operator-learning"]
    front = [
        "---",
        "library_name: opdiff",
        "pipeline_tag: unconditional-image-generation" if not conditional and not c.get("prompts") else None,
        "tags:",
        *(f"- {t}" for t in tags),
        *([f"base_model: {hub_teacher}", "base_model_relation: finetune"] if hub_teacher else []),
        "---",
    ]
    teacher_from = hub_teacher or (info.get("teacher_source") or {}).get("pretrained") or info.get("teacher_checkpoint")
    lines = [
        "\n".join(x for x in front if x is not None),
        "",
        f"# {repo_id}",
        "",
        f"A one-step ({kind}, 1 network evaluation per sample) sampler of {tuple(c['image_shape'])} images, distilled "
        f"with opdiff (operator-diffusion) from the `{c['backbone']['name']}` teacher"
        + (f" [`{hub_teacher}`](https://huggingface.co/{hub_teacher})" if hub_teacher else "")
        + f" on its `{c['solver']}` trajectories (DSNO, Zheng et al. 2023).",
        "",
    ]
    if grid:
        lines += ["## Samples", "", f"![samples]({GRID})", ""]
    lines += ["## Quality (`opdiff bench`)", ""]
    lines += [_demote(bench_md.strip()), ""] if bench_md else ["No bench report was pushed with this run.", ""]
    lines += [
        "## Sample",
        "",
        "```bash",
        "pip install operator-diffusion",
        f"opdiff sample {repo_id} --out samples --num 64      # one forward pass per batch",
        f"opdiff bench {repo_id} --num 1000                   # needs the teacher (below)",
        "```",
        "",
        "```python",
        "from operator_diffusion.hub import resolve_run",
        "from operator_diffusion.training import load_run",
        f'model, info = load_run(resolve_run("{repo_id}"))   # safetensors only',
        "```",
        "",
        "## Reproduce",
        "",
        "```bash",
        *reproduce_commands(info),
        "```",
        "",
        "## Provenance",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{c['backbone']['name']}` from `{teacher_from}` |",
        f"| teacher weights sha256 | `{c.get('weights_sha256')}` |",
        f"| solver | `{c['solver']}` {json.dumps(c.get('solver_options') or {})}, {c['steps']} steps, `{c['grid']}` "
        f"grid, {c.get('nfe_per_trajectory')} NFE per trajectory |",
        f"| output times | {', '.join(f'{x:.6g}' for x in c['output_times'])} (target `{c['target']}`) |",
        f"| training seeds | {seeds.start}–{seeds.stop - 1} ({len(seeds)} trajectories; noise: {c.get('noise')}) |",
        f"| collection content sha256 | `{info.get('data_content_sha256')}` |",
        f"| run format | {info.get('format_version')}, trained with opdiff {info.get('opdiff_version')} |",
        f"| {MODEL_FILE} sha256 | `{pushed['files'][MODEL_FILE]}` |",
        f"| pushed with | {', '.join(f'{k} {v}' for k, v in pushed['versions'].items())} |",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Push and resolve
# --------------------------------------------------------------------------------------------------
def draw_grid(run: Path, folder: Path, num: int) -> Path:
    """`opdiff sample RUN --num NUM --format grid --out FOLDER/samples` (held-out seeds): the folder of its grid."""
    from .configs import SampleConfig
    from .sampling import plan_sample, run_sample

    out = folder / "samples"
    run_sample(plan_sample(SampleConfig(run=str(run), out=str(out), num=num, formats=("grid",))))
    return out


def stage_run(
    run: str | os.PathLike,
    dest: str | os.PathLike,
    repo_id: str,
    bench: Path | None = None,
    samples: Path | None = None,
    sample: int | None = None,
) -> list[str]:
    """Write the repository's files for ``run`` into ``dest`` (empty or new); returns their names. ``sample``: draw
    the card's grid now, of that many samples on held-out seeds (``draw_grid``), instead of finding one."""
    run, dest = Path(run), Path(dest)
    info = finished_run_info(run)
    check_repo_id(repo_id)
    if sample is not None and (samples is not None or isinstance(sample, bool) or not 1 <= sample <= 1024):
        raise ValueError(
            "--sample N draws the card's grid (N from 1 to 1024, e.g. --sample 64); drop --samples, which takes one"
            if samples is not None
            else f"--sample must be an integer from 1 to 1024 (the grid's images), got {sample!r}"
        )
    with tempfile.TemporaryDirectory(prefix="opdiff-grid-") as drawn:
        grid_dir = draw_grid(run, Path(drawn), sample) if sample is not None else find_grid(run, samples)
        return _stage(run, dest, repo_id, info, find_bench(run, bench), grid_dir)


def _stage(run: Path, dest: Path, repo_id: str, info: dict, bench_dir: Path | None, grid_dir: Path | None) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    copies = {name: run / name for name in (MODEL_FILE, CONFIG_FILE, RUN_INFO, METRICS_FILE) if (run / name).is_file()}
    if bench_dir is not None and (bench_dir / BENCH_JSON).is_file():
        copies[BENCH_JSON] = bench_dir / BENCH_JSON
    if grid_dir is not None:
        copies[GRID] = grid_dir / GRID
    for name, src in copies.items():
        shutil.copyfile(src, dest / name)
    pushed = {
        "format_version": PUSH_FORMAT_VERSION,
        "run_format_version": info.get("format_version"),
        "files": {name: file_sha256(dest / name) for name in copies},
        "versions": versions("huggingface_hub", "safetensors"),
    }
    (dest / PUSH_INFO).write_text(json.dumps(pushed, indent=2) + "\n")
    bench_md = (bench_dir / BENCH_MD).read_text() if bench_dir is not None else None
    (dest / CARD).write_text(model_card(info, repo_id, bench_md, grid_dir is not None, pushed))
    return sorted([*copies, PUSH_INFO, CARD])


def push_run(
    run: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    bench: Path | None = None,
    samples: Path | None = None,
    sample: int | None = None,
) -> str:
    """Upload a finished run as a Hub model repository (``stage_run``'s files, one commit). Returns the URL."""
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="opdiff-push-") as tmp:
        names = stage_run(run, tmp, repo_id, bench, samples, sample)  # validates everything before any network call
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=tmp,
            repo_id=repo_id,
            repo_type="model",
            allow_patterns=list(UPLOAD_PATTERNS),
            commit_message=f"opdiff run: {', '.join(names)}",
        )
    return f"https://huggingface.co/{repo_id}"


def looks_like_hub_id(text: str) -> bool:
    """``namespace/name`` that is not written as a path (./, /, ~) and is a valid Hub id."""
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    try:
        check_repo_id(text)
    except ValueError:
        return False
    return True


def resolve_run(run: str | os.PathLike, offline: bool = False) -> Path:
    """A local path for ``run``: the path itself when it exists (a run folder, a Hub-layout folder, a checkpoint),
    else the Hub model ``run``'s snapshot of the run files (``RUN_FILES``), downloaded or, offline
    (``offline``, e.g. `--offline`, or ``HF_HUB_OFFLINE``), from the local Hub cache. Anything else is a
    FileNotFoundError in one line."""
    path = Path(run)
    if path.exists():
        return path
    text = str(run)
    if not looks_like_hub_id(text):
        raise FileNotFoundError(
            f"{text!r} is neither an `opdiff train` run folder nor a DSNO checkpoint, nor a Hub model id "
            "(namespace/name)"
        )
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    why = "--offline" if offline else "HF_HUB_OFFLINE" if is_offline() else None
    try:
        local = huggingface_hub.snapshot_download(
            text, repo_type="model", allow_patterns=list(RUN_FILES), local_files_only=why is not None
        )
    except LocalEntryNotFoundError:
        where = f"offline ({why}), and it is not in the Hub cache" if why else "and the Hub is unreachable"
        raise FileNotFoundError(f"{text!r} is no local folder, {where}; download it online once, or pass a folder")
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{text!r} is neither a local folder nor a Hub model repository you can read (check the id, or log in with "
            "`hf auth login` for a private one)"
        ) from None
    except HfHubHTTPError as e:  # RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"cannot download the run {text!r} from the Hub: {first}") from None
    except OSError as e:
        raise FileNotFoundError(f"cannot download the run {text!r} from the Hub: {e}") from None
    return Path(local)
