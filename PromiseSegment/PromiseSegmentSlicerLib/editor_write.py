"""Writing a result block into a segment through the Segment Editor, so that only that block changes.

``vtkSlicerSegmentEditorLogic::ModifySegmentByLabelmap`` in Set mode (Modules/Loadable/Segmentations/
Logic/vtkSlicerSegmentEditorLogic.cxx, ModificationModeSet branch) first clears the *whole* selected
segment, then merges the modifier inside the modification extent, and erases every overwritable segment
wherever the modifier is set inside that extent. A modifier that carried the rest of the segment along
(to keep it) would therefore erase other segments along the whole segment. Instead:

1. Set, limited to the block: inside it the editor's masking, intensity range and overwrite mode apply
   exactly as for any Slicer effect; outside it the selected segment is cleared (Set's first step).
2. Add back the selected segment's own previous voxels outside the block, with masking bypassed (which
   also empties the editor's overwrite list): nothing else is touched.

Both run under the one undo state the caller saved. No Qt here: the effect passes its
``modifySelectedSegmentByLabelmap``, the logic ``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from PromiseSegmentSlicerLib.mrml import image_to_world, on_reference_grid, segment_labelmap, vtk_matrix

# modify(modifier, mode, extent or None, bypassMasking); the modes of vtkSlicerSegmentEditorLogic, which
# qSlicerSegmentEditorAbstractEffect::ModificationMode mirrors value for value
ModifyFn = Callable[[object, int, Optional[Sequence[int]], bool], None]
SET = slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet
ADD = slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd


def empty_like(reference) -> "slicer.vtkOrientedImageData":
    image = slicer.vtkOrientedImageData()
    image.SetExtent(reference.GetExtent())
    image.SetImageToWorldMatrix(vtk_matrix(image_to_world(reference)))
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(0)
    return image


def kji(image) -> np.ndarray:
    """A writable KJI view of a single-component image's voxels."""
    e = image.GetExtent()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return values.reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)


def local_block(extent: Sequence[int], reference) -> tuple:
    """Numpy slices of ``extent`` (IJK on ``reference``'s grid) inside ``reference``'s KJI array."""
    e = reference.GetExtent()
    i0, i1, j0, j1, k0, k1 = (v - e[2 * (a // 2)] for a, v in enumerate(extent))
    return slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1)


def segment_outside_block(segmentation_node, segment_id: str, reference, block: tuple):
    """The segment's voxels on ``reference``'s grid with ``block`` cleared, or None when nothing is left."""
    current = segment_labelmap(segmentation_node, segment_id)
    if current.GetPointData().GetScalars() is None or current.GetScalarRange()[1] <= 0:
        return None
    outside = empty_like(reference)
    on_grid = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        current, outside, on_grid, False
    ):
        raise RuntimeError("could not resample the segment onto its segmentation's geometry")
    values = kji(outside)
    values[:] = kji(on_grid) > 0
    values[block] = 0
    if not values.any():
        return None
    outside.Modified()
    return outside


def write_block(
    modify: ModifyFn, segmentation_node, segment_id: str, labelmap, extent: Sequence[int], reference
) -> None:
    """Replace the block ``extent`` (IJK of ``labelmap``) of the segment by ``labelmap``; ``reference`` is
    the editor's modifier geometry (its default modifier labelmap), on which the editor's masking works."""
    block_image, block_extent = on_reference_grid(labelmap, extent, reference)
    block = local_block(block_extent, reference)
    keep = segment_outside_block(segmentation_node, segment_id, reference, block)  # before Set clears it
    modifier = empty_like(reference)
    kji(modifier)[block] = kji(block_image) > 0
    modifier.Modified()
    modify(modifier, SET, list(block_extent), False)
    if keep is not None:
        modify(keep, ADD, None, True)
