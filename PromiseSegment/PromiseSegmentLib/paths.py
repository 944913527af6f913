"""Where PromiseSegment keeps per-user files (checkpoints, adapters), and the temporary files every write goes
through (``atomic_write``). No heavy imports: the Slicer module lists adapters before torch is installed.

A temporary file is hidden in the target folder, named ``.<name>.psg<pid>.<random><suffix>``; a process
killed mid-write leaves only such files, and the next write into that folder removes them once that process
is gone.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

from PromiseSegmentLib.errors import InputError

CACHE_ENV = "PROMISE_SEGMENT_CACHE"


# Fault injection for the reliability tests: "NAME" or "NAME:N" holds the N-th write of a file called NAME
# (complete on disk, not yet renamed) for $HOLD_ENV_SECONDS (default 30), touching $HOLD_ENV_MARKER when the
# hold begins and ending it early when that marker is removed, so a test can kill, interrupt or race a write
# at that point. Unset: no effect.
HOLD_ENV = "PROMISE_SEGMENT_TEST_HOLD_WRITE"

_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.psg(?P<pid>\d+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]+)*$")

BACKUP_SUFFIX = ".bak"  # a temporary name plus this: the file a rename replaced, kept until the unit is complete

_holds: dict = {}


def cache_dir() -> Path:
    """Per-user cache (``$PROMISE_SEGMENT_CACHE``, else ``$XDG_CACHE_HOME``/``~/.cache``/promise-segment)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
        if path.exists() and not path.is_dir():
            raise InputError(f"{CACHE_ENV}={env} is a file, not a folder: point it at a folder (or unset it)")
        return path
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "promise-segment"


def umask() -> int:
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


def name_max(folder) -> int:
    """The longest file name, in bytes, that the file system of ``folder`` (or its nearest existing parent)
    takes."""
    p = os.path.abspath(folder)
    while not os.path.isdir(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return os.pathconf(p, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temp_prefix(path: Path, room: int) -> str:
    """``.<name>.psg<pid>.``, the name cut short so that ``room`` more bytes still fit NAME_MAX: every legal
    output name gets a temporary name (a 250-byte name must not fail only because of its hidden one)."""
    fixed = f".psg{os.getpid()}."
    limit = name_max(path.parent) - room - len(fixed) - 1
    name = path.name
    if len(os.fsencode(name)) > limit:
        name = os.fsencode(name)[: max(limit, 1)].decode("utf-8", "ignore") or "x"
    return f".{name}{fixed}"


def make_temp(path: Path, suffix: str = ".tmp") -> str:
    """A new empty temporary file next to ``path`` (after removing stale ones); returns its name. The suffix
    is lower-cased: writers pick the format from it, and ITK writes ``.nii`` but refuses ``.NII``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    suffix = suffix.lower()
    prefix = _temp_prefix(path, 8 + len(os.fsencode(suffix)) + len(BACKUP_SUFFIX))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    return tmp


def remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


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
        end = time.monotonic() + float(os.environ.get(HOLD_ENV + "_SECONDS", "30"))
        while time.monotonic() < end and (not marker or os.path.exists(marker)):
            time.sleep(0.02)


def free_bytes(folder) -> Optional[int]:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize
