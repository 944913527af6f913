"""Where PromiseSegment keeps per-user files (checkpoints, adapters), and how every file is written
(atomically). No heavy imports: the Slicer module lists adapters before torch is installed."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "PROMISE_SEGMENT_CACHE"


def cache_dir() -> Path:
    """Per-user cache (``$PROMISE_SEGMENT_CACHE``, else ``$XDG_CACHE_HOME``/``~/.cache``/promise-segment)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "promise-segment"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path, write: Callable[[str], None], suffix: str = ".tmp") -> Path:
    """``write(temporary path)`` next to ``path``, flushed to disk, then renamed onto it: an interrupted
    or failed write (a full disk, Ctrl+C) leaves the old file, or nothing, never half a file. A writer
    that silently produced an empty file is treated as failed. ``suffix`` is for writers that pick the
    format from the extension. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if os.path.getsize(tmp) == 0:
            raise OSError(f"writing {path} produced an empty file (is the disk full?)")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path
