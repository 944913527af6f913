"""Every write path into a segment, on slicer-core's real ``vtkSlicerSegmentEditorLogic``: only the targeted
slices of the selected segment change; no voxel of any other segment changes elsewhere, in the same layer
or in another, for each overwrite and masking mode; inside the target the result is exactly what Slicer's
own Set does there; one undo restores the scene.

The reference for "what Slicer does inside the block" is Slicer's own Set mode limited to the block
(``ModifySegmentByLabelmap`` with a modification extent), run on an identical second scene."""

import numpy as np
import pytest
import slicer
from slicer_scene import add_segmentation, add_volume, make_app, oblique_matrix, write_mask

from PromiseSegmentSlicerLib.logic import SceneLogic
from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, on_reference_grid, segment_mask, slice_extent

SHAPE = (9, 40, 44)  # K, J, I
NODE = slicer.vtkMRMLSegmentEditorNode
SEG = slicer.vtkMRMLSegmentationNode
OVERWRITE = {"all": NODE.OverwriteAllSegments, "visible": NODE.OverwriteVisibleSegments, "none": NODE.OverwriteNone}
MASKING = {
    "everywhere": SEG.EditAllowedEverywhere,
    "inside all": SEG.EditAllowedInsideAllSegments,
    "inside visible": SEG.EditAllowedInsideVisibleSegments,
    "outside all": SEG.EditAllowedOutsideAllSegments,
    "outside visible": SEG.EditAllowedOutsideVisibleSegments,
    "inside one": SEG.EditAllowedInsideSingleSegment,
    "intensity range": SEG.EditAllowedEverywhere,
}


def masks():
    """a: the selected segment (slices 1-5); b: a's layer, elsewhere; c: another layer, overlapping a on
    slice 2 and the new result on slice 4; d: hidden, another layer, overlapping a and the result."""
    out = {name: np.zeros(SHAPE, np.uint8) for name in "abcd"}
    out["a"][1:6, 10:20, 10:20] = 1
    out["b"][:, 25:35, 25:35] = 1
    out["c"][2, 12:28, 12:28] = 1
    out["c"][4, 5:12, 20:30] = 1
    out["d"][1:8, 15:18, 5:40] = 1
    return out


def build(overwrite, masking):
    app = make_app()
    image = (100 + 50 * np.arange(SHAPE[2])[None, None, :] + np.zeros(SHAPE)).astype(np.int16)
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    seg = add_segmentation(app.scene, volume)
    seg.CreateDefaultDisplayNodes()
    ids = {name: seg.GetSegmentation().AddEmptySegment(name, name) for name in "abcd"}
    for name, mask in masks().items():
        write_mask(mask, m, seg, ids[name])
    seg.GetDisplayNode().SetSegmentVisibility(ids["d"], False)
    assert seg.GetSegmentation().GetNumberOfLayers() >= 3  # b shares a's layer, c and d do not
    editor, node = app.editor(seg, volume, ids["a"])
    node.SetOverwriteMode(OVERWRITE[overwrite])
    node.SetMaskMode(MASKING[masking])
    if masking == "inside one":
        node.SetMaskSegmentID(ids["c"])
    if masking == "intensity range":
        node.SetSourceVolumeIntensityMask(True)
        node.SetSourceVolumeIntensityMaskRange(600, 1600)  # columns i = 10..30
    return editor, seg, volume, ids, m


def state(seg, volume, ids):
    return {name: segment_mask(seg, sid, volume) for name, sid in ids.items()}


def new_result(first, last):
    result = np.zeros(SHAPE, np.uint8)
    result[first : last + 1, 8:22, 8:30] = 1
    return result


def reference_inside_block(overwrite, masking, first, last):
    """Slicer's own Set mode, limited to the block, on an identical scene."""
    editor, seg, volume, ids, m = build(overwrite, masking)
    extent = slice_extent(SHAPE, 0, first, last)
    assert editor.ResetModifierLabelmapToDefault()
    reference = editor.GetModifierLabelmap()
    block, block_extent = on_reference_grid(labelmap_from_mask(new_result(first, last), m, extent), extent, reference)
    modifier = slicer.vtkOrientedImageData()
    modifier.DeepCopy(reference)
    modifier.GetPointData().GetScalars().Fill(0)
    resample = slicer.vtkOrientedImageDataResample
    resample.ModifyImage(modifier, block, resample.OPERATION_MAXIMUM)
    editor.ModifySegmentByLabelmap(
        seg,
        ids["a"],
        modifier,
        slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet,
        list(block_extent),
        False,
        False,
    )
    return state(seg, volume, ids)


def check_write(overwrite, masking, first, last):
    editor, seg, volume, ids, m = build(overwrite, masking)
    before = state(seg, volume, ids)
    extent = slice_extent(SHAPE, 0, first, last)
    assert editor.SaveStateForUndo()
    SceneLogic.writeLabelmap(labelmap_from_mask(new_result(first, last), m, extent), seg, ids["a"], extent, editor)
    after = state(seg, volume, ids)
    expected = reference_inside_block(overwrite, masking, first, last)
    outside = np.ones(SHAPE, bool)
    outside[first : last + 1] = False
    for name in "abcd":
        assert np.array_equal(after[name][outside], before[name][outside]), f"{name} changed outside the block"
        assert np.array_equal(after[name][~outside], expected[name][~outside]), f"{name} inside the block"
    assert after["a"][first : last + 1].any(), "the result was written"
    editor.Undo()
    for name, mask in state(seg, volume, ids).items():
        assert np.array_equal(mask, before[name]), f"undo did not restore {name}"
    return before, after


@pytest.mark.parametrize("masking", list(MASKING))
@pytest.mark.parametrize("overwrite", list(OVERWRITE))
def test_applying_one_slice_changes_only_that_slice_in_every_mode(overwrite, masking):
    check_write(overwrite, masking, 4, 4)


@pytest.mark.parametrize("first, last", [(3, 6), (0, 8)])
@pytest.mark.parametrize("masking", ["everywhere", "inside one"])
def test_a_slice_range_and_the_whole_volume_change_only_their_slices(first, last, masking):
    check_write("all", masking, first, last)


def test_the_reported_reproduction_keeps_the_other_layers_voxels():
    """Segment c, in another layer, overlaps a on slice 2; Apply on slice 4 with the editor's default
    "overwrite all": c keeps every voxel of slice 2 (today's failure: it lost them along a)."""
    before, after = check_write("all", "everywhere", 4, 4)
    assert before["c"][2].sum() == 256 and np.array_equal(after["c"][2], before["c"][2])
    assert not (after["c"][4] & new_result(4, 4)[4]).any(), "inside the block, overwrite all still overwrites"
