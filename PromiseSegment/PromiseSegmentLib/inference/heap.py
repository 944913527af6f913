"""How the C heap keeps freed memory between slices (glibc's malloc, i.e. Linux; elsewhere nothing is done).

PyTorch's CPU tensors come straight from ``malloc``. Every slice allocates and frees about 100 MB of
activations; glibc gives the freed top of its heap back to the kernel once it exceeds its trim threshold
(by default twice an adaptive mmap threshold, so at most 64 MB), and the next slice touches those pages
again: 27,000-52,000 page faults per 512x512 slice, each zero-filling 4 KB. Measured on the 2-core AMD
EPYC (bf16 engine, automatic mode, 12-slice volume, ms per slice in three runs, fresh processes):

| trim / mmap threshold | page faults per slice | ms per slice | peak RSS |
|---|---|---|---|
| glibc's defaults (alternating with the next row) | 27,100-27,200 | 255, 266, 281 | 1023-1033 MB |
| **128 MB / 32 MB** | **0** | **231, 228, 242** | 1022-1029 MB |
| 64 MB / 32 MB (another series: defaults 298 there) | 28,900 | 267 | 1042 MB |

So: blocks under 32 MB come from the heap, and up to 128 MB of freed heap stays with the process for the
next slice (its RSS after a run can stay up to that much higher). ``PROMISE_SEGMENT_KEEP_FREED_MEMORY=0``
leaves malloc as it is, and a user's own ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_`` or
``GLIBC_TUNABLES`` wins (beware: setting either threshold alone switches glibc's adaptive thresholds
off, and a small trim threshold alone makes every slice fault its buffers in again). Unlike OpenMP's settings
this can change at any time, so the engine applies it when it is created (``InferenceEngine``), in Slicer as
on the command line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Mapping, Optional

TRIM_THRESHOLD = 128 << 20
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold: blocks above it are mmapped either way
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
OPT_OUT = "PROMISE_SEGMENT_KEEP_FREED_MEMORY"  # =0: leave malloc as it is
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")

_applied: Optional[str] = None


def keep_freed_memory(environ: Optional[Mapping[str, str]] = None) -> str:
    """Apply the thresholds above once per process; returns what this process runs with, in words."""
    global _applied
    if _applied is None:
        _applied = _apply(os.environ if environ is None else environ)
    return _applied


def _apply(env: Mapping[str, str]) -> str:
    if env.get(OPT_OUT, "").strip() == "0":
        return f"malloc's defaults ({OPT_OUT}=0)"
    chosen = [name for name in USER_SETTINGS if name in env and (name != "GLIBC_TUNABLES" or "malloc" in env[name])]
    if chosen:
        return f"malloc as set by {', '.join(chosen)}"
    libc = _glibc()
    if libc is None:
        return "the system's malloc"
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc malloc's defaults (mallopt refused)"
    return f"glibc malloc keeps up to {TRIM_THRESHOLD >> 20} MB of freed memory between slices"


def _glibc():
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``; musl and others do not)."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
