"""Propagation from an accepted slice to its neighbours, one after another: the prompts for the next slice
(the previous result's box) and the rule that notices the object has ended (a box-prompted model always
finds *something* in its box)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.data.preprocessing import take_slice
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.inference.volume_loop import propagation_margin


def intensity_band(image: np.ndarray, mask: np.ndarray) -> Tuple[float, float]:
    """2nd-98th percentile of the voxel values (mean over colour channels) inside ``mask``."""
    values = np.asarray(image, float)
    values = values.mean(axis=-1) if values.ndim == 3 else values
    return tuple(np.percentile(values[np.asarray(mask, bool)], [2, 98]))


def band_agreement(image: np.ndarray, mask: np.ndarray, band: Tuple[float, float]) -> float:
    """Fraction of ``mask`` whose values lie in ``band`` (0 for an empty mask)."""
    values = np.asarray(image, float)
    values = (values.mean(axis=-1) if values.ndim == 3 else values)[np.asarray(mask, bool)]
    return float(np.mean((values >= band[0]) & (values <= band[1]))) if values.size else 0.0


def propagation_prompts(
    model, previous: np.ndarray, negative_mask: Optional[np.ndarray], ax: int, index: int
) -> Prompts:
    """``model``: a ``ProMISeModel``. The previous slice's box (+3 px on box-only backbones, as their reference
    does; else +1) and, on backbones that take points, up to 3 negative points from ``negative_mask`` on this
    slice."""
    box_only = model.backbone.spec.box_only
    pts = labels = None
    if negative_mask is not None and not box_only:
        neg = np.argwhere(take_slice(negative_mask, ax, index) > 0)
        if len(neg):
            pick = neg[np.random.default_rng(index).choice(len(neg), min(3, len(neg)), replace=False)]
            pts, labels = pick[:, ::-1].astype(float), np.zeros(len(pick), int)
    return Prompts(pts, labels, mask_box(previous, propagation_margin(box_only)))


@dataclass(frozen=True)
class PropagationLimits:
    """Where propagation stops: ``direction`` +1/-1 (or 0: both ways), at most ``max_slices`` each way, and
    where the object has ended - area below ``min_area_fraction`` of the previous slice's, or fewer than
    ``min_intensity_agreement`` of its pixels inside the accepted object's intensity band."""

    direction: int = 0
    max_slices: Optional[int] = None
    min_area_fraction: float = 0.1
    min_intensity_agreement: float = 0.5


def check_start_mask(start_mask: np.ndarray) -> None:
    """Refuse an empty accepted slice (callers check before loading a model)."""
    if not np.any(start_mask):
        raise InputError("the accepted slice is empty; nothing to propagate")


def propagate(
    model,
    volume: np.ndarray,
    ijk_to_ras: np.ndarray,
    ax: int,
    start: int,
    start_mask: np.ndarray,
    value_range: Tuple[float, float],
    limits: PropagationLimits = PropagationLimits(),
    negative_mask: Optional[np.ndarray] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelFn] = None,
) -> Dict[int, np.ndarray]:
    """Segment the neighbours of slice ``start`` (whose accepted mask is ``start_mask``) one after another with
    ``model`` (a ``ProMISeModel``), each prompted by the previous result (``propagation_prompts``; SAM ViT
    also with the previous mask as mask prompt), until ``limits`` say the object has ended. Returns
    {slice index: mask}."""
    check_start_mask(start_mask)
    n = volume.shape[ax]
    steps = (1, -1) if limits.direction == 0 else (int(np.sign(limits.direction)),)
    reach = limits.max_slices or n
    total = sum(min(reach, (n - 1 - start) if d > 0 else start) for d in steps)
    box_only = model.backbone.spec.box_only
    band = intensity_band(take_slice(volume, ax, start), start_mask)
    results: Dict[int, np.ndarray] = {}
    for d in steps:
        index, previous = start + d, np.asarray(start_mask).astype(bool)
        while 0 <= index < n and abs(index - start) <= reach:
            if cancel is not None and cancel():
                raise Cancelled()
            prompts = propagation_prompts(model, previous, negative_mask, ax, index)
            mask = model.segment_slice(
                volume, ijk_to_ras, ax, index, prompts, None if box_only else previous, "auto", value_range
            ).masks[0]  # auto with a box: IPS when there is an adapter
            if progress:
                progress(len(results) + 1, total)
            if _object_ended(mask, previous, take_slice(volume, ax, index), band, limits):
                break
            results[index] = previous = mask.astype(bool)
            index += d
    return results


def _object_ended(mask, previous, image, band, limits: PropagationLimits) -> bool:
    return (
        not mask.any()
        or mask.sum() < limits.min_area_fraction * previous.sum()
        or band_agreement(image, mask, band) < limits.min_intensity_agreement
    )
