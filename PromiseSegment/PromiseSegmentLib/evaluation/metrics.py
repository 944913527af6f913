"""Segmentation metrics on binary masks: Dice, IoU, HD95 (in pixels/mm given spacing).

Empty masks are valid (an empty ground truth: a slice or image without the structure), with one convention
everywhere (``evaluation`` states it in the CSV too):
- Dice and IoU: 1.0 when prediction and truth are both empty (nothing to find, nothing found), 0.0 when
  exactly one of them is;
- HD95: NaN when both are empty (no surface on either side: undefined), inf when exactly one is. Summaries
  take the median over the finite values and count the others.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient; two empty masks agree perfectly (1.0), an empty and a non-empty one not at all (0.0)."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, t).sum() / denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union; the empty-mask convention of ``dice``."""
    p, t = pred.astype(bool), truth.astype(bool)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Optional[Sequence[float]] = None) -> float:
    """95th percentile symmetric surface distance: NaN when both are empty (undefined), inf when exactly one
    is (see the module's convention)."""
    from scipy import ndimage

    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return math.nan
    if not p.any() or not t.any():
        return math.inf
    spacing = spacing or [1.0] * p.ndim
    sp, st = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(np.percentile(np.concatenate([dist_to_t[sp], dist_to_p[st]]), 95))
