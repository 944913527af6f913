"""Where PromiseSegment keeps per-user files (checkpoints, adapters), and how every file is written
(atomically). No heavy imports: the Slicer module lists adapters before torch is installed.

Every writer goes through ``write_atomically``: a hidden temporary file in the target folder, named
``.<name>.psg<pid>.<random><suffix>``, flushed to disk, checked, then renamed onto the target. A process
killed mid-write leaves only such a temporary file; the next write into that folder removes it once
the process that made it is gone.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .errors import PromiseError

CACHE_ENV = "PROMISE_SEGMENT_CACHE"
# Fault injection for the reliability tests: "NAME" or "NAME:N" holds the N-th write of a file called NAME
# (complete on disk, not yet renamed) for $HOLD_ENV_SECONDS (default 30), touching $HOLD_ENV_MARKER when the
# hold begins, so a test can kill or interrupt a write at that point. Unset: no effect.
HOLD_ENV = "PROMISE_SEGMENT_TEST_HOLD_WRITE"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.psg(?P<pid>\d+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)*$")
_holds: dict = {}


class WriteError(PromiseError, OSError):
    """A file could not be written completely (a full disk, no permission); nothing was left at its name
    (an existing file there is unchanged). The message says which file and why."""


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def is_temp_name(name: str) -> bool:
    return _TEMP_NAME.match(name) is not None


def remove_stale_temps(folder) -> int:
    """Remove the temporary files of writes whose process is gone (killed mid-write); returns how many."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            try:
                os.remove(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def make_temp(path: Path, suffix: str = ".tmp") -> str:
    """A new empty temporary file next to ``path`` (after removing stale ones); returns its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.psg{os.getpid()}.", suffix=suffix)
    os.close(fd)
    return tmp


def remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_atomically(path, write: Callable[[str], None], suffix: str = ".tmp",
                     verify: Optional[Callable[[str], None]] = None) -> Path:
    """``write(temporary path)`` next to ``path``, flushed to disk, checked (not empty; ``verify(tmp)``
    raises if what was written does not read back), then renamed onto it: an interrupted or failed write
    (a full disk, Ctrl+C, a kill) leaves the old file, or nothing, never half a file. Any failure is a
    ``WriteError`` naming the file; the temporary file is removed. ``suffix`` is for writers that pick
    the format from the extension. The file gets the usual permissions (0666 less the umask)."""
    path = Path(path)
    try:
        tmp = make_temp(path, suffix)
    except OSError as exc:
        raise WriteError(_failure(path, exc)) from exc
    try:
        _write_and_check(tmp, write, verify)
        hold_for_tests(path)
        os.replace(tmp, path)
    except Exception as exc:
        remove_quietly(tmp)
        raise WriteError(_failure(path, exc)) from exc
    except BaseException:  # Ctrl+C, SystemExit: nothing half-written stays behind
        remove_quietly(tmp)
        raise
    _sync_folder(path.parent)
    return path


def write_bytes_atomically(path, data: bytes) -> Path:
    """``data`` as the whole content of ``path`` (see ``write_atomically``); the size is checked."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    def verify(tmp):
        if os.path.getsize(tmp) != len(data):
            raise OSError(errno.EIO, f"wrote {os.path.getsize(tmp)} of {len(data)} bytes")
    return write_atomically(path, write, verify=verify)


def _write_and_check(tmp: str, write: Callable[[str], None], verify) -> None:
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if os.path.getsize(tmp) == 0:
        raise OSError(errno.EIO, "the writer produced an empty file")
    if verify is not None:
        verify(tmp)
    os.chmod(tmp, 0o666 & ~_umask())


def _sync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def hold_for_tests(path: Path) -> None:
    """The fault-injection hold (``HOLD_ENV``); nothing unless that variable names this file."""
    spec = os.environ.get(HOLD_ENV)
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if path.name != name:
        return
    _holds[name] = _holds.get(name, 0) + 1
    if _holds[name] == int(nth or 1):
        marker = os.environ.get(HOLD_ENV + "_MARKER")
        if marker:
            Path(marker).touch()
        time.sleep(float(os.environ.get(HOLD_ENV + "_SECONDS", "30")))


def free_bytes(folder) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _disk_full(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _failure(path: Path, exc: BaseException) -> str:
    """One line: which file, why, how much space is left when that is the likely cause."""
    free = free_bytes(path.parent) if path.parent.exists() else None
    if _disk_full(exc) or (free is not None and free < (64 << 10)):
        reason = "no space left on the disk"  # some writers (ITK, torch) report it only as a failed flush
    elif isinstance(exc, OSError) and exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
    else:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        reason = (lines[-1] if lines else type(exc).__name__)[:200]
    space = f" ({free // 1024} KB free there)" if free is not None and free < (1 << 20) else ""
    kept = "the existing file is unchanged" if path.exists() else "nothing was written there"
    return f"could not write {path}: {reason}{space}; {kept}"
