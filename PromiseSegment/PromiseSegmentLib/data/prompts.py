"""Prompts given as IJK voxel coordinates: the one rounding rule for every IJK coordinate.

A continuous IJK position (a click converted from RAS, a box corner) belongs to the voxel whose centre is
nearest, halves rounding up: ``floor(v + 0.5)``. numpy's ``round`` rounds halves to even, so a corner at
k = 12.5 would land on slice 12 in one place and 13 in another; every caller uses ``voxel_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from PromiseSegmentLib.data.preprocessing import IN_PLANE_AXES
from PromiseSegmentLib.errors import InputError


@dataclass
class Prompts:
    """Prompts for one image, in its pixel coordinates: points (N, 2) as (x, y), labels (N,) 1/0,
    box (4,) as x0, y0, x1, y1, and ``mask_logits`` (1, 256, 256) from an earlier prediction."""

    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask_logits: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.points is not None:
            self.points = np.asarray(self.points, float).reshape(-1, 2)
            self.labels = (
                np.ones(len(self.points), int) if self.labels is None else np.asarray(self.labels, int).reshape(-1)
            )
            if len(self.labels) != len(self.points):
                raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        if self.box is not None:
            self.box = np.asarray(self.box, float).reshape(4)
            if not np.all(np.isfinite(self.box)) or self.box[2] <= self.box[0] or self.box[3] <= self.box[1]:
                raise InputError(
                    f"a box is x0, y0, x1, y1 with finite numbers, x0 < x1 and y0 < y1; got {self.box.tolist()}"
                )
        if self.points is not None and not np.all(np.isfinite(self.points)):
            raise InputError(f"point coordinates must be finite numbers; got {self.points.tolist()}")

    @property
    def empty(self) -> bool:
        return self.points is None and self.box is None and self.mask_logits is None


def voxel_index(value: float) -> int:
    """Index of the voxel containing the continuous IJK coordinate ``value``."""
    return int(np.floor(float(value) + 0.5))


def voxel(ijk: Sequence[float]) -> Tuple[int, int, int]:
    """(i, j, k) of the voxel containing a continuous IJK position."""
    return voxel_index(ijk[0]), voxel_index(ijk[1]), voxel_index(ijk[2])


def check_ijk_prompts(
    points: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]], shape: Sequence[int], axis: int
) -> List[str]:
    """Refuse, with one sentence, prompts no model could use: coordinates that are not finite numbers,
    labels other than 0/1, voxels outside a KJI volume of ``shape``, boxes with no area in the slice
    plane of KJI ``axis``, two boxes on one slice (a slice takes one box). Called before any model is
    loaded; returns notes for boxes that will be clipped to the volume."""
    from PromiseSegmentLib.errors import InputError

    size = np.array(shape[:3][::-1])  # I, J, K extents
    extent = "x".join(str(int(v)) for v in size)
    for p in points:
        if len(p) not in (3, 4):
            raise InputError(f"a point is i,j,k or i,j,k,label; got {_text(p)}")
        ijk = _finite(p[:3], "point")
        if len(p) == 4 and p[3] not in (0, 1):
            raise InputError(f"point labels are 1 (positive) or 0 (negative); got {_text([p[3]])}")
        if np.any(np.floor(ijk + 0.5) < 0) or np.any(np.floor(ijk + 0.5) >= size):
            raise InputError(f"point {_text(ijk)} is outside the volume (IJK size {extent})")
    for b in boxes:
        if len(b) != 6:
            raise InputError(f"a box is i0,j0,k0,i1,j1,k1; got {_text(b)}")
        corners = _finite(b, "box").reshape(2, 3)
        if np.any(np.floor(corners.max(0) + 0.5) < 0) or np.any(np.floor(corners.min(0) + 0.5) >= size):
            raise InputError(f"box {_text(b)} does not overlap the volume (IJK size {extent})")
        in_plane = [a for a in range(3) if a != 2 - axis]
        if np.any(np.abs(corners[1, in_plane] - corners[0, in_plane]) < 1):
            raise InputError(f"box {_text(b)} has no area in the slice plane: give two opposite corners")
    _check_one_box_per_slice(boxes, shape, axis)
    return box_clip_notes(boxes, shape)


def mask_box(mask: np.ndarray, margin: int = 0, edges: bool = False) -> Optional[np.ndarray]:
    """The bounding box (x0, y0, x1, y1) of a 2D mask's foreground, grown by ``margin`` pixels and kept on the
    image; None when the mask is empty. ``edges=False``: the first and last foreground pixels' indices (the
    box a user draws around them, as prompts take it); ``edges=True``: pixel edges (x1 = the last column + 1),
    the frame in which a box is scaled to another grid."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    h, w = mask.shape
    end = 1 if edges else 0
    return np.array(
        [
            max(cols.min() - margin, 0),
            max(rows.min() - margin, 0),
            min(cols.max() + margin, w - 1) + end,
            min(rows.max() + margin, h - 1) + end,
        ],
        float,
    )


def box_clip_notes(boxes: Sequence[Sequence[float]], shape: Sequence[int]) -> List[str]:
    """One line per box that reaches outside the volume (and will be clipped to it)."""
    return [
        f"box {_text(b)} reaches outside the volume; clipped to {_text(clip_box(b, shape))}"
        for b in boxes
        if list(clip_box(b, shape)) != [float(v) for v in b]
    ]


def clip_box(box: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """A box's corners clipped to the centres of the volume's edge voxels: a corner far outside would
    reach the model as a box it never saw (and give nothing)."""
    top = np.array(shape[:3][::-1], float) - 1  # last I, J, K index
    corners = np.asarray(box, float).reshape(2, 3)
    return np.clip(corners, 0, top).reshape(6)


def box_slices(box: Sequence[float], shape: Sequence[int], axis: int) -> range:
    """The slices along KJI ``axis`` a box spans, inside the volume (bounded by its size)."""
    normal = 2 - axis
    lo, hi = sorted((voxel_index(box[normal]), voxel_index(box[normal + 3])))
    return range(max(lo, 0), min(hi, shape[axis] - 1) + 1)


def _check_one_box_per_slice(boxes, shape, axis) -> None:
    from PromiseSegmentLib.errors import InputError

    owner: Dict[int, Sequence[float]] = {}
    for b in boxes:
        for n in box_slices(b, shape, axis):
            if n in owner:
                raise InputError(
                    f"boxes {_text(owner[n])} and {_text(b)} both cover slice {n}: one box per slice "
                    "(segment the objects separately, into separate segments)"
                )
            owner[n] = b


def _finite(values, what: str) -> np.ndarray:
    from PromiseSegmentLib.errors import InputError

    try:
        a = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"{what} coordinates must be numbers; got {_text(values)}") from None
    if not np.all(np.isfinite(a)):
        raise InputError(f"{what} coordinates must be finite numbers; got {_text(values)}")
    return a


def _text(values) -> str:
    """Coordinates as the user typed them: ``40,16,3`` (no numpy reprs)."""
    out = []
    for v in values:
        try:
            out.append(f"{float(v):g}")
        except (TypeError, ValueError):
            out.append(str(v))
    return ",".join(out)


def ijk_prompts(
    axis: int, points: Sequence[Sequence[float]], boxes: Sequence[Sequence[float]], shape: Sequence[int]
) -> Dict[int, "Prompts"]:
    """IJK voxel prompts -> per-slice prompts in slice pixels. Points are i,j,k[,label]; a box is
    i0,j0,k0,i1,j1,k1 and applies to every slice it spans along ``axis``."""
    row, col = IN_PLANE_AXES[axis]
    normal = 2 - axis  # IJK index of the slicing axis
    per_slice: Dict[int, dict] = {}
    for p in points:
        ijk = [voxel_index(v) for v in p[:3]]
        s = per_slice.setdefault(ijk[normal], {"points": [], "labels": []})
        s["points"].append((ijk[col], ijk[row]))
        s["labels"].append(int(p[3]) if len(p) > 3 else 1)
    for b in boxes:
        clipped = clip_box(b, shape)
        lo, hi = np.minimum(clipped[:3], clipped[3:]), np.maximum(clipped[:3], clipped[3:])
        # One rounding rule for every IJK coordinate (a box corner at k = 12.9999 is on slice 13).
        for n in box_slices(b, shape, axis):
            per_slice.setdefault(n, {"points": [], "labels": []})["box"] = [lo[col], lo[row], hi[col], hi[row]]
    return {
        n: Prompts(points=d["points"] or None, labels=d["labels"] or None, box=d.get("box"))
        for n, d in per_slice.items()
    }
