"""Settings read from the environment: one cache root for everything opdiff caches."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "OPDIFF_CACHE"  # the cache root; FID statistics go under fid/, Hub collections' caches under trajectories/


def cache_root() -> Path:
    """``$OPDIFF_CACHE`` if set, else ``~/.cache/opdiff``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "opdiff"
