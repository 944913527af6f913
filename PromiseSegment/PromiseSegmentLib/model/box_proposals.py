"""Several candidate boxes from the APM's box head for automatic mode, one of which is kept.

The head's box is the objectness-weighted mean of every cell's box: where the objectness map has more than
one peak (two polyps, or a polyp and a look-alike) that mean falls between them or on the wrong one. The
candidates are that global box and the box of each of the largest connected regions of high objectness
(their cells' boxes averaged with the same weights). Each is decoded, and the one with the best predicted
IoU plus its region's share of the objectness is kept (``forward.choose_proposal``). Whether an adapter
uses them is chosen on the selection images after training (``training.selection``).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
from scipy import ndimage

REGION_THRESHOLD = 0.1  # a region: connected cells whose weight is at least this share of the map's peak
MASS_WEIGHT = 0.5  # ranking: the decoder's predicted IoU + MASS_WEIGHT x the region's share of the weight
MAX_REGIONS = 8


def region_weights(weights: np.ndarray, n: int) -> np.ndarray:
    """(n, h, w): the weights of one image's ``n`` heaviest regions, each zero outside its region; a map
    with fewer regions repeats the full map (the global box) in the remaining rows."""
    labels, count = ndimage.label(weights >= REGION_THRESHOLD * weights.max())
    mass = ndimage.sum(weights, labels, index=np.arange(1, count + 1)) if count else np.zeros(0)
    order = np.argsort(-mass, kind="stable")[:n] + 1
    rows = [np.where(labels == k, weights, 0.0) for k in order]
    rows += [weights] * (n - len(rows))
    return np.stack(rows)


def box_proposals(cell_boxes: torch.Tensor, objectness: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``cell_boxes`` (B, 4, h, w) as fractions of the side, ``objectness`` (B, 1, h, w) logits ->
    (B, 1 + n, 4) boxes as fractions (x0, y0, x1, y1), the global box first, and (B, 1 + n) the share of
    the objectness weight behind each (1 for the global box)."""
    if not 1 <= n <= MAX_REGIONS:
        raise ValueError(f"box proposals: 1..{MAX_REGIONS} regions, got {n}")
    b, _, h, w = objectness.shape
    weights = torch.softmax(objectness.float().flatten(1), dim=1).view(b, h, w)
    regions = torch.from_numpy(np.stack([region_weights(m, n) for m in weights.cpu().numpy()])).to(weights)
    stacked = torch.cat([weights[:, None], regions], dim=1)  # (B, 1 + n, h, w)
    mass = stacked.flatten(2).sum(-1)
    share = stacked / mass.clamp_min(1e-12)[..., None, None]
    boxes = torch.einsum("bkhw,bchw->bkc", share, cell_boxes.float()).clamp(0, 1)
    return boxes, mass
