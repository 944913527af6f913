"""Few annotated slices, the rest filled in: an adapter trained on the annotated slices of a volume against
the interpolation users have today, scored on the slices nobody annotated.

Slicer's "Fill between slices" is morphological contour interpolation; this build of SimpleITK lacks that
filter, so the comparison is shape-based interpolation (signed distance maps interpolated linearly between
consecutive annotated slices, thresholded at zero), the classic method that contour interpolation refines.
A third method refines the interpolation instead of replacing it: each filled slice's bounding box (grown
by 3 px, LiteMedSAM's training margin) prompts the frozen LiteMedSAM, which draws the edge in the image.
The same with each slice's ground-truth box is the ceiling of any box-prompted LiteMedSAM on these slices.
For each volume and each ratio 1-in-N, the label's slice range along the axis is annotated every N slices
(its last slice too); each method fills the range; Dice is over the unannotated slices of the range.

    .venv/bin/python Testing/benchmarks/sparse_annotation.py ../shared/data --volumes brain1:J brain2:I
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PromiseSegment"))
from PromiseSegmentLib.backbones.registry import load_backbone  # noqa: E402
from PromiseSegmentLib.data.datasets import volume_cases  # noqa: E402
from PromiseSegmentLib.data.preprocessing import IntensityRule, resolve_axis, take_slice  # noqa: E402
from PromiseSegmentLib.data.prompts import Prompts, mask_box  # noqa: E402
from PromiseSegmentLib.data.volume_io import read_labelmap, read_volume  # noqa: E402
from PromiseSegmentLib.evaluation.metrics import dice  # noqa: E402
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache  # noqa: E402
from PromiseSegmentLib.model.promise import ProMISeModel, engine_for  # noqa: E402
from PromiseSegmentLib.training.recipe import RunOptions, split_for_selection  # noqa: E402
from PromiseSegmentLib.training.run import run_training  # noqa: E402


def annotated_slices(truth: np.ndarray, ax: int, every: int) -> tuple:
    present = [s for s in range(truth.shape[ax]) if take_slice(truth, ax, s).any()]
    lo, hi = present[0], present[-1]
    return sorted(set(range(lo, hi + 1, every)) | {hi}), (lo, hi)


def signed_distance(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    if not mask.any():
        return -ndimage.distance_transform_edt(np.ones_like(mask)) - 1.0
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


def interpolate(truth: np.ndarray, ax: int, annotated) -> np.ndarray:
    """Shape-based interpolation between consecutive annotated slices (moved to axis 0 and back)."""
    t = np.moveaxis(truth, ax, 0).astype(bool)
    out = np.zeros_like(t)
    for a, b in zip(annotated, annotated[1:]):
        da, db = signed_distance(t[a]), signed_distance(t[b])
        for s in range(a, b + 1):
            w = (s - a) / max(1, b - a)
            out[s] = (1 - w) * da + w * db > 0
    return np.moveaxis(out, 0, ax)


def adapter_fill(backbone, vol, truth, ax, annotated, span, budget_min: float) -> np.ndarray:
    sparse = np.zeros_like(truth)
    for s in annotated:
        index = [slice(None)] * 3
        index[ax] = s
        sparse[tuple(index)] = truth[tuple(index)]
    rule = IntensityRule()
    cases = volume_cases("v", vol.array, sparse, vol.ijk_to_ras, rule, ax)  # unannotated slices: unknown
    train, select = split_for_selection(cases, None, 0) if len(cases) > 4 else (cases, cases[:1])
    engine = engine_for(backbone, None, "cpu")
    options = RunOptions(overrides={"intensity": rule.to_dict()}, time_budget_min=budget_min)
    result = run_training(engine, train, select, options, say=lambda text: None)
    model = ProMISeModel(engine_for(backbone, result.adapter, "cpu"), result.adapter)
    return model.segment_volume(vol.array, vol.ijk_to_ras, mode="apm+ips", axis=ax, slice_range=span) > 0


def box_refined_fill(model: ProMISeModel, vol, filled, ax, annotated, span) -> np.ndarray:
    """The frozen LiteMedSAM prompted on every unannotated slice with the box of ``filled``'s slice."""
    prompts = {}
    for s in range(span[0], span[1] + 1):
        box = None if s in annotated else mask_box(take_slice(filled, ax, s), margin=3)
        if box is not None:
            prompts[s] = Prompts(box=box)
    out = model.segment_volume(vol.array, vol.ijk_to_ras, mode="auto", axis=ax, prompts=prompts, box_propagation=False)
    out = out > 0
    for s in annotated:  # annotated slices keep their annotation (they are not scored)
        index = [slice(None)] * 3
        index[ax] = s
        out[tuple(index)] = filled[tuple(index)]
    return out


def unannotated_dice(pred, truth, ax, annotated, span) -> float:
    keep = [s for s in range(span[0], span[1] + 1) if s not in set(annotated)]
    return dice(np.take(pred, keep, axis=ax), np.take(truth, keep, axis=ax))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", help="the shared data folder (holding mr-volumes/)")
    ap.add_argument("--volumes", nargs="+", default=["brain1:J", "brain2:I"], help="NAME:AXIS")
    ap.add_argument("--ratios", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--budget", type=float, default=2.0, help="training minutes per adapter")
    ap.add_argument("--no-adapter", action="store_true", help="interpolation and its box refinement only")
    args = ap.parse_args()
    backbone = load_backbone("lite_medsam")
    frozen = ProMISeModel(engine_for(backbone, None, "cpu"), None)
    frozen.engine.cache = EmbeddingCache()  # both box columns prompt the same slices: each encoded once
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"CPU: {cpu}; LiteMedSAM frozen; adapter: auto recipe, {args.budget:g} min budget each")
    print(
        "| volume (axis) | annotated | unannotated slices | interpolation Dice | interpolation's box -> LiteMedSAM "
        "| ground-truth box -> LiteMedSAM | adapter Dice | training s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for item in args.volumes:
        name, axis = item.split(":")
        folder = Path(args.data) / "mr-volumes"
        vol = read_volume(folder / f"{name}_image.nrrd")
        truth = read_labelmap(folder / f"{name}_label.nrrd").array > 0
        ax = resolve_axis(axis, vol.ijk_to_ras)
        for every in args.ratios:
            annotated, span = annotated_slices(truth, ax, every)
            filled = interpolate(truth, ax, annotated)
            interp = unannotated_dice(filled, truth, ax, annotated, span)
            refined = box_refined_fill(frozen, vol, filled, ax, annotated, span)
            boxed = unannotated_dice(refined, truth, ax, annotated, span)
            ceiling = unannotated_dice(
                box_refined_fill(frozen, vol, truth, ax, annotated, span), truth, ax, annotated, span
            )
            ours, seconds = "-", "-"
            if not args.no_adapter:
                start = time.time()
                pred = adapter_fill(backbone, vol, truth, ax, annotated, span, args.budget)
                ours, seconds = (
                    f"{unannotated_dice(pred, truth, ax, annotated, span):.3f}",
                    f"{time.time() - start:.0f}",
                )
            n_un = span[1] - span[0] + 1 - len(annotated)
            print(
                f"| {name} ({axis}) | 1 in {every} ({len(annotated)}) | {n_un} | {interp:.3f} | {boxed:.3f} | "
                f"{ceiling:.3f} | {ours} | {seconds} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
