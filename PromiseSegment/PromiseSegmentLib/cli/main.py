"""``promise-segment`` command line: segment, train, evaluate, demo, checkpoints.

Failure behaviour (README, "Failure behaviour"): arguments, inputs and outputs are checked before any
model is loaded (``validation``); a user's mistake is one line on stderr and exit status 2, an
interruption exit status 130 with a line saying which complete files were kept, an internal error one
line and status 1 (``--verbose`` shows the traceback). Every file is written atomically (``paths``).
This module imports no torch: argument errors come back in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from PromiseSegmentLib import __version__
from PromiseSegmentLib.cli.arguments import (
    PROG,
    progress_interval,
)
from PromiseSegmentLib.cli.checkpoints import add_checkpoints_command
from PromiseSegmentLib.cli.demo import add_demo_command
from PromiseSegmentLib.cli.evaluate import add_evaluate_command
from PromiseSegmentLib.cli.segment import add_segment_command
from PromiseSegmentLib.cli.train import add_train_command
from PromiseSegmentLib.cli.validation import validate
from PromiseSegmentLib.errors import Cancelled, PromiseError
from PromiseSegmentLib.inference.openmp import set_default_waiting
from PromiseSegmentLib.paths import cache_dir

# The project's own errors, and the operating system's file errors (a missing, unreadable or full path);
# anything else is a bug, reported as an internal error (exit 1), never as the user's mistake.
USER_ERRORS = (PromiseError, OSError)


# ------------------------------------------------------------------------------------------ arguments
class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other error, and a
    value starting with a minus sign and a digit (``--point -3,16,1``) is a value, never an option."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


# ------------------------------------------------------------------------------------------- segment


# ---------------------------------------------------------------------------------------- checkpoints


# ------------------------------------------------------------------------------------------- progress
# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in (
        add_segment_command,
        add_checkpoints_command,
        add_demo_command,
        add_train_command,
        add_evaluate_command,
    ):
        add_command(sub)
    return parser


# ------------------------------------------------------------------------------------------------ main
class _StderrHandler(logging.Handler):
    """Library warnings as ``promise-segment: warning: ...`` lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: {record.levelname.lower()}: {one_line(record.getMessage())}", file=sys.stderr)


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger("PromiseSegmentLib")  # every sub-package logs below it
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)


def one_line(message: object, limit: int = 600) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stats(paths: List[Path]) -> Dict[str, tuple]:
    """(inode, size, mtime) of the files at ``paths`` (a folder: of the files in it), to see what a run wrote."""
    found = {}
    for p in paths:
        for f in sorted(p.iterdir()) if p.is_dir() else [p]:
            try:
                st = f.stat()
                found[str(f)] = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                pass
    return found


def _cancelled_message(outputs: List[Path], before: Dict[str, tuple], resumable: bool) -> str:
    """Which complete files the interrupted run wrote; ``--resume`` is named only where the command has it."""
    kept = [p for p, s in _stats(outputs).items() if before.get(p) != s]
    if not kept:
        return f"{PROG}: cancelled; no output was written"
    resume = " (continue with --resume)" if resumable and any(p.endswith(".state.pt") for p in kept) else ""
    return f"{PROG}: cancelled; complete files written before the interruption: {', '.join(kept)}{resume}"


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (kill, a scheduler) cleans up like Ctrl+C: no temporary file is left behind."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    validate(args)
    before = _stats(args.outputs)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Cancelled):
        print(_cancelled_message(args.outputs, before, args.command == "train"), file=sys.stderr)
        return 130


class _StdoutUntilClosed:
    """``promise-segment ... | head -1``: once the reader has gone, further report lines are dropped
    instead of failing a run whose files are being written (its exit status is what counts)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self):
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())  # the interpreter's own final flush then succeeds
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _drop_output_once_stdout_closes() -> None:
    if not isinstance(sys.stdout, _StdoutUntilClosed):
        sys.stdout = _StdoutUntilClosed(sys.stdout)


def main(argv: Optional[Sequence[str]] = None) -> int:
    set_default_waiting()  # idle OpenMP threads spin briefly, then sleep (openmp.py); before torch is imported
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    _drop_output_once_stdout_closes()
    with _sigterm_as_interrupt():
        try:
            progress_interval()  # bad environment variables: refused now, not after the model load
            cache_dir()
            return _run(args)
        except (KeyboardInterrupt, Cancelled):
            print(f"{PROG}: cancelled; no output was written", file=sys.stderr)
            return 130
        except USER_ERRORS as exc:
            if args.verbose:
                raise
            print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        except Exception as exc:  # a bug: still one line, the traceback with --verbose
            if args.verbose:
                raise
            print(
                f"{PROG}: internal error: {type(exc).__name__}: {one_line(exc)} (run with --verbose for the "
                f"traceback, and please report it)",
                file=sys.stderr,
            )
            return 1


if __name__ == "__main__":
    sys.exit(main())
