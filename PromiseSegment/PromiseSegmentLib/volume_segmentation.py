"""Segment a volume slice by slice, streaming: only ``engine.batch_size`` slices are in flight."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from .engine import Cancelled, ImageEmbedding, Prediction, Prompts, SamEngine
from .preprocessing import (IntensityRule, InputError, check_volume, is_rgb, resolve_axis, slice_geometry,
                            take_slice, put_slice, to_uint8_rgb)

SlicePredictor = Callable[[SamEngine, ImageEmbedding, Prompts, Tuple[int, int]], Prediction]


def vanilla_predict(engine: SamEngine, emb: ImageEmbedding, prompts: Prompts,
                    output_size: Tuple[int, int]) -> Prediction:
    """Plain SAM: a single click is ambiguous, so take the best of 3 masks; otherwise one mask."""
    if prompts.empty:
        raise InputError("vanilla SAM needs prompts (points or a box) on every slice it segments; "
                         "use an adapter for automatic prompts")
    single_click = prompts.box is None and prompts.points is not None and len(prompts.points) == 1
    pred = engine.predict(emb, prompts, multimask_output=single_click, output_size=output_size)
    b = pred.best()
    return Prediction(pred.masks[b:b + 1], pred.logits[b:b + 1], pred.iou[b:b + 1], pred.low_res[b:b + 1],
                      pred.points, pred.labels)


def _to_square_prompts(geom, prompts: Prompts) -> Prompts:
    if geom.is_identity:
        return prompts
    return Prompts(points=None if prompts.points is None else geom.points_to_square(prompts.points),
                   labels=prompts.labels,
                   box=None if prompts.box is None else geom.box_to_square(prompts.box),
                   mask_logits=prompts.mask_logits)


def slice_indices(n: int, slice_range: Optional[Tuple[int, int]]) -> range:
    """Inclusive (first, last) range, clipped to the volume; None means all slices."""
    if slice_range is None:
        return range(n)
    first, last = slice_range
    if first < 0 or last >= n or first > last:
        raise InputError(f"slice range {first}..{last} is outside 0..{n - 1}")
    return range(first, last + 1)


def segment_volume(engine: SamEngine, volume: np.ndarray, ijk_to_ras: np.ndarray,
                   axis: Union[int, str] = "K", slice_range: Optional[Tuple[int, int]] = None,
                   prompts: Optional[Dict[int, Prompts]] = None, intensity: Optional[IntensityRule] = None,
                   predictor: Optional[SlicePredictor] = None, automatic: bool = False,
                   progress: Optional[Callable[[int, int], None]] = None,
                   cancel: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Segment ``volume`` (KJI[×3]) slice by slice; returns a uint8 KJI mask on the volume's own grid.

    ``prompts`` maps slice index -> prompts in that slice's pixels (x = column, y = row). Without
    ``automatic`` only prompted slices are segmented; with it (an APM predictor) every slice in range.
    Raises ``Cancelled`` when ``cancel()`` turns true; nothing is returned then.
    """
    volume = check_volume(volume)
    ax = resolve_axis(axis, ijk_to_ras)
    predictor = predictor or vanilla_predict
    prompts = prompts or {}
    n = volume.shape[ax]
    todo = [s for s in slice_indices(n, slice_range) if automatic or s in prompts]
    if not todo:
        raise InputError("no slice to segment: give prompts on at least one slice in range, or use an adapter")
    vr = (0.0, 255.0) if is_rgb(volume) else (intensity or IntensityRule()).value_range(volume)
    out = np.zeros(volume.shape[:3], np.uint8)
    done = 0
    for start in range(0, len(todo), engine.batch_size):
        if cancel is not None and cancel():
            raise Cancelled()
        batch = todo[start:start + engine.batch_size]
        natives = [take_slice(volume, ax, s) for s in batch]
        geoms = [slice_geometry(ijk_to_ras, ax, nat.shape) for nat in natives]
        images = [g.image_to_square(to_uint8_rgb(nat, vr)) for g, nat in zip(geoms, natives)]
        for s, g, emb in zip(batch, geoms, engine.encode(images, cancel=cancel)):
            pred = predictor(engine, emb, _to_square_prompts(g, prompts.get(s, Prompts())), g.native_shape)
            put_slice(out, ax, s, pred.masks[0].astype(np.uint8))
            done += 1
            if progress:
                progress(done, len(todo))
    return out
