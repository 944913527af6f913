"""Writing files atomically, alone or as one unit (every writer of the project goes through here).

``write_all`` (``write_atomically`` for one file) writes each file to a temporary name in its target folder
(``paths.make_temp``), flushes it to disk, checks it, then renames it onto the target. The files of one
command are one unit: all temporary files are written first, then renamed, and a rename that fails undoes the
earlier ones. Without permission to replace a file (``overwrite``, or what ``expect_outputs`` recorded for a
command), the rename is exclusive: a file that appeared at the name while the run was working (another run
writing the same output) is never replaced.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from PromiseSegmentLib.errors import WriteError
from PromiseSegmentLib.paths import BACKUP_SUFFIX, free_bytes, hold_for_tests, make_temp, remove_quietly, umask

_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}

_policy: Dict[str, bool] = {}  # a command's outputs -> whether a file found there may be replaced

_ours: Dict[str, Optional[Tuple[int, int]]] = {}  # an output -> (device, inode) of the file this process put there


class _Appeared(FileExistsError):
    """An exclusive rename found a file at the name: another run (or program) wrote it meanwhile."""


class Output(NamedTuple):
    """One file of a ``write_all`` unit: ``write(temporary path)`` makes it, ``verify(tmp)`` raises if it does
    not read back; ``suffix`` ends the temporary name, for writers that pick the format from it."""

    path: Path
    write: Callable[[str], None]
    suffix: str = ".tmp"
    verify: Optional[Callable[[str], None]] = None


@dataclass
class _Staged:
    path: Path
    tmp: str
    replace: bool
    backup: Optional[str] = None
    done: Optional[Tuple[int, int]] = None  # (device, inode) once renamed onto ``path``
    created: bool = False  # the rename put a file where there was none


def _key(path) -> str:
    return os.path.abspath(os.fspath(path))


def _identity(path) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def expect_outputs(paths: Iterable, overwrite: bool) -> None:
    """Recorded by ``validation`` once a command's outputs are checked: while it runs, a file found at one of
    them is replaced only with ``overwrite`` (or if this run wrote it) - the check before the work says
    nothing about the minutes after it, in which another run may write the same name."""
    _policy.clear()
    _ours.clear()
    _policy.update({_key(p): bool(overwrite) for p in paths})


def write_atomically(
    path,
    write: Callable[[str], None],
    suffix: str = ".tmp",
    verify: Optional[Callable[[str], None]] = None,
    overwrite: Optional[bool] = None,
) -> Path:
    """``write(temporary path)`` next to ``path``, flushed, checked and renamed onto it: ``write_all`` with
    one file. The file gets the usual permissions (0666 less the umask)."""
    return write_all([Output(Path(path), write, suffix, verify)], overwrite)[0]


def bytes_output(path, data: bytes) -> Output:
    """``data`` as the whole content of ``path``, its size checked: an ``Output`` for ``write_all``."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    def verify(tmp):
        if os.path.getsize(tmp) != len(data):
            raise OSError(errno.EIO, f"wrote {os.path.getsize(tmp)} of {len(data)} bytes")

    return Output(Path(path), write, ".tmp", verify)


def write_bytes_atomically(path, data: bytes, overwrite: Optional[bool] = None) -> Path:
    """``data`` as the whole content of ``path`` (see ``write_all``); the size is checked."""
    return write_all([bytes_output(path, data)], overwrite)[0]


def write_all(outputs: Sequence[Output], overwrite: Optional[bool] = None) -> List[Path]:
    """Write ``outputs`` as one unit: every temporary file written and checked (not empty, ``verify``) first,
    then all renamed. Any failure - a full disk, Ctrl+C, a kill, a file that appeared at a name - leaves
    every output as it was, and no temporary file or new folder (after a kill, the next write removes the
    temporary files). ``overwrite``: replace existing files; None: as ``expect_outputs`` recorded for that
    path, else yes. A failure is a ``WriteError`` naming the file."""
    outputs = [o._replace(path=Path(o.path)) for o in outputs]
    staged: List[_Staged] = []
    made: List[Path] = []
    current = outputs[0].path
    try:
        for o in outputs:
            current = o.path
            made += _make_folders(o.path.parent)
            staged.append(_Staged(o.path, make_temp(o.path, o.suffix), _replaces(o.path, overwrite)))
            _write_and_check(staged[-1].tmp, o.write, o.verify)
        for s in staged:
            current = s.path
            _back_up(s, len(staged) > 1)
        for s in staged:
            hold_for_tests(s.path)
        for s in staged:
            current = s.path
            _commit(s)
    except BaseException as exc:
        problems = _undo(staged, made)
        if not isinstance(exc, Exception):  # Ctrl+C, SystemExit: undone, and passed on
            raise
        raise WriteError(_failure(current, exc, [o.path for o in outputs], problems)) from exc
    for s in staged:
        if s.backup:
            remove_quietly(s.backup)
    for folder in {s.path.parent for s in staged}:
        _sync_folder(folder)
    return [o.path for o in outputs]


def _replaces(path: Path, overwrite: Optional[bool]) -> bool:
    return overwrite if overwrite is not None else _policy.get(_key(path), True)


def _make_folders(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; returns those this call created (removed if it fails)."""
    missing, created = [], []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for f in reversed(missing):
        try:
            f.mkdir()
            created.append(f)
        except FileExistsError:
            if not f.is_dir():
                raise
    return created


def _write_and_check(tmp: str, write: Callable[[str], None], verify) -> None:
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    if os.path.getsize(tmp) == 0:
        raise OSError(errno.EIO, "the writer produced an empty file")
    if verify is not None:
        verify(tmp)
    os.chmod(tmp, 0o666 & ~umask())


def _back_up(s: _Staged, needed: bool) -> None:
    """Keep the file that a rename will replace (a hard link to it, else a copy), so that a later failure in
    the same unit can put it back."""
    if not needed or not os.path.lexists(s.path):
        return
    s.backup = s.tmp + BACKUP_SUFFIX
    try:
        os.link(s.path, s.backup, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        shutil.copy2(s.path, s.backup, follow_symlinks=False)


def _commit(s: _Staged) -> None:
    """Rename the temporary file onto its name: replacing what is there only with permission (or when this
    process put it there itself), else exclusively, so that a file that appeared meanwhile stays."""
    key, ident, created = _key(s.path), _identity(s.tmp), not os.path.lexists(s.path)
    if s.replace or (key in _ours and _ours[key] == _identity(s.path)):
        os.replace(s.tmp, s.path)
    else:
        _rename_exclusive(s.tmp, s.path)
        created = True
    s.done, s.created = ident, created
    _ours[key] = ident


def _rename_exclusive(tmp: str, path: Path) -> None:
    """``tmp`` becomes ``path`` only if nothing has that name: a hard link fails atomically (EEXIST) when a
    file appeared there; where hard links are not supported, ``_rename_via_placeholder``."""
    try:
        try:
            os.link(tmp, path)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            _rename_via_placeholder(tmp, path)
            return
    except FileExistsError:
        raise _Appeared(errno.EEXIST, "a file of that name appeared while this run was writing") from None
    remove_quietly(tmp)


def _rename_via_placeholder(tmp: str, path: Path) -> None:
    """Without hard links (FAT, some network shares): an empty placeholder, created exclusively, takes the
    name, then the file replaces it. Killed between the two, the placeholder stays: an empty file, which
    nothing reads as a result."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(path)
        raise


def _undo(staged: List[_Staged], made: List[Path]) -> List[str]:
    """Undo a failed unit, newest first: put back what its renames replaced (from the backups; a single file
    has none, its rename being the last step: a file it replaced stays replaced), remove what they created,
    then the temporary files and the folders it made. Returns what could not be put back."""
    problems = []
    for s in reversed(staged):
        try:
            if s.done and s.backup:
                os.replace(s.backup, s.path)
                s.backup = None
            elif s.done and s.created and _identity(s.path) == s.done:
                os.remove(s.path)
        except OSError as exc:
            problems.append(f"{s.path} could not be put back ({exc.strerror or exc}; the previous file is {s.backup})")
            s.backup = None  # keep it: it is the only copy
        for name in (s.tmp, s.backup):
            if name:
                remove_quietly(name)
    for folder in reversed(made):
        try:
            os.rmdir(folder)
        except OSError:
            pass
    return problems


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


def _disk_full(error: BaseException) -> bool:
    exc: Optional[BaseException] = error
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _failure(path: Path, exc: BaseException, unit: Sequence[Path] = (), problems: Sequence[str] = ()) -> str:
    """One line: which file, why, how much space is left when that is the likely cause, and that every
    output of the unit is as it was."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # a failed unit removes the folders it made
        folder = folder.parent
    free, space = free_bytes(folder), ""
    if isinstance(exc, _Appeared):
        reason, kept = exc.strerror, "nothing was replaced"
    else:
        if _disk_full(exc) or (free is not None and free < (64 << 10)):
            reason = "no space left on the disk"  # some writers (ITK, torch) report it only as a failed flush
        elif isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror[:1].lower() + exc.strerror[1:]
        else:
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            reason = (lines[-1] if lines else type(exc).__name__)[:200]
        space = f" ({free // 1024} KB free there)" if free is not None and free < (1 << 20) else ""
        kept = "the existing file is unchanged" if path.exists() else "nothing was written there"
        if len(unit) > 1:
            kept = f"no output was changed ({', '.join(p.name for p in unit)} are as before)"
    return f"could not write {path}: {reason}{space}; {kept}" + "".join(f"; but {p}" for p in problems)
