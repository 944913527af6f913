"""Encoded training images on disk, so that training memory does not grow with the data.

Each encoded version of an image is a fixed-size record in a few flat files (the image embedding, the APM's
prepared taps, the decoder-frame target), written once and read back with ``os.pread`` into fresh buffers:
nothing is memory-mapped, so the records read in an epoch are the page cache's, never the process's
resident memory. A store folder is marked as ours (``MARKER``, holding the key of what it caches); a folder
without that marker is never emptied, and one with another key is emptied before it is reused. Records
finished by an interrupted run are reused by the next run with the same key (``--resume``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from PromiseSegmentLib.atomic_write import write_bytes_atomically
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.paths import free_bytes

MARKER = "promise-feature-cache.json"
DONE = "done.npy"


@dataclass(frozen=True)
class RecordLayout:
    """The shapes of one record: the embedding and each prepared tap (fp16), the decoder-frame target (bool),
    the mask's box in the input frame (NaN when empty) and the image's input and original sizes."""

    features: Tuple[int, ...]
    taps: Tuple[Tuple[int, ...], ...]
    target: Tuple[int, ...]

    def parts(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        named: Dict[str, Tuple[Tuple[int, ...], np.dtype]] = {"features": (self.features, np.dtype(np.float16))}
        named.update({f"tap{k}": (shape, np.dtype(np.float16)) for k, shape in enumerate(self.taps)})
        named["target"] = (self.target, np.dtype(np.bool_))
        named["box"] = ((4,), np.dtype(np.float32))
        named["sizes"] = ((4,), np.dtype(np.int32))
        return named

    def bytes_per_record(self) -> int:
        return sum(int(np.prod(shape)) * dt.itemsize for shape, dt in self.parts().values())


class FeatureStore:
    """``count`` records of ``layout`` in ``folder``; ``put(i, arrays)`` once, ``get(i, names)`` any time."""

    def __init__(self, folder: Path, key: str, count: int, layout: RecordLayout):
        self.folder, self.key, self.count, self.layout = Path(folder), key, count, layout
        self.parts = layout.parts()
        self._claim()
        self.done = self._read_done()
        self._fds = {name: os.open(self.folder / f"{name}.bin", os.O_RDWR | os.O_CREAT, 0o600) for name in self.parts}
        for name, fd in self._fds.items():  # full length at once (sparse: no disk used until written)
            length = count * _record_bytes(*self.parts[name])
            if os.fstat(fd).st_size < length:
                os.ftruncate(fd, length)
        self._since_saved = 0

    # ---------------------------------------------------------------------------------- the folder
    def _claim(self) -> None:
        """Make ``folder`` this store's: create it, or reuse a store with this key, or empty a store of
        another key; refuse a folder holding anything else."""
        marker = self.folder / MARKER
        if self.folder.exists() and not self.folder.is_dir():
            raise InputError(f"feature cache {self.folder} is a file, not a folder")
        if self.folder.is_dir() and any(self.folder.iterdir()) and not marker.is_file():
            raise InputError(
                f"feature cache {self.folder} holds other files: give an empty folder (or one a previous "
                f"training run made)"
            )
        if marker.is_file() and _marker_key(marker) == (self.key, self.count):
            return
        if marker.is_file():
            remove_store(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        layout = {"features": self.layout.features, "taps": self.layout.taps, "target": self.layout.target}
        meta = {"key": self.key, "count": self.count, "layout": layout}
        write_bytes_atomically(marker, json.dumps(meta).encode(), overwrite=True)

    def _read_done(self) -> np.ndarray:
        """The records a previous run completed, when its files still hold them all; else none."""
        none = np.zeros(self.count, bool)
        try:
            done = np.load(self.folder / DONE)
        except (OSError, ValueError):
            return none
        if done.shape != (self.count,) or done.dtype != np.bool_:
            return none
        for name, (shape, dt) in self.parts.items():
            path = self.folder / f"{name}.bin"
            if not path.is_file() or path.stat().st_size < self.count * _record_bytes(shape, dt):
                return none
        return done

    def check_space(self) -> None:
        """Refuse to start when the disk cannot hold the records still to write."""
        needed = int((~self.done).sum()) * self.layout.bytes_per_record()
        free = free_bytes(self.folder)
        if free is not None and needed > free * 0.95:
            raise InputError(
                f"the feature cache needs {needed / 2**30:.1f} GB in {self.folder} but {free / 2**30:.1f} GB are "
                f"free: use fewer --augmented-copies, or --feature-cache on a larger disk"
            )

    # ---------------------------------------------------------------------------------- records
    def put(self, i: int, arrays: Dict[str, np.ndarray]) -> None:
        for name, (shape, dt) in self.parts.items():
            data = np.ascontiguousarray(arrays[name], dtype=dt)
            if data.shape != tuple(shape):
                raise ValueError(f"record part {name}: shape {data.shape}, expected {tuple(shape)}")
            os.pwrite(self._fds[name], data.tobytes(), i * data.nbytes)
        self.done[i] = True
        self._since_saved += 1
        if self._since_saved >= 64:
            self.save_progress()

    def get(self, i: int, names: Sequence[str]) -> Dict[str, np.ndarray]:
        if not self.done[i]:
            raise KeyError(f"record {i} was never written")
        out = {}
        for name in names:
            shape, dt = self.parts[name]
            size = _record_bytes(shape, dt)
            raw = os.pread(self._fds[name], size, i * size)
            if len(raw) != size:
                raise OSError(f"feature cache {self.folder}: record {i} of {name} is truncated")
            out[name] = np.frombuffer(raw, dt).reshape(shape)
        return out

    def sizes(self, i: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        """(input size, original size) of record ``i``."""
        h, w, oh, ow = (int(v) for v in self.get(i, ["sizes"])["sizes"])
        return (h, w), (oh, ow)

    def save_progress(self) -> None:
        """Which records are complete (after their bytes are on disk), for a later run to reuse."""
        for fd in self._fds.values():
            os.fsync(fd)
        write_bytes_atomically(self.folder / DONE, _npy_bytes(self.done), overwrite=True)
        self._since_saved = 0

    def tap_names(self) -> List[str]:
        return [f"tap{k}" for k in range(len(self.layout.taps))]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def existing_layout(folder: Path, key: str, count: int) -> Optional[RecordLayout]:
    """The record layout of the store in ``folder`` when it holds ``key`` (a run to continue), else None."""
    marker = Path(folder) / MARKER
    if not marker.is_file() or _marker_key(marker) != (key, count):
        return None
    try:
        lay = json.loads(marker.read_text())["layout"]
        return RecordLayout(tuple(lay["features"]), tuple(tuple(t) for t in lay["taps"]), tuple(lay["target"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_store(folder: Path) -> None:
    """Delete a store folder, only if it is one (it holds ``MARKER``)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        shutil.rmtree(folder, ignore_errors=True)


def store_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.bin")) if Path(folder).is_dir() else 0


def _marker_key(marker: Path) -> Optional[Tuple[str, int]]:
    try:
        meta = json.loads(marker.read_text())
        return str(meta["key"]), int(meta["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_bytes(shape, dt: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dt).itemsize


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
