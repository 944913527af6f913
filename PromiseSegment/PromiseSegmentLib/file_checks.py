"""Input and output paths checked before any work: an input exists and is readable; an output name is
valid (UTF-8, fits the file system, a known type), its folder writable, and an existing file is only
replaced when the user allowed it."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Dict, Optional, Sequence

from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.paths import name_max


def check_input(path, what: str, kind: str = "file") -> Path:
    """An existing, readable input: ``kind`` "file", "folder" or "any" (a file or a DICOM folder)."""
    p = Path(path).expanduser()
    check_utf8(p, what)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} {p} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{what} {p} does not exist (a part of that path is a file, not a folder)") from None
    except OSError as exc:
        raise InputError(f"{what} {p} cannot be read: {(exc.strerror or str(exc)).lower()}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir and kind == "file":
        raise InputError(f"{what} {p} is a folder; expected a file")
    if not is_dir and kind == "folder":
        raise InputError(f"{what} {p} is a file; expected a folder")
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {p} is not a regular file")
    if not os.access(p, os.R_OK | (os.X_OK if is_dir else 0)):
        raise InputError(f"{what} {p} cannot be read: permission denied")
    return p


def check_output(path, overwrite: bool, what: str, suffixes: Optional[Sequence[str]] = None) -> Path:
    """An output file that may be written: a usable name (``_output_text``, ``_check_name``), a known
    extension, a writable folder, and nothing at the name unless ``overwrite`` - never a folder, FIFO, device
    or socket, which the final rename would replace (a FIFO's reader, /dev/null)."""
    raw = os.fspath(path)
    p = _output_text(raw, what)
    if raw.endswith("/"):
        raise InputError(f"{what} {raw} ends with '/': give a file name, not a folder")
    if suffixes and not any(p.name.lower().endswith(s) for s in suffixes):
        found = "".join(p.suffixes[-2:]) if p.suffixes else "no extension"
        raise InputError(f"{what} {p}: unknown output type ({found}); use {', '.join(suffixes)}")
    _check_name(p, what)
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; give a file name")
    try:
        st = os.lstat(p)
    except OSError:
        st = None  # nothing there, or a path check_writable_folder explains
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise InputError(
            f"{what} {p} is not a regular file ({kind}); it is never replaced: remove it or choose another name"
        )
    if st is not None and not overwrite:
        raise InputError(f"{what} {p} already exists; choose another name or pass --overwrite")
    check_writable_folder(p.parent, what)
    return p


def check_output_folder(path, what: str) -> Path:
    """An output folder: a usable name, not a file, writable or creatable."""
    out = _output_text(path, what)
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out} is a file; give a folder")
    check_writable_folder(out, what)
    return out


def _output_text(raw, what: str) -> Path:
    """An output as typed, with '~' expanded as a shell would have: not empty (an unset shell variable would
    mean the current folder) and without a line break or other control character (a paste gone wrong; it
    would also break one-line messages and the CSV)."""
    text = os.fspath(raw)
    if not text.strip():
        raise InputError(f"{what} is empty; give a name")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{what} {text!r} contains a line break or another control character; rename it")
    return Path(text).expanduser()


def check_utf8(p: Path, what: str) -> None:
    """Names that are not valid UTF-8 (legal on Linux; Python keeps them as surrogates) crash ITK's C++
    readers and writers mid-run: refused with the name as the user sees it."""
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(str(p)).decode("utf-8", "backslashreplace")
        raise InputError(
            f"{what} {shown}: the path is not valid UTF-8, which the image libraries cannot open; rename it"
        ) from None


def _check_name(p: Path, what: str) -> None:
    """The file name fits the file system (NAME_MAX bytes): refused here rather than after the model has
    run. Its hidden temporary name then fits too (``paths.make_temp`` shortens it)."""
    check_utf8(p, what)
    n, limit = len(os.fsencode(p.name)), name_max(p.parent)
    if n > limit:
        raise InputError(
            f"{what} {p.name[:40]}...: the file name is too long ({n} bytes; this file system allows {limit})"
        )


def check_writable_folder(folder, what: str) -> None:
    """``folder`` exists and is writable, or can be created: its nearest existing parent is a writable folder,
    reached through no dangling or looping symbolic link, and no '..' follows a folder still to be made
    ('missing/..' exists only once 'missing' does: the file would land where nothing was checked)."""
    existing, missing = Path(folder).expanduser().absolute(), []
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing.name)
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise InputError(f"cannot write {what} into {folder}: {existing} is a symbolic link to nothing (or a loop)")
    if ".." in missing:
        raise InputError(f"cannot write {what} into {folder}: {existing / missing[-1]} does not exist")
    if not existing.is_dir():
        raise InputError(f"cannot write {what} into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} into {folder}: {existing} is not writable")
    long = [m for m in missing if len(os.fsencode(m)) > name_max(existing)]
    if long:
        raise InputError(f"cannot write {what} into {folder}: the folder name {long[0][:40]}... is too long")


def check_distinct(named: Dict[str, Optional[Path]]) -> None:
    """No two of the given paths (inputs and outputs) are the same file."""
    seen: Dict[str, str] = {}
    for label, path in named.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{seen[key]} and {label} name the same file ({path}); choose another output name")
        seen[key] = label
