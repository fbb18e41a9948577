"""The collection on disk: its layout, the info and dataset card, the parquet shards, progress, the content hash,
and loading or sharing it through Hugging Face (``datasets``, the Hub).

A collection is a folder in the Hub layout, written by ``collect`` (``operator_diffusion.collection``)::

    README.md                          dataset card (YAML: configs, features) + a description
    opdiff_collection.json             format version, the collection's identity config, provenance
    data/train-00000-of-00025.parquet  shard k holds examples [k·S, min((k+1)·S, num))
    shard_sha256/train-00000-of-00025.parquet.sha256   its sha256 at write time (``sha256sum -c`` format)

Each row holds ``trajectory`` (M, C, H, W) in float16 (or float32) — the teacher's x̂_0 predictions (DSNO's
targets, ``target="denoised"``) or its states x(t_i) (``target="state"``) at the output times t_1 > … > t_M, all
points of the solver grid (no interpolation) — plus ``seed`` and, for class-conditional teachers, ``label``; for
text-conditioned teachers ``prompt`` (the row of its prompt in ``prompts.safetensors``, where each distinct prompt's
embedding is stored once: ``operator_diffusion.prompts``) and ``guidance`` (its scale W).
x_T is never stored: it is regenerated from the seed (the noise rule: ``operator_diffusion.collection``).

``load_collection`` opens a collection (a folder or a Hub id) with ``datasets``; ``push_to_hub`` uploads one;
``content_hash`` identifies its data. Training reads it through ``trajectory_cache.TrajectoryCache``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import __version__
from .runs import read_json, write_atomic

if TYPE_CHECKING:  # heavy imports stay lazy
    import datasets

    from .collection_plan import CollectionPlan

__all__ = [
    "CollectionMismatchError",
    "check_output_dir",
    "collection_status",
    "content_hash",
    "dataset_card",
    "features",
    "identity_diff",
    "item_shape",
    "iter_shards",
    "load_collection",
    "local_dir",
    "push_to_hub",
    "read_info",
    "read_shard",
    "require_complete",
    "shard_complete",
    "shard_damage",
    "shard_hash_path",
    "shard_name",
    "shard_paths",
    "write_metadata",
    "write_shard",
]

FORMAT_VERSION = 1
INFO_NAME = "opdiff_collection.json"
CARD_NAME = "README.md"
DATA_DIR = "data"
SHARD_GLOB = f"{DATA_DIR}/train-*.parquet"
HASH_DIR = "shard_sha256"  # one file per shard: its sha256 recorded at write time (collections before: none)
HASH_GLOB = f"{HASH_DIR}/train-*.parquet.sha256"
SHARD_FIX = "re-run the same `opdiff collect` command, which rewrites it"
REFERENCE_STEPS_STORED = 17  # the reference DSNO code stored 16 x̂_0 and x_T per CIFAR trajectory, in float32


class CollectionMismatchError(ValueError):
    """The output folder holds another collection (or other files); ``fields`` names what differs."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def item_shape(identity: dict) -> tuple[int, ...]:
    """(M, C, H, W) of one stored trajectory."""
    return (len(identity["output_indices"]), *identity["image_shape"])


def shard_name(k: int, n: int) -> str:
    return f"{DATA_DIR}/train-{k:05d}-of-{n:05d}.parquet"


# --------------------------------------------------------------------------------------------------
# Writing: info, card, shards
# --------------------------------------------------------------------------------------------------
def features(identity: dict) -> "datasets.Features":
    """The dataset schema: trajectory Array4D (M, C, H, W), seed, and label for conditional teachers."""
    import datasets

    feats = {"trajectory": datasets.Array4D(item_shape(identity), identity["dtype"]), "seed": datasets.Value("int64")}
    if identity["num_classes"]:
        feats["label"] = datasets.Value("int64")
    if "prompts" in identity:
        feats.update(prompt=datasets.Value("int64"), guidance=datasets.Value("float32"))
    return datasets.Features(feats)


CONDITION_COLUMNS = ("label", "prompt", "guidance")  # the optional per-example columns, in schema order


def read_info(path: str | os.PathLike) -> dict | None:
    """The collection info of a folder, or None if it holds none."""
    p = Path(path) / INFO_NAME
    return read_json(p, "restore it from a copy, or collect again into a new folder") if p.is_file() else None


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old → new' for every (nested, dotted) identity field that differs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} → {_short(b)}")
    return out


def _short(v: Any, n: int = 40) -> str:
    s = json.dumps(v)
    return s if len(s) <= n else s[: n - 1] + "…"


def check_output_dir(out_dir: Path, plan: CollectionPlan) -> bool:
    """Refuse a folder that holds another collection or foreign files; True if it holds this collection."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CollectionMismatchError(f"output path {str(out_dir)!r} is a file; choose a new --out folder", ["out"])
    info = read_info(out_dir)
    if info is None:
        foreign = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.is_dir() else []
        if foreign:
            raise CollectionMismatchError(
                f"output folder {str(out_dir)!r} is not empty and holds no opdiff collection "
                f"({', '.join(sorted(foreign)[:3])}); "
                "choose a new --out",
                ["out"],
            )
        return False
    if info.get("format_version") != FORMAT_VERSION:
        raise CollectionMismatchError(
            f"{str(out_dir)!r} holds a collection of format {info.get('format_version')!r} (this opdiff writes "
            f"{FORMAT_VERSION}); choose a new --out",
            ["format_version"],
        )
    diff = identity_diff(info["collection"], plan.identity)
    if diff:
        raise CollectionMismatchError(
            f"{str(out_dir)!r} holds a different collection ({'; '.join(diff[:6])}{' …' if len(diff) > 6 else ''}); "
            "resuming needs the same arguments: choose a new --out for this one",
            [d.split(":")[0] for d in diff],
        )
    return True


def dataset_card(info: dict) -> str:
    """README.md: YAML front matter (configs/data_files, features, split size) and a description."""
    import datasets
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    ident = info["collection"]
    card = DatasetCardData(tags=["opdiff", "diffusion-trajectories", "dsno"])
    split = datasets.SplitDict({"train": datasets.SplitInfo("train", num_examples=ident["num"])})
    DatasetInfosDict({"default": datasets.DatasetInfo(features=features(ident), splits=split)}).to_dataset_card_data(
        card
    )
    MetadataConfigs({"default": {"data_files": [{"split": "train", "path": SHARD_GLOB}]}}).to_dataset_card_data(card)
    return f"---\n{card.to_yaml()}\n---\n\n{_card_text(info)}"


def _card_text(info: dict) -> str:
    ident = info["collection"]
    bb = ident["backbone"]
    times = ", ".join(f"{t:.6g} (grid index {i})" for t, i in zip(ident["output_times"], ident["output_indices"]))
    label = (
        ""
        if ident["labels"] is None
        else f" and `label` (int64; labels: {ident['labels']}, guidance: {ident['guidance']})"
    )
    if "prompts" in ident:
        p = ident["prompts"]
        label = (
            f", `prompt` (int64: the row of its prompt in `{p['file']}`, which stores each of the {p['num_distinct']}"
            f" distinct prompts' embedding once, in {p['dtype']}; example k takes line k mod {p['num_lines']}) and"
            f" `guidance` (float32: W = {ident['guidance']}; negative prompt {p['negative_prompt']!r})"
        )
    options = ", ".join(f"{k}={v!r}" for k, v in ident["solver_options"].items()) or "no options"
    what = "x̂_0 predictions of the teacher" if ident["target"] == "denoised" else "states x(t_i) of the teacher's ODE"
    arithmetic = {"fp32": "float32", "bf16": "bf16 autocast (ε̂ cast back to float32 for the solver)"}[
        ident.get("precision", "fp32")
    ]
    choice = info.get("precision_choice")
    if choice is not None:
        sec = choice["seconds_per_eval"]
        arithmetic += (
            f", chosen by `--precision auto`: {sec['fp32'] * 1e3:.3g} ms in fp32 vs {sec['bf16'] * 1e3:.3g} ms"
            f" in bf16 per network evaluation at batch {choice['batch_size']} on {choice['device']}"
            f" (CPU capability {choice['cpu_capability']})"
        )
    return f"""# Teacher trajectories for operator learning (DSNO)

{ident["num"]:,} probability-flow ODE trajectories of the diffusion model `{bb.get("name")}` (image shape
{"×".join(map(str, ident["image_shape"]))}, schedule `{ident["schedule"].get("name")}`), collected with
opdiff {info["opdiff_version"]} (`opdiff collect`).

- Solver: `{ident["solver"]}` ({options}), {ident["steps"]} steps on a `{ident["grid"]}` grid,
  {ident["nfe_per_trajectory"]} network evaluations per trajectory; teacher network in {arithmetic}.
- Stored per example: `trajectory` ({len(ident["output_times"])}, {", ".join(map(str, ident["image_shape"]))}) in
  {ident["dtype"]}, the {what} at the output times t = {times}; `seed` (int64){label}.
- Noise: example k has seed {ident["seed"]} + k and {ident["noise"]}. x_T is not stored: regenerate it from the seed.
- Weights: checkpoint sha256 `{ident["checkpoint_sha256"]}`, state-dict sha256 `{ident["weights_sha256"]}`.

The full configuration is in `{INFO_NAME}`.

```python
from operator_diffusion.trajectories import load_collection, TrajectoryCache
ds, info = load_collection("path/or/hub-id")      # a datasets.Dataset and this card's configuration
cache = TrajectoryCache.build("path")             # memory-mapped TensorDict for training
```
"""


def write_metadata(out_dir: Path, plan: CollectionPlan) -> dict:
    """Write the info, then the card, then the data folder — all before any shard (``push_to_hub`` keeps an
    existing card). The info comes first so that a folder is never ours without it; an existing info of
    the same collection keeps its creation time."""
    old = read_info(out_dir)
    info = old or {
        "format_version": FORMAT_VERSION,
        "collection": plan.identity,
        "opdiff_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if old is None and plan.precision_choice is not None and plan.precision_choice["source"] == "measured":
        info["precision_choice"] = plan.precision_choice  # provenance of "auto", outside the identity
    if old is None and plan.checkpoint_path is not None:
        info["teacher_checkpoint"] = plan.checkpoint_path  # where bench and sample --teacher find the weights again
    if old is None and plan.teacher_source is not None:  # how they rebuild a teacher that loads its own weights
        info["teacher_source"] = plan.teacher_source
    out_dir.mkdir(parents=True, exist_ok=True)
    if plan.prompts is not None:  # before the info: a folder with an info always has its prompt table
        table_path = out_dir / plan.identity["prompts"]["file"]
        if not table_path.is_file():
            plan.prompts.save(table_path)
    if old is None:
        write_atomic(out_dir / INFO_NAME, json.dumps(info, indent=2) + "\n")
    if not (out_dir / CARD_NAME).is_file():
        write_atomic(out_dir / CARD_NAME, dataset_card(info))
    (out_dir / DATA_DIR).mkdir(exist_ok=True)
    return info


def _arrow_array4d(values: np.ndarray, ext_type) -> "Any":
    """The Array4D extension array of (N, M, C, H, W) values: nested list offsets over the flat buffer."""
    import pyarrow as pa

    storage = pa.array(values.reshape(-1))
    for d in range(values.ndim - 1, 0, -1):  # innermost list first
        n_lists = int(np.prod(values.shape[:d]))
        offsets = np.arange(n_lists + 1, dtype=np.int32) * values.shape[d]
        storage = pa.ListArray.from_arrays(pa.array(offsets), storage)
    return pa.ExtensionArray.from_storage(ext_type, storage)


def write_shard(
    path: Path,
    feats: "datasets.Features",
    trajectory: np.ndarray,
    seeds: np.ndarray,
    labels: np.ndarray | None,
    provenance: dict | None = None,
    conditions: dict[str, np.ndarray] | None = None,
) -> None:
    """Write one shard to a hidden temporary name and rename it atomically when complete; ``provenance``
    (batch size, device, torch version: what decides the float round-off) goes in the schema metadata;
    ``conditions``: the per-example columns beyond labels (``prompt``, ``guidance``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = feats.arrow_schema
    if provenance is not None:
        schema = schema.with_metadata({**schema.metadata, b"opdiff": json.dumps(provenance).encode()})
    columns = [_arrow_array4d(trajectory, schema.field("trajectory").type), pa.array(seeds, pa.int64())]
    values = {"label": labels, **(conditions or {})}
    for name in CONDITION_COLUMNS:
        if name in schema.names:
            columns.append(pa.array(values[name], schema.field(name).type))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(pa.Table.from_arrays(columns, schema=schema), tmp)
        _write_shard_hash(path, tmp)  # before the shard appears: a shard that is there always has its hash
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a folder gone read-only: the complete shards stay, the partial one goes
        tmp.unlink(missing_ok=True)
        error = OSError(
            f"cannot write shard {str(path)!r} ({' '.join(str(e).split())}); the shards already complete are kept: "
            "free some space (or fix the folder) and run the same command again to resume"
        )
        error.errno = e.errno
        raise error from None


def shard_hash_path(path: Path) -> Path:
    """Where the sha256 of shard ``path`` (``DIR/data/NAME``) is recorded: ``DIR/shard_sha256/NAME.sha256``."""
    return path.parent.parent / HASH_DIR / f"{path.name}.sha256"


def _write_shard_hash(path: Path, written: Path) -> None:
    from .provenance import file_sha256

    record = shard_hash_path(path)
    record.parent.mkdir(exist_ok=True)
    write_atomic(record, f"{file_sha256(written)}  ../{DATA_DIR}/{path.name}\n")


def shard_damage(path: Path) -> str | None:
    """Why shard ``path`` is damaged — its sha256 differs from the one recorded when it was written — or None
    (it matches, or it has no record: a collection written before opdiff recorded them)."""
    from .provenance import file_sha256

    record = shard_hash_path(path)
    if not record.is_file():
        return None
    want = record.read_text().split(maxsplit=1)[:1]
    if want and file_sha256(path) == want[0]:
        return None
    return (
        f"shard {str(path)!r} is damaged (its sha256 differs from the one recorded in {str(record)!r} when it was "
        "written)"
    )


def read_shard(path: Path, shape: Sequence[int]) -> dict[str, np.ndarray]:
    """A shard's columns as numpy, trajectories (N, *shape) in the stored dtype (no float32 upcast). Works
    whether or not ``datasets`` registered its Array4D extension type with pyarrow (storage: nested lists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:  # a damaged shard (of a collection without recorded hashes)
        raise ValueError(
            f"shard {str(path)!r} cannot be read ({' '.join(str(e).split())[:200]}); {SHARD_FIX}"
        ) from None
    arr = table.column("trajectory").combine_chunks()
    arr = getattr(arr, "storage", arr)
    while hasattr(arr.type, "value_type"):  # list<list<…<float16>>> → the flat values, offsets respected
        arr = arr.flatten()
    out = {
        "trajectory": arr.to_numpy(zero_copy_only=False).reshape(len(table), *shape),
        "seed": table.column("seed").to_numpy(),
    }
    for name in CONDITION_COLUMNS:
        if name in table.column_names:
            out[name] = table.column(name).to_numpy()
    return out


def shard_complete(path: Path, rows: int, verify: bool = False) -> bool:
    """A shard is complete when its (atomically renamed) file exists and reads back ``rows`` rows; with ``verify``,
    also when its sha256 is the one recorded at write time (``shard_damage``: reads the whole file)."""
    import pyarrow.parquet as pq

    try:
        complete = path.is_file() and pq.read_metadata(path).num_rows == rows
    except Exception:  # a damaged file is incomplete and gets rewritten
        return False
    return complete and not (verify and shard_damage(path) is not None)


# --------------------------------------------------------------------------------------------------
# Reading, verification, sharing
# --------------------------------------------------------------------------------------------------
def _require_info(path: Path) -> dict:
    info = read_info(path)
    if info is None:
        raise FileNotFoundError(
            f"{str(path)!r} holds no opdiff collection (no {INFO_NAME}); create one with `opdiff collect`"
        )
    return info


def shard_paths(path: Path, info: dict) -> list[tuple[Path, int]]:
    """(path, expected rows) of every shard of the collection in ``path``."""
    ident = info["collection"]
    num, size = ident["num"], ident["shard_size"]
    n = math.ceil(num / size)
    return [(path / shard_name(k, n), min(size, num - k * size)) for k in range(n)]


def collection_status(path: str | os.PathLike, verify: bool = False) -> dict:
    """Info plus progress: complete shards and examples, stored bytes per trajectory (raw and on disk),
    and the reference code's per-trajectory bytes (17 float32 steps) for comparison. With ``verify`` each shard is
    checked against its recorded sha256, and ``damaged`` lists the reasons of those that fail (not complete)."""
    path = Path(path)
    info = _require_info(path)
    ident = info["collection"]
    shards = shard_paths(path, info)
    done = [(p, r) for p, r in shards if shard_complete(p, r)]
    damaged = {p: why for p, _ in done if verify and (why := shard_damage(p)) is not None}
    done = [(p, r) for p, r in done if p not in damaged]
    examples = sum(r for _, r in done)
    pixels = int(np.prod(ident["image_shape"]))
    return {
        "info": info,
        "num_shards": len(shards),
        "complete_shards": len(done),
        "complete_examples": examples,
        "complete": len(done) == len(shards),
        "damaged": list(damaged.values()),
        "bytes_per_trajectory": int(np.prod(item_shape(ident))) * np.dtype(ident["dtype"]).itemsize,
        "disk_bytes_per_trajectory": sum(p.stat().st_size for p, _ in done) / examples if examples else None,
        "reference_bytes_per_trajectory": REFERENCE_STEPS_STORED * pixels * 4,
    }


def require_complete(path: Path, verify: bool = False) -> dict:
    """The info of a complete collection; ValueError naming what is missing, or (``verify``) the damaged shard."""
    status = collection_status(path, verify)
    if status["damaged"]:
        raise ValueError(f"{status['damaged'][0]}; {SHARD_FIX}")
    if not status["complete"]:
        raise ValueError(
            f"collection {str(path)!r} is incomplete ({status['complete_shards']} of {status['num_shards']} shards); "
            "finish it by re-running the same `opdiff collect` command"
        )
    return status["info"]


def iter_shards(path: str | os.PathLike, verify: bool = False):
    """The shards' columns (``read_shard``) of a complete collection, in example order (``verify``: each shard
    checked against its recorded sha256 first)."""
    path = Path(path)
    info = require_complete(path, verify)
    for p, _ in shard_paths(path, info):
        yield read_shard(p, item_shape(info["collection"]))


def content_hash(path: str | os.PathLike, verify: bool = False) -> str:
    """sha256 over the trajectories (stored bytes), seeds and labels in example order (each column
    hashed on its own, then the three digests; a text-conditioned collection's prompt rows and guidance scales
    are two more columns): independent of shard size, batch size and processes. ``verify``: ``iter_shards``'."""
    cols = {"trajectory": hashlib.sha256(), "seed": hashlib.sha256(), "label": hashlib.sha256()}
    extra = {"prompt": hashlib.sha256(), "guidance": hashlib.sha256()}
    seen: set[str] = set()
    for shard in iter_shards(path, verify):
        for name, h in {**cols, **extra}.items():
            if name in shard:
                seen.add(name)
                h.update(np.ascontiguousarray(shard[name]).tobytes())
    digests = [h.hexdigest() for h in cols.values()] + [h.hexdigest() for n, h in extra.items() if n in seen]
    return hashlib.sha256(("opdiff-trajectories/1:" + ":".join(digests)).encode()).hexdigest()


def local_dir(dir_or_hub_id: str | os.PathLike) -> tuple[Path, bool]:
    """A local folder for a collection: the folder itself, or a Hub dataset's snapshot (downloaded)."""
    p = Path(dir_or_hub_id)
    if p.exists():
        return p, False
    text = str(dir_or_hub_id)
    if isinstance(dir_or_hub_id, Path) or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"{text!r} is neither a folder nor a Hub dataset id (namespace/name); "
            "pass the folder written by `opdiff collect`"
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(dir_or_hub_id), repo_type="dataset")), True


def load_collection(dir_or_hub_id: str | os.PathLike, cache_dir: str | None = None) -> tuple["datasets.Dataset", dict]:
    """(train split as a ``datasets.Dataset``, info dict) of a complete collection, local or on the Hub."""
    import datasets

    path, _ = local_dir(dir_or_hub_id)
    info = require_complete(path, verify=True)
    # explicit shard paths: `load_dataset(folder)` keys its Arrow cache on the folder's name and card, so two
    # collections in folders of the same name (e.g. two runs' "data") would share one cache entry
    files = [str(p.resolve()) for p, _ in shard_paths(path, info)]
    return datasets.load_dataset("parquet", data_files={"train": files}, split="train", cache_dir=cache_dir), info


def push_to_hub(path: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Upload a complete collection as a Hub dataset: card and info first, then the shards. Returns the URL."""
    from huggingface_hub import HfApi

    path = Path(path)
    require_complete(path, verify=True)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[CARD_NAME, INFO_NAME],
        commit_message="opdiff collection: card and info",
    )
    api.upload_folder(
        folder_path=str(path),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=[SHARD_GLOB, HASH_GLOB],
        commit_message="opdiff collection: shards",
    )
    return f"https://huggingface.co/datasets/{repo_id}"
