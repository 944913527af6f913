"""What the Segment Editor effect remembers between mouse events, without Qt: the volume, slice axis and
index under the mouse, the clicks (positive/negative) or box corners, and the previewed result.

The effect converts a mouse position to world RAS (``xyToRas``) and hands it here; everything else -
which slice, which IJK voxel (through the volume's parent transform), running the model, building the
labelmap for Apply - happens in this class and the logic, so plain pytest covers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from PromiseSegmentLib.data.prompts import voxel
from PromiseSegmentLib.errors import InputError

from . import mrml

MODES = ("automatic", "clicks", "box")


def axis_for_normal(volume_node, normal_ras: Sequence[float]) -> int:
    """KJI array axis of the volume most aligned with a slice view's normal (world RAS)."""
    ijk_to_ras = mrml.volume_ijk_to_ras(volume_node)
    directions = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    normal = mrml.world_direction_to_node(volume_node, normal_ras)
    ijk = int(np.argmax(np.abs(directions.T @ normal)))
    return 2 - ijk


@dataclass
class ClickSession:
    logic: object
    prompt_tool: str = "clicks"  # "clicks", "box" or "automatic": how the user prompts (the Prompts list)
    volume_node: object = None
    axis: Optional[int] = None
    index: Optional[int] = None
    points: List[Tuple[float, float, float, int]] = field(default_factory=list)  # IJK + label
    box_corners: List[Tuple[float, float, float]] = field(default_factory=list)
    preview_mask: Optional[np.ndarray] = None
    _press: Optional[Tuple[float, float, float]] = None  # where a box drag started

    def clear(self) -> None:
        self.points, self.box_corners, self.preview_mask = [], [], None

    def locate(self, volume_node, ras: Sequence[float], normal_ras: Sequence[float]) -> Tuple[int, np.ndarray]:
        """(slice index, continuous IJK) under the mouse at world RAS ``ras``; moving to another slice or
        volume starts over."""
        axis = axis_for_normal(volume_node, normal_ras)
        ijk = mrml.world_to_ijk(volume_node, ras)
        shape = mrml.volume_array(volume_node).shape[:3]
        under = np.array(voxel(ijk))  # the same rounding rule as the logic's prompts
        if np.any(under < 0) or np.any(under >= np.array(shape[::-1])):
            raise InputError("the click is outside the source volume")
        index = int(under[2 - axis])
        ijk[2 - axis] = index  # a click is on the slice shown, whatever the rounding error of xyToRas
        if (volume_node, axis, index) != (self.volume_node, self.axis, self.index):
            self.clear()
            self.volume_node, self.axis, self.index = volume_node, axis, index
        return index, ijk

    def click(self, volume_node, ras, normal_ras, positive: bool = True) -> None:
        _, ijk = self.locate(volume_node, ras, normal_ras)
        if self.prompt_tool == "box":
            self.box_corners = (self.box_corners + [tuple(ijk)])[-2:]
        else:
            self.points.append((*ijk, 1 if positive else 0))

    def press(self, volume_node, ras, normal_ras) -> None:
        """Box mode: the mouse button went down (a drag may start here)."""
        _, ijk = self.locate(volume_node, ras, normal_ras)
        self._press = tuple(ijk)

    def release(self, volume_node, ras, normal_ras) -> None:
        """Box mode: the button came up. A drag gives the box at once; a click without moving adds one
        corner (two such clicks also make a box)."""
        if self._press is None:
            return
        start, self._press = self._press, None
        # A drag stays on the slice where it started (the view cannot change slice under a held button);
        # only the in-plane position is read here, clipped to the volume like the view's own display.
        ijk = mrml.world_to_ijk(volume_node, ras)
        size = np.array(mrml.volume_array(volume_node).shape[:3][::-1])
        ijk = np.clip(ijk, -0.5, size - 0.5)
        ijk[2 - self.axis] = self.index
        moved = np.abs(np.round(np.subtract(ijk, start))).max() >= 1
        self.box_corners = [start, tuple(ijk)] if moved else (self.box_corners + [start])[-2:]

    @property
    def dragging(self) -> bool:
        """Box mode: a press was taken and its release has not come yet."""
        return self._press is not None

    @property
    def ready(self) -> bool:
        if self.volume_node is None:
            return False
        if self.prompt_tool == "box":
            return len(self.box_corners) == 2
        return self.prompt_tool == "automatic" or bool(self.points)

    def box(self) -> Optional[Tuple[float, ...]]:
        if self.prompt_tool != "box" or len(self.box_corners) < 2:
            return None
        return (*self.box_corners[0], *self.box_corners[1])

    def preview(self, **model_args) -> np.ndarray:
        """Run the model on the current slice (decoder only when the slice is already encoded).

        Automatic mode: the adapter's APM points alone, or merged with the user's clicks once there are
        any (a negative click removes a leak, a positive one adds a missed part)."""
        if not self.ready:
            raise InputError(
                "click in a slice view first"
                if self.prompt_tool != "box"
                else "drag a box in a slice view first (or click two opposite corners)"
            )
        mode = model_args.pop("mode", None)
        if mode is None and self.prompt_tool == "automatic":
            mode = "apm+clicks" if self.points else "apm+ips"
        self.preview_mask = self.logic.segmentSlice(
            self.volume_node,
            self.index,
            self.axis,
            points=self.points if self.prompt_tool != "box" else (),
            box=self.box(),
            mode=mode or "auto",
            **model_args,
        )
        return self.preview_mask

    def labelmap(self, segmentation_node=None):
        """The previewed slice as (``vtkOrientedImageData``, extent) for ``modifySelectedSegmentByLabelmap``."""
        if self.preview_mask is None:
            raise InputError("nothing to apply: preview a result first")
        return self.logic.slicesLabelmap(
            self.volume_node, self.axis, {self.index: self.preview_mask}, segmentation_node
        )
