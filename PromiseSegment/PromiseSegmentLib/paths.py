"""Where PromiseSegment keeps per-user files (checkpoints, adapters). No heavy imports: the Slicer
module lists adapters before torch is installed."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PROMISE_SEGMENT_CACHE"


def cache_dir() -> Path:
    """Per-user cache (``$PROMISE_SEGMENT_CACHE``, else ``$XDG_CACHE_HOME``/``~/.cache``/promise-segment)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "promise-segment"
