"""Checkpoint files: verified download into a per-user cache, verification, and safe loading.

Downloads stream into a temporary file next to the destination, are hashed on the fly and only
moved into place (atomically) once the SHA-256 matches, so the cache never holds a partial file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.errors import Cancelled, CheckpointError
from PromiseSegmentLib.paths import CACHE_ENV, cache_dir, hold_for_tests, make_temp

if TYPE_CHECKING:  # torch is imported where weights are loaded: the command line checks arguments first
    import torch


@dataclass(frozen=True)
class CheckpointInfo:
    """A weights file a backbone is loaded from: where to get it and how to verify it."""

    filename: str
    url: Optional[str]  # None: not downloadable (user-supplied, or shipped inside a package)
    sha256: Optional[str]  # None: user-supplied, recorded on first load
    size: Optional[int] = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint, memoised in the cache by (path, size, mtime) to avoid rehashing GBs."""
    path = Path(path).resolve()
    st = path.stat()
    known = _known_hashes().get(f"{path}|{st.st_size}|{st.st_mtime_ns}")
    if known:
        return known
    digest = sha256_file(path)
    _remember_hash(path, digest)
    return digest


def _known_hashes() -> Dict[str, str]:
    try:
        return json.loads((cache_dir() / "known_hashes.json").read_text())
    except (OSError, ValueError):
        return {}


def _remember_hash(path: Path, digest: str) -> None:
    """Record a file's SHA-256 by (path, size, mtime), so it is not hashed again."""
    path = Path(path).resolve()
    st = path.stat()
    index = _known_hashes()
    index[f"{path}|{st.st_size}|{st.st_mtime_ns}"] = digest
    try:
        _atomic_write_text(cache_dir() / "known_hashes.json", json.dumps(index, indent=1))
    except OSError:
        pass  # memoisation is an optimisation; a read-only cache must not break loading


def _atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    write_atomically(path, write)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def download_file(
    url: str,
    dest: Path,
    sha256: Optional[str],
    progress: Optional[ProgressFn] = None,
    timeout: float = 60.0,
    cancel: Optional[CancelFn] = None,
) -> Path:
    """Stream ``url`` to ``dest`` verifying ``sha256``; nothing is left at ``dest`` unless it verified.
    ``cancel()`` is polled between blocks (raises ``Cancelled``, the partial file is removed)."""
    dest = Path(dest)
    tmp = make_temp(dest, ".part")  # hidden; one left by a killed download is removed by the next one
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            done, total = _stream(url, out, h, dest, progress, timeout, cancel)
        if total is not None and done != total:
            raise CheckpointError(f"Download of {url} was interrupted: got {done} of {total} bytes; run it again.")
        digest = h.hexdigest()
        if sha256 and digest != sha256:
            raise CheckpointError(
                f"Checksum mismatch for {url}: expected SHA-256 {sha256}, got {digest}. "
                f"The file was discarded; run the command again or download it by hand."
            )
        os.chmod(tmp, 0o666 & ~_umask())
        hold_for_tests(dest)
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _remember_hash(dest, digest)
    return dest


def _stream(url: str, out, h, dest: Path, progress, timeout: float, cancel) -> tuple:
    """Copy the response into ``out`` (flushed to disk), hashing it; returns (bytes done, bytes announced)."""
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length else None
            while True:
                if cancel is not None and cancel():
                    raise Cancelled()
                block = resp.read(1 << 20)
                if not block:
                    break
                out.write(block)
                h.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"Disk full while downloading {url} to {dest}: nothing was kept; free "
                f"space or set {CACHE_ENV} to a folder on a larger disk."
            ) from exc
        raise CheckpointError(
            f"Could not download {url} ({exc}). Check the network, or download the file by hand "
            f"and pass its path (or put it in {dest.parent})."
        ) from exc
    except Cancelled:
        raise
    except Exception as exc:  # http.client.IncompleteRead and friends: the connection dropped
        raise CheckpointError(
            f"Download of {url} was interrupted after {done} bytes ({exc!r}); run the command again."
        ) from exc
    return done, total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_checkpoint(
    info: CheckpointInfo, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None
) -> Path:
    """Path of a registered checkpoint in the user cache, downloading and verifying it on first use."""
    dest = cache_dir() / info.filename
    if dest.exists():
        verify_file(dest, info)
        return dest
    if info.url is None:
        raise CheckpointError(f"{info.filename} is not downloadable: put it at {dest} or pass its path.")
    return download_file(info.url, dest, info.sha256, progress, cancel=cancel)


def verify_file(path: Path, info: CheckpointInfo) -> None:
    """Size, then SHA-256 (when known); a mismatch names the file and what was expected."""
    size = Path(path).stat().st_size
    if info.size is not None and size != info.size:
        raise CheckpointError(
            f"{path} has {size} bytes, expected {info.size} for {info.filename} "
            f"(truncated or wrong file); reinstall or re-download it."
        )
    if info.sha256 and file_sha256(path) != info.sha256:
        raise CheckpointError(
            f"{path} does not match the official SHA-256 of {info.filename} "
            f"({info.sha256}); delete it and run again to re-download."
        )


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A state dict from a weights file, never unpickling code (``weights_only=True``)."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"{path} is not a readable PyTorch weights file (truncated, corrupt, or holding "
            f"pickled objects, which are never loaded): {type(exc).__name__}: {first_line}. "
            f"Re-download it or pick the right file."
        ) from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):  # training checkpoints (e.g. MedSAM's) wrap the weights
            if key in obj and isinstance(obj[key], dict) and not any(k.startswith("image_encoder.") for k in obj):
                obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model state dict.")
    return obj
