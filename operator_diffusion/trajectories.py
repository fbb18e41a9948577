"""The public face of a collection for its users: ``load_collection`` (a collection as a ``datasets.Dataset``),
``TrajectoryCache`` (its memory-mapped training cache) and ``choose_precision`` (the fp32/bf16 measurement), the
names the docs (docs/collect.md) and every collection's dataset card import from here.

The collect stage lives in its own modules:

- ``collection``: ``collect``, the multi-process, resumable loop that solves and writes the shards;
- ``collection_plan``: ``CollectConfig``, ``plan_collection`` and the identity a collection records;
- ``teacher_solve``: the teacher's ε on a device, its recorded solves and the precision measurement;
- ``collection_store``: the folder (info, dataset card, parquet shards), its content hash and the Hub;
- ``trajectory_cache``: ``TrajectoryCache``, the numpy-memmap cache that training reads.
"""

from __future__ import annotations

from .collection_store import load_collection
from .teacher_solve import choose_precision
from .trajectory_cache import TrajectoryCache

__all__ = ["TrajectoryCache", "choose_precision", "load_collection"]
