"""MRML nodes <-> numpy for the logic: volumes as KJI arrays with their IJK->RAS matrix, binary masks as
``vtkOrientedImageData`` labelmaps at that exact geometry, segments exported on a volume's grid.

No Qt here: everything runs on the ``slicer-core`` wheel as well as inside Slicer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from PromiseSegmentLib.errors import InputError


def node_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def volume_array(volume_node) -> np.ndarray:
    """The voxels as a KJI (scalar) or KJI×C (vector, e.g. an RGB photo) array - a view, no copy."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("no volume selected, or the volume has no image data")
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{volume_node.GetName()} is a label map; choose the image volume to segment")
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim == 4 and array.shape[-1] not in (3, 4):
        raise InputError(
            f"{volume_node.GetName()} has {array.shape[-1]} components per voxel; only scalar "
            "and RGB(A) volumes can be segmented"
        )
    return array


def volume_node_from_array(scene, array: np.ndarray, ijk_to_ras: np.ndarray, name: str = "volume"):
    """A KJI (scalar) or KJI×C (vector, e.g. an RGB photo as one slice) array at ``ijk_to_ras`` -> a new
    volume node; for console scripts that hold numpy data, and for tests."""
    cls = "vtkMRMLVectorVolumeNode" if array.ndim == 4 else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    return node


def transform_to(node, target_node) -> np.ndarray:
    """Linear transform from ``node``'s coordinate frame to ``target_node``'s (identity when neither is
    transformed); non-linear transforms are refused rather than approximated."""
    a = node.GetParentTransformNode() if node is not None else None
    b = target_node.GetParentTransformNode() if target_node is not None else None
    if a is None and b is None or (a is not None and b is not None and a.GetID() == b.GetID()):
        return np.eye(4)
    for t in (a, b):
        if t is not None and not t.IsTransformToWorldLinear():
            raise InputError(f"{t.GetName()} is a non-linear transform; harden it before segmenting")
    m = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(a, b, m)
    return node_matrix(m)


def volume_ijk_to_ras(volume_node, segmentation_node=None) -> np.ndarray:
    """IJK -> RAS of the volume, expressed in the segmentation's frame when it is transformed differently."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return transform_to(volume_node, segmentation_node) @ node_matrix(m)


def labelmap_from_mask(
    mask: np.ndarray, ijk_to_ras: np.ndarray, extent: Optional[Sequence[int]] = None
) -> "slicer.vtkOrientedImageData":
    """KJI uint8 mask -> ``vtkOrientedImageData`` at the given geometry (any direction, any spacing).

    With ``extent`` (i0, i1, j0, j1, k0, k1) only that sub-block of ``mask`` is stored, e.g. one slice.
    The image takes over the block's memory (no second copy of a whole-volume mask: 75 MB at 512x512x300),
    so ``mask`` must not be changed afterwards; every caller passes a freshly predicted mask.
    """
    ijk_to_ras = np.asarray(ijk_to_ras, float)
    if extent is None:
        extent = (0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 0, mask.shape[0] - 1)
    i0, i1, j0, j1, k0, k1 = (int(v) for v in extent)
    block = np.ascontiguousarray(mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1], dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras))
    # deep=False: the VTK array keeps a reference to the block instead of copying it
    scalars = numpy_support.numpy_to_vtk(block.ravel(), deep=False, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def slice_extent(shape: Sequence[int], axis: int, first: int, last: Optional[int] = None) -> Tuple[int, ...]:
    """IJK extent (i0, i1, j0, j1, k0, k1) of slices ``first..last`` along KJI ``axis``."""
    last = first if last is None else last
    ext = [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]
    pair = 2 * (2 - axis)  # KJI axis 0 is K = extent pair 2
    ext[pair], ext[pair + 1] = first, last
    return tuple(ext)


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a KJI uint8 mask on the volume's grid (exported through Slicer's own logic)."""
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise InputError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__promise_export")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segment_id)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, labelmap, volume_node
        ):
            raise InputError(f"could not export segment {segment_id!r} on the grid of {volume_node.GetName()}")
        return (slicer.util.arrayFromVolume(labelmap) > 0).astype(np.uint8)
    finally:
        scene.RemoveNode(labelmap)


def segment_labelmap(segmentation_node, segment_id: str) -> "slicer.vtkOrientedImageData":
    """A 0/1 copy of this segment alone, in the segmentation node's own frame (segments share labelmap
    layers, so the layer itself would carry the other segments' labels too)."""
    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    return image


def restore_segment(segmentation_node, segment_id: str, labelmap) -> None:
    """Put back what ``segment_labelmap`` copied (an empty copy clears the segment)."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if labelmap.GetPointData().GetScalars() is None or labelmap.GetScalarRange()[1] <= 0:
        logic.ClearSegment(segmentation_node, segment_id)
        return
    if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RuntimeError(f"could not restore segment {segment_id!r}")


def segment_is_empty(segmentation_node, segment_id: str) -> bool:
    """True when the segment has no voxel. Segments share labelmap layers, so count the segment's
    own label value in its layer rather than the layer's range."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return True
    name = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    layer = segment.GetRepresentation(name)
    if layer is None or layer.GetPointData() is None or layer.GetPointData().GetScalars() is None:
        return True
    values = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())
    return not np.any(values == segment.GetLabelValue())


def world_to_ijk(volume_node, ras: Sequence[float]) -> np.ndarray:
    """World RAS (what a slice view's ``xyToRas`` gives) -> continuous IJK of the volume, through the
    volume's parent transform: under a transform, the volume's own RAS->IJK alone lands elsewhere."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(m)
    world_to_node = transform_to(None, volume_node)
    return (node_matrix(m) @ world_to_node @ np.r_[np.asarray(ras, float)[:3], 1.0])[:3]


def world_direction_to_node(volume_node, direction: Sequence[float]) -> np.ndarray:
    """A world direction (e.g. a slice view's normal) in the volume's own (untransformed) RAS frame."""
    return transform_to(None, volume_node)[:3, :3] @ np.asarray(direction, float)[:3]


def on_reference_grid(labelmap, extent: Sequence[int], reference) -> Tuple[object, Tuple[int, ...]]:
    """``labelmap`` (with its modified ``extent``) resampled, nearest neighbour, onto the grid of
    ``reference`` (the Segment Editor's modifier labelmap: the segmentation's geometry, which may be
    oversampled, cropped or follow another volume); returns (image, extent on that grid).

    The editor's masking (editable area, intensity range) only works on modifier labelmaps of that exact
    geometry: on another grid it silently writes too much or nothing."""
    grid = slicer.vtkOrientedImageData()
    grid.ShallowCopy(reference)
    to_reference = np.linalg.inv(image_to_world(reference)) @ image_to_world(labelmap)
    i0, i1, j0, j1, k0, k1 = extent
    corners = np.array(
        [[i, j, k, 1.0] for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5) for k in (k0 - 0.5, k1 + 0.5)]
    )
    ijk = (to_reference @ corners.T)[:3]
    # reference voxels whose centres lie inside the modified block, clipped to the reference grid
    lo, hi = np.ceil(ijk.min(1) - 1e-6).astype(int), np.floor(ijk.max(1) + 1e-6).astype(int)
    full = reference.GetExtent()
    new = []
    for a in range(3):
        new += [max(lo[a], full[2 * a]), min(hi[a], full[2 * a + 1])]
    new = [int(v) for v in new]
    if any(new[2 * a] > new[2 * a + 1] for a in range(3)):
        raise InputError(
            "the result does not cover any voxel of the segmentation's geometry (outside it, or "
            "thinner than one of its voxels); nothing would be written"
        )
    grid.SetExtent(*new)
    out = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, grid, out, False
    ):
        raise RuntimeError("could not resample the result onto the segmentation's geometry")
    return out, tuple(new)


def image_to_world(image) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    return node_matrix(m)


PREVIEW_NODE_NAME = "ProMISe preview"
REFERENCE_GEOMETRY = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()


def reference_geometry(segmentation_node) -> str:
    """The segmentation's reference geometry string (its editing grid, in its own frame), or ""."""
    return segmentation_node.GetSegmentation().GetConversionParameter(REFERENCE_GEOMETRY) or ""


def update_preview(scene, preview_node, reference_volume, labelmap, segmentation_node=None, color=(1.0, 1.0, 0.0)):
    """Show ``labelmap`` in a separate, editor-hidden segmentation node (created on first use) so the
    user sees the result before Apply; the segment being edited is not touched. ``labelmap`` is in the
    frame of ``segmentation_node``, so the preview follows that node's parent transform."""
    if preview_node is None or preview_node.GetScene() is None:
        # Flags set before the node enters the scene, so Subject Hierarchy never lists it and a saved
        # scene never contains it.
        preview_node = slicer.vtkMRMLSegmentationNode()
        preview_node.SetName(PREVIEW_NODE_NAME)
        preview_node.SetHideFromEditors(True)
        preview_node.SetSaveWithScene(False)
        scene.AddNode(preview_node)
        preview_node.CreateDefaultDisplayNodes()
    # The transform first: the reference geometry is expressed in the node's own (parent) frame.
    transform_id = segmentation_node.GetTransformNodeID() if segmentation_node is not None else None
    if preview_node.GetTransformNodeID() != transform_id:
        preview_node.SetAndObserveTransformNodeID(transform_id)
    geometry = reference_geometry(segmentation_node) if segmentation_node is not None else ""
    if geometry:
        preview_node.GetSegmentation().SetConversionParameter(REFERENCE_GEOMETRY, geometry)
    else:
        preview_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    segmentation = preview_node.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        segmentation.AddEmptySegment("preview", "preview", list(color))
    sid = segmentation.GetNthSegmentID(0)
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, preview_node, sid, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )
    return preview_node


def remove_preview(preview_node) -> None:
    if preview_node is not None and preview_node.GetScene() is not None:
        preview_node.GetScene().RemoveNode(preview_node)
