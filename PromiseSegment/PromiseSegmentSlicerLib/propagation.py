"""Helpers of ``SceneLogic.propagate``: the prompts for the next slice and the rule that notices the
object has ended (a box-prompted model always finds *something* in its box). Pure numpy on arrays."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from PromiseSegmentLib.data.preprocessing import mask_bbox, take_slice
from PromiseSegmentLib.data.prompts import Prompts
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


def propagation_prompts(model, previous: np.ndarray, negativeMask: Optional[np.ndarray], ax: int,
                        index: int) -> Prompts:
    """``model``: a ``ProMISeModel``. The previous slice's box (+3 px on box-only backbones, as their reference
    does; else +1) and, on
    backbones that take points, up to 3 negative points from ``negativeMask`` on this slice."""
    box_only = model.backbone.spec.box_only
    pts = labels = None
    if negativeMask is not None and not box_only:
        neg = np.argwhere(take_slice(negativeMask, ax, index) > 0)
        if len(neg):
            pick = neg[np.random.default_rng(index).choice(len(neg), min(3, len(neg)), replace=False)]
            pts, labels = pick[:, ::-1].astype(float), np.zeros(len(pick), int)
    return Prompts(pts, labels, mask_bbox(previous, propagation_margin(box_only)))
