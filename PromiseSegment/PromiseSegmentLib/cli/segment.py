"""The ``segment`` command: one volume (or picture) with prompts or an adapter -> a segmentation file; many
inputs (``--out-dir``, ``--manifest``) are a cohort (``cli.cohort``)."""

from __future__ import annotations

import sys
from typing import Optional

import numpy as np

from PromiseSegmentLib.cli.arg_types import AXIS_CHOICES, axis_arg, box_arg, name_arg, point_arg, slices_arg
from PromiseSegmentLib.cli.arguments import (
    PROG,
    add_backbone_args,
    add_intensity_args,
    announce,
    engine_options,
    intensity_from_args,
    progress_bar,
)
from PromiseSegmentLib.cli.cohort import add_cohort_args, cmd_cohort
from PromiseSegmentLib.cli.validation import check_segment_volume, preflight
from PromiseSegmentLib.data.preprocessing import IntensityRule, take_slice, to_uint8_rgb
from PromiseSegmentLib.data.prompts import box_clip_notes, ijk_prompts
from PromiseSegmentLib.data.volume_io import Segment, overlay_rgb, read_volume, save_png, write_segmentation
from PromiseSegmentLib.names import MODES


def best_slice_overlay(
    volume: np.ndarray, mask: np.ndarray, axis: int, rule: IntensityRule, truth: Optional[np.ndarray] = None
) -> np.ndarray:
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
    if args.cohort:
        return cmd_cohort(args)
    vol = read_volume(args.input)
    axis = check_segment_volume(args, vol.array.shape, vol.ijk_to_ras)
    preflight(args.device, args.mode, args.adapter_meta, args.backbone, bool(args.point), bool(args.box))
    adapter_rule = args.adapter_meta.intensity if args.adapter_meta else None
    intensity_from_args(args, adapter_rule).value_range(vol.array)  # a rule that cannot fit: refused now
    for note in box_clip_notes(args.box or [], vol.array.shape):
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    from PromiseSegmentLib.model.promise import load_model

    model = load_model(
        args.backbone, args.adapter, args.device, allow_mismatch=args.allow_backbone_mismatch, **engine_options(args)
    )
    announce(model.engine)
    prompts = ijk_prompts(axis, args.point or [], args.box or [], vol.array.shape)
    rule = intensity_from_args(args, model.intensity)
    with progress_bar("segmenting", "slice") as progress:
        mask = model.segment_volume(
            vol.array,
            vol.ijk_to_ras,
            axis=axis,
            slice_range=args.slices,
            prompts=prompts,
            intensity=rule,
            mode=args.mode,
            progress=progress,
        )
    name = args.name or model.target_name
    out = write_segmentation(args.output, mask, vol.ijk_to_ras, [Segment(name, model.target_color)], args.overwrite)
    print(
        f"wrote {out}: {int(mask.sum())} voxels in '{name}' on {slices_with_foreground(mask, axis)} slices "
        f"along {'KJI'[axis]}",
        flush=True,
    )
    if args.overlay:
        print(f"wrote {save_png(args.overlay, best_slice_overlay(vol.array, mask, axis, rule))}")
    return 0


def add_segment_command(sub) -> None:
    p = sub.add_parser("segment", help="segment a volume/image file (or a cohort of them) into .seg.nrrd files")
    p.add_argument(
        "input",
        nargs="*",
        help="NRRD, NIfTI, a DICOM folder, PNG or JPEG; several, folders or glob patterns with --out-dir (a cohort)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="output segmentation of one input: .seg.nrrd (or .nrrd, .nii, .nii.gz label map; .png for one slice)",
    )
    add_cohort_args(p)
    add_backbone_args(p)
    p.add_argument("--adapter", help="ProMISe adapter file (.safetensors) for automatic prompts / IPS")
    p.add_argument(
        "--allow-backbone-mismatch",
        action="store_true",
        help="use an adapter with a SAM checkpoint other than the one it was trained on (warns)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="auto",
        help="auto: APM+IPS without prompts, IPS (+APM) with prompts, vanilla without adapter",
    )
    p.add_argument("--axis", default="K", type=axis_arg, help=f"slicing axis: {AXIS_CHOICES} (default K)")
    p.add_argument(
        "--slices", type=slices_arg, metavar="FIRST:LAST", help="inclusive slice range along the axis, e.g. 10:20"
    )
    p.add_argument(
        "--point",
        action="append",
        type=point_arg,
        metavar="I,J,K[,LABEL]",
        help="prompt point in voxel indices inside the volume; label 1 (default) positive, 0 negative; repeatable",
    )
    p.add_argument(
        "--box",
        action="append",
        type=box_arg,
        metavar="I0,J0,K0,I1,J1,K1",
        help="box prompt given by two opposite voxel corners (with an area in the slice plane); "
        "applies to each slice it spans",
    )
    add_intensity_args(p)
    p.add_argument("--name", type=name_arg, help="segment name (default: the adapter's target, else 'Segment')")
    p.add_argument("--overlay", metavar="PNG", help="also write a PNG overlay of the slice with the most foreground")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (-o, --overlay)")
    p.set_defaults(func=cmd_segment)
