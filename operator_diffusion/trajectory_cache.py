"""The training cache of a collection: ``TrajectoryCache``, its arrays as raw little-endian files opened with
``numpy.memmap`` in a ``tensordict.TensorDict`` (shuffled reads from Arrow are several times slower; see
docs/benchmarks.md), converted once and reused while the collection's shards are unchanged.

The cache format (``CACHE_FORMAT``): ``opdiff_cache.json`` (format, content hash, shards' fingerprint, the
collection's info) and ``tensors/<column>.bin``, whose dtypes and shapes come from the collection's identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .collection_store import content_hash, item_shape, iter_shards, local_dir, require_complete, shard_paths
from .runs import write_atomic

if TYPE_CHECKING:  # heavy imports stay lazy
    from tensordict import TensorDict

__all__ = ["TrajectoryCache", "default_cache_dir", "shards_fingerprint"]

CACHE_META = "opdiff_cache.json"
CACHE_FORMAT = "opdiff-trajectory-cache/2"  # raw little-endian arrays read with numpy.memmap: nothing is unpickled
CACHE_TENSORS = "tensors"


def default_cache_dir(dataset_dir: Path, from_hub: bool, name: str) -> Path:
    """``DIR/.opdiff-cache`` for a local collection; ``trajectories/…`` under the cache root (``$OPDIFF_CACHE``,
    else ~/.cache/opdiff) for the Hub."""
    from .settings import cache_root

    if not from_hub:
        return dataset_dir / ".opdiff-cache"
    return cache_root() / "trajectories" / name.replace("/", "--")


def _cache_columns(ident: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each cached column's dtype and shape, from the collection's identity alone (never from the cache)."""
    n = ident["num"]
    cols = {
        "trajectory": (np.dtype(ident["dtype"]).newbyteorder("<"), (n, *item_shape(ident))),
        "seed": (np.dtype("<i8"), (n,)),
    }
    if ident["num_classes"]:
        cols["label"] = (np.dtype("<i8"), (n,))
    if "prompts" in ident:
        cols["prompt"] = (np.dtype("<i8"), (n,))
        cols["guidance"] = (np.dtype("<f4"), (n,))
    return cols


def shards_fingerprint(path: Path, info: dict) -> str:
    """A cheap fingerprint of a collection: its identity and every shard's name, size and modification time.
    The content hash is recomputed only when it changes."""
    stat = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p, _ in shard_paths(path, info)]
    blob = json.dumps({"identity": info["collection"], "shards": stat}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TrajectoryCache:
    """A collection as memory-mapped arrays (``trajectory`` in the stored dtype, ``seed``, ``label``) in a
    TensorDict, tagged with the collection's content hash. ``cache[idx]`` gathers a batch as an in-memory
    TensorDict. The arrays are raw files whose dtypes and shapes come from the collection's identity, opened with
    ``numpy.memmap``: loading a cache never unpickles, so a cache folder that travels with a dataset cannot run
    code."""

    path: Path
    data: "TensorDict"
    info: dict
    content_sha256: str

    @classmethod
    def build(cls, dataset: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "TrajectoryCache":
        """Convert a complete collection once, or reuse the cache: when its shards' fingerprint (identity, names,
        sizes, mtimes) is unchanged, without re-hashing; else when the content hash is unchanged. Rebuilt when
        stale."""
        path, from_hub = local_dir(dataset)
        info = require_complete(path)
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(path, from_hub, str(dataset))
        fingerprint = shards_fingerprint(path, info)
        meta = _read_cache_meta(cache)
        if meta is None or meta.get("fingerprint") != fingerprint:  # verified against the shards' recorded sha256
            digest = content_hash(path, verify=True)
            if meta is not None and meta.get("content_sha256") == digest:
                write_atomic(cache / CACHE_META, json.dumps({**meta, "fingerprint": fingerprint}, indent=2))
            else:
                _write_cache(path, info, cache, digest, fingerprint)
        return replace(cls.load(cache), info=info)  # the collection's info as it is now (provenance may change)

    @classmethod
    def load(cls, cache_dir: str | os.PathLike) -> "TrajectoryCache":
        """Open a cache written by ``build`` (no check against the collection: ``build`` does that)."""
        from tensordict import TensorDict

        cache = Path(cache_dir)
        meta = _read_cache_meta(cache)
        if meta is None:
            raise FileNotFoundError(
                f"{str(cache)!r} holds no trajectory cache of this opdiff; create it with TrajectoryCache.build(DIR)"
            )
        columns = _cache_columns(meta["info"]["collection"])
        tensors = {}
        for name, (dtype, shape) in columns.items():
            file = cache / CACHE_TENSORS / f"{name}.bin"
            expected = dtype.itemsize * math.prod(shape)
            if not file.is_file() or file.stat().st_size != expected:
                raise ValueError(
                    f"trajectory cache file {str(file)!r} is missing or has the wrong size; delete {str(cache)!r} "
                    "and it is rebuilt from the collection"
                )
            # copy-on-write: writable views for torch, and the file is never changed
            tensors[name] = torch.from_numpy(np.memmap(file, dtype=dtype, mode="c", shape=shape))
        n = columns["seed"][1][0]
        return cls(cache, TensorDict(tensors, batch_size=[n]), meta["info"], meta["content_sha256"])

    def __len__(self) -> int:
        return int(self.data.batch_size[0])

    def __getitem__(self, idx) -> "TensorDict":
        return self.data[idx]

    @property
    def times(self) -> Tensor:
        """The M output times t_1 > … > t_M (float64)."""
        return torch.tensor(self.info["collection"]["output_times"], dtype=torch.float64)

    @property
    def indices(self) -> list[int]:
        return list(self.info["collection"]["output_indices"])


def _read_cache_meta(cache: Path) -> dict | None:
    """The cache's JSON metadata when it is a cache of this format, else None."""
    meta_path = cache / CACHE_META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None


def _write_cache(path: Path, info: dict, cache: Path, digest: str, fingerprint: str) -> None:
    """Fill memory-mapped arrays shard by shard (never the whole set in memory); the meta file goes last."""
    from .resources import check_disk

    columns = _cache_columns(info["collection"])
    need = sum(dtype.itemsize * math.prod(shape) for dtype, shape in columns.values())
    check_disk(need, cache, f"the training cache of {str(path)!r}", "free space there, or set $OPDIFF_CACHE")
    tmp = cache / ".tensors.tmp"
    for stale in (tmp, cache / CACHE_TENSORS, cache / CACHE_META):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    tmp.mkdir(parents=True)
    arrays = {
        name: np.memmap(tmp / f"{name}.bin", dtype=dtype, mode="w+", shape=shape)
        for name, (dtype, shape) in columns.items()
    }
    start = 0
    for shard in iter_shards(path):
        stop = start + len(shard["seed"])
        for name, values in shard.items():
            arrays[name][start:stop] = values
        start = stop
    for a in arrays.values():
        a.flush()
    del arrays
    os.replace(tmp, cache / CACHE_TENSORS)
    meta = {"format": CACHE_FORMAT, "content_sha256": digest, "fingerprint": fingerprint, "info": info}
    write_atomic(cache / CACHE_META, json.dumps(meta, indent=2))
