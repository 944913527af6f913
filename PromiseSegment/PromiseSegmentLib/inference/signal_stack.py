"""Keep the calling thread's alternate signal stack across calls into a native library.

OpenVINO's CPU plugin registers a small alternate signal stack on the thread that runs a compiled model
and frees it with that model; when the model is freed from another thread (the garbage collector, a
worker), the registration is left pointing at freed memory and the next signal on the first thread -
Ctrl+C, a scheduler's SIGTERM - kills the process with SIGSEGV instead of stopping it cleanly. Python's
signal handlers run on the alternate stack (SA_ONSTACK), so every thread that calls the plugin gets its
own registration back afterwards. Linux only (elsewhere this does nothing).
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator, Optional


class _StackT(ctypes.Structure):  # struct stack_t (sigaltstack(2)) on Linux
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def current() -> Optional[_StackT]:
    """This thread's alternate signal stack registration (None where it cannot be read)."""
    if _LIBC is None:
        return None
    found = _StackT()
    return found if _LIBC.sigaltstack(None, ctypes.byref(found)) == 0 else None


@contextmanager
def kept() -> Iterator[None]:
    """Run the block, then restore this thread's alternate signal stack as it was before it."""
    before = current()
    try:
        yield
    finally:
        if before is not None and _LIBC is not None:
            after = current()
            if after is None or (after.ss_sp, after.ss_flags, after.ss_size) != (
                before.ss_sp,
                before.ss_flags,
                before.ss_size,
            ):
                _LIBC.sigaltstack(ctypes.byref(before), None)
