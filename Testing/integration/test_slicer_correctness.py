"""What a real Slicer session would hit, reproduced on real MRML (``slicer-core``): transformed volumes,
slice rounding, the editor's masking on a segmentation grid unlike the volume's, the preview node,
propagation with the effect's window, re-entrant calls while a run processes GUI events."""

import numpy as np
import pytest
from slicer_scene import add_segmentation, add_volume, ellipsoid, make_app, oblique_matrix, write_mask

from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import InputError

SHAPE = (9, 40, 44)  # K, J, I


@pytest.fixture(scope="module")
def logic():
    from PromiseSegmentSlicerLib.logic import SceneLogic

    return SceneLogic(backbone="tiny_random")


@pytest.fixture(scope="module")
def adapter():
    from PromiseSegmentLib.backbones.registry import BACKBONES
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    cfg = TrainConfig(apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1), seed=3)
    return build_adapter(cfg, BACKBONES["tiny_random"].load()).eval()


def phantom():
    truth = ellipsoid(SHAPE, (4, 18, 24), (3, 9, 11))
    image = 100 + 400.0 * truth + np.random.default_rng(0).normal(0, 20, SHAPE)
    return image.astype(np.int16), truth


def linear_transform(scene, degrees=30.0, translation=(20.0, 0.0, 10.0)):
    from PromiseSegmentSlicerLib.mrml import vtk_matrix

    a = np.deg2rad(degrees)
    m = np.eye(4)
    m[:3, :3] = [[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]]
    m[:3, 3] = translation
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(vtk_matrix(m))
    return node, m


def transformed_scene():
    """Volume and segmentation both under one rotation + translation (what a registration leaves)."""
    app = make_app()
    image, truth = phantom()
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    seg = add_segmentation(app.scene, volume)
    transform, to_world = linear_transform(app.scene)
    for node in (volume, seg):
        node.SetAndObserveTransformNodeID(transform.GetID())
    return app, m, volume, seg, transform, to_world


def world_of(to_world, m, ijk):
    return (to_world @ m @ np.r_[np.asarray(ijk, float), 1.0])[:3]


def test_translated_volume_click_lands_on_the_voxel_under_the_mouse():
    """The issue's example: a volume translated by (20, 0, 10); world RAS of voxel (30, 30, 10)."""
    from PromiseSegmentSlicerLib.interaction import ClickSession

    app = make_app()
    volume = add_volume(app.scene, np.zeros((20, 40, 40), np.int16), np.eye(4))
    transform, to_world = linear_transform(app.scene, degrees=0.0)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    index, ijk = ClickSession(None).locate(volume, (50.0, 30.0, 20.0), (0.0, 0.0, 1.0))
    assert index == 10 and np.allclose(ijk, (30, 30, 10))


@pytest.mark.parametrize("ijk_axis", [0, 1, 2])
def test_clicks_and_results_under_a_rotated_translated_transform(logic, ijk_axis):
    """Volume and segmentation under a rotation + translation: the click finds the voxel (all three slice
    orientations) and the previewed slice is written back on exactly that slice of the volume."""
    from PromiseSegmentSlicerLib.interaction import ClickSession
    from PromiseSegmentSlicerLib.mrml import segment_mask

    app, m, volume, seg, transform, to_world = transformed_scene()
    sid = seg.GetSegmentation().AddEmptySegment("a", "a")
    normal = to_world[:3, :3] @ m[:3, ijk_axis] / np.linalg.norm(m[:3, ijk_axis])  # the view's normal, world
    target = (24, 18, 4)
    session = ClickSession(logic)
    index, ijk = session.locate(volume, world_of(to_world, m, target), normal)
    assert session.axis == 2 - ijk_axis and index == target[ijk_axis] and np.allclose(ijk, target)
    session.click(volume, world_of(to_world, m, target), normal)
    mask = session.preview(mode="vanilla")
    assert mask.any()
    labelmap, _ = session.labelmap(seg)
    logic.writeLabelmap(labelmap, seg, sid)
    written = segment_mask(seg, sid, volume)
    on_slice = np.take(written, index, axis=session.axis)
    assert np.array_equal(on_slice, mask) and written.sum() == mask.sum()


def test_box_drags_work_on_every_slice_of_an_oblique_volume(logic):
    """Corners come from world RAS (float error: k = 12.9999...) and sometimes lie exactly between two
    slices (k = n + 0.5): the slice the box is on and the slice previewed follow one rounding rule."""
    from PromiseSegmentSlicerLib.interaction import ClickSession

    app = make_app()
    shape = (40, 24, 26)
    image = (100 + 400.0 * ellipsoid(shape, (20, 12, 13), (18, 8, 9))).astype(np.int16)
    m = oblique_matrix(spacing=(0.7, 0.7, 1.3))
    volume = add_volume(app.scene, image, m)
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    failures = []
    for k in range(shape[0]):
        session = ClickSession(logic, prompt_tool="box")
        dk = 0.5 if k % 2 == 0 and k + 1 < shape[0] else 0.0  # even k + 0.5: round-half-even differs
        session.press(volume, (m @ [5, 4, k + dk, 1])[:3], normal)
        session.release(volume, (m @ [20, 19, k + dk, 1])[:3], normal)
        try:
            session.preview(mode="vanilla")
        except InputError as error:
            failures.append((k, str(error)))
    assert not failures


def oversampled_geometry(seg, volume, factor=2):
    """Give ``seg`` a reference geometry ``factor`` times finer than ``volume``'s grid (what the Segment
    Editor's "Specify geometry" with oversampling produces)."""
    import slicer
    import vtk

    from PromiseSegmentSlicerLib.mrml import node_matrix, vtk_matrix

    dims = np.array(volume.GetImageData().GetDimensions())
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    fine = node_matrix(m).copy()
    fine[:3, :3] /= factor
    fine[:3, 3] -= node_matrix(m)[:3, :3] @ np.full(3, 0.5 - 0.5 / factor)  # same outer box
    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(0, factor * dims[0] - 1, 0, factor * dims[1] - 1, 0, factor * dims[2] - 1)
    grid.SetImageToWorldMatrix(vtk_matrix(fine))
    geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(grid)
    seg.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry
    )


@pytest.mark.parametrize("masking", ["intensity range", "editable area"])
def test_editor_masking_applies_on_an_oversampled_segmentation_and_undo_restores(logic, adapter, masking):
    import slicer

    from PromiseSegmentSlicerLib.mrml import segment_mask, volume_ijk_to_ras

    app = make_app()
    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    oversampled_geometry(seg, volume)
    a = seg.GetSegmentation().AddEmptySegment("a", "a")
    b = seg.GetSegmentation().AddEmptySegment("b", "b")
    m = volume_ijk_to_ras(volume)
    allowed = np.zeros(SHAPE, np.uint8)
    allowed[:, :, :22] = 1  # segment b: the left half of every slice
    write_mask(allowed, m, seg, b)
    editor, node = app.editor(seg, volume, a)
    node.SetOverwriteMode(node.OverwriteNone)
    if masking == "intensity range":
        node.SetSourceVolumeIntensityMask(True)
        node.SetSourceVolumeIntensityMaskRange(-1000, 300)  # the background only
        allowed = (image < 300).astype(np.uint8)
    else:
        node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
        node.SetMaskSegmentID(b)
    predicted = logic.loadModel(adapter=adapter).segment_volume(image, m)
    expected = predicted & allowed
    assert expected.any() and (predicted & (1 - allowed)).any(), "the masking must have something to remove"

    logic.segmentVolume(volume, seg, a, adapter=adapter, editorLogic=editor)
    written = segment_mask(seg, a, volume)
    # the fine grid's aligned source volume is interpolated, so a few boundary voxels may differ
    assert (written & (1 - predicted)).sum() == 0
    assert np.abs(written.astype(int) - expected).sum() <= 0.02 * expected.sum()
    editor.Undo()
    assert not segment_mask(seg, a, volume).any()


def test_preview_follows_the_segmentation_transform(logic):
    from PromiseSegmentSlicerLib.interaction import ClickSession
    from PromiseSegmentSlicerLib.mrml import update_preview

    app, m, volume, seg, transform, to_world = transformed_scene()
    session = ClickSession(logic)
    normal = to_world[:3, :3] @ m[:3, 2] / np.linalg.norm(m[:3, 2])
    session.click(volume, world_of(to_world, m, (24, 18, 4)), normal)
    session.preview(mode="vanilla")
    labelmap, _ = session.labelmap(seg)
    preview = update_preview(app.scene, None, volume, labelmap, seg)
    assert preview.GetTransformNodeID() == transform.GetID()
    assert preview.GetHideFromEditors() and not preview.GetSaveWithScene()


def test_the_preview_has_the_segmentations_geometry_under_a_shared_transform():
    """The preview node gets the segmentation's transform *before* its reference geometry, which is
    expressed in the node's own frame: set the other way round, the geometry is shifted by the transform."""
    import slicer

    from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, update_preview

    app, m, volume, seg, transform, to_world = transformed_scene()
    preview = update_preview(app.scene, None, volume, labelmap_from_mask(np.ones(SHAPE, np.uint8), m), seg)
    key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert seg.GetSegmentation().GetConversionParameter(key)
    assert preview.GetSegmentation().GetConversionParameter(key) == seg.GetSegmentation().GetConversionParameter(key)


def test_propagation_sees_the_image_through_the_effects_window(logic, adapter):
    """The accepted slice was previewed with a custom window; propagation must use the same one."""
    from PromiseSegmentLib.inference.propagation import propagation_prompts
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras

    app = make_app()
    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    model = logic.loadModel(adapter=adapter)
    window = IntensityRule.ct(250, 100)
    start = truth[4].astype(bool)
    got = logic.propagate(
        volume,
        0,
        4,
        start,
        direction=1,
        maxSlices=1,
        model=model,
        intensity=window,
        minAreaFraction=0,
        minIntensityAgreement=0,
    )
    m = volume_ijk_to_ras(volume)
    prompts = propagation_prompts(model, start, None, 0, 5)

    def expected(rule):
        previous = None if model.backbone.spec.box_only else start
        return model.segment_slice(image, m, 0, 5, prompts, previous, "auto", rule.value_range(image)).masks[0]

    assert np.array_equal(got[5], expected(window))
    assert not np.array_equal(expected(window), expected(model.intensity)), "the window must matter here"


def test_a_call_made_from_inside_a_running_calls_callback_is_refused(logic):
    """A run processes GUI events in its progress callback; a click arriving then is refused with a clear
    message instead of starting a nested run, and the outer run completes."""
    app = make_app()
    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    refused = []

    def progress(done, total):
        try:
            logic.segmentSlice(volume, 4, points=[(24, 18, 4)], mode="vanilla")
        except InputError as error:
            refused.append(str(error))

    mask = logic.predictVolume(volume, boxes=[(10, 8, 2, 36, 28, 6)], mode="vanilla", progress=progress)
    assert mask[2:7].any() and refused and "still running" in refused[0]
    assert logic.segmentSlice(volume, 4, points=[(24, 18, 4)], mode="vanilla").shape == (40, 44)  # free again


def test_scope_labelmap_is_the_predicted_slice_range(logic, adapter):
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras

    app = make_app()
    image, _ = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    labelmap, extent = logic.segmentScope(volume, seg, "K", (2, 5), mode="auto", adapter=adapter)
    assert tuple(extent) == (0, 43, 0, 39, 2, 5) and tuple(labelmap.GetExtent()) == tuple(extent)
    from vtk.util import numpy_support

    stored = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(4, 40, 44)
    expected = logic.loadModel(adapter=adapter).segment_volume(image, volume_ijk_to_ras(volume), slice_range=(2, 5))
    assert stored.any() and np.array_equal(stored, expected[2:6])


@pytest.mark.parametrize(
    "points, boxes, message",
    [
        ([(24, 18, 40)], [], "outside the volume"),
        ([(24, 18, 4, 2)], [], "labels"),
        ([(np.nan, 18, 4)], [], "finite"),
        ([], [(10, 8, 4, 10, 28, 4)], "no area"),
        ([], [(100, 100, 40, 120, 120, 50)], "does not overlap"),
    ],
)
def test_bad_prompts_are_refused_before_any_model_is_loaded(points, boxes, message):
    from PromiseSegmentSlicerLib.logic import SceneLogic

    app = make_app()
    volume = add_volume(app.scene, phantom()[0], oblique_matrix())
    unloadable = SceneLogic(backbone="/no/such/checkpoint.pth")  # loading it would fail differently
    with pytest.raises(InputError, match=message):
        unloadable.predictVolume(volume, points=points, boxes=boxes, mode="vanilla")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda lg, v: lg.predictVolume(v, boxes=[(10, 8, 4, 36, 28, 4)], mode="bogus"), "unknown mode"),
        (lambda lg, v: lg.segmentSlice(v, 4, box=(10, 8, 4, 36, 28, 4), intensity=IntensityRule.ct(40, 0)), "width"),
        (lambda lg, v: lg.predictVolume(v, sliceRange=(5, 50), boxes=[(10, 8, 4, 36, 28, 4)]), "outside"),
        (lambda lg, v: lg.segmentSlice(v, 3, box=(10, 8, 4, 36, 28, 4)), "not on slice 3"),
    ],
)
def test_bad_options_are_refused_before_any_model_is_loaded(call, message):
    from PromiseSegmentSlicerLib.logic import SceneLogic

    app = make_app()
    volume = add_volume(app.scene, phantom()[0], oblique_matrix())
    with pytest.raises(InputError, match=message):
        call(SceneLogic(backbone="/no/such/checkpoint.pth"), volume)


def test_has_model_answers_without_loading_anything():
    from PromiseSegmentSlicerLib.logic import SceneLogic

    fresh = SceneLogic(backbone="tiny_random")
    assert not fresh.hasModel() and fresh._backbone is None  # a mouse handler may ask: nothing is loaded
    fresh.loadModel()
    assert fresh.hasModel() and fresh.hasModel(backbone="tiny_random")
    assert not fresh.hasModel(backbone="sam_vit_b") and not fresh.hasModel(device="cpu")
    assert not fresh.hasModel(adapter="/no/such/adapter.safetensors")


def lesion_pairs(scene):
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras

    image, truth = phantom()
    volume = add_volume(scene, image, oblique_matrix())
    seg = add_segmentation(scene, volume)
    sid = seg.GetSegmentation().AddEmptySegment("lesion", "lesion")
    write_mask(truth, volume_ijk_to_ras(volume), seg, sid)
    return [(volume, seg, sid)]


def test_training_never_replaces_an_existing_adapter(logic, tmp_path):
    from PromiseSegmentLib.training.config import TrainConfig

    out = tmp_path / "lesion.safetensors"
    out.write_bytes(b"an earlier adapter")
    with pytest.raises(InputError, match="already exists"):
        logic.trainAdapter(lesion_pairs(make_app().scene), out, config=TrainConfig(epochs=1))
    assert out.read_bytes() == b"an earlier adapter"


def test_a_full_disk_while_saving_an_adapter_leaves_no_partial_file(logic, tmp_path):
    import subprocess

    from PromiseSegmentLib.training.config import TrainConfig

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not allow mounting a small tmpfs (needs root)")
    try:
        cfg = TrainConfig(epochs=1, batch_size=4, augment=False, apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1))
        with pytest.raises(OSError):
            logic.trainAdapter(lesion_pairs(make_app().scene), disk / "lesion.safetensors", config=cfg)
        assert sorted(p.name for p in disk.iterdir()) == [], "no adapter, no state file, no temp file"
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def segment_with_content(scene):
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras

    image, truth = phantom()
    volume = add_volume(scene, image, oblique_matrix())
    seg = add_segmentation(scene, volume)
    a = seg.GetSegmentation().AddEmptySegment("a", "a")
    b = seg.GetSegmentation().AddEmptySegment("b", "b")  # shares a's labelmap layer
    m = volume_ijk_to_ras(volume)
    existing = np.zeros(SHAPE, np.uint8)
    existing[:, 5:15, 5:15] = 1
    other = np.zeros(SHAPE, np.uint8)
    other[:, 25:35, 25:35] = 1
    write_mask(existing, m, seg, a)
    write_mask(other, m, seg, b)
    return volume, seg, a, b, m, existing, other


def test_writing_one_slice_through_the_editor_keeps_the_rest_of_the_segment():
    """Set mode replaces a whole segment by its modifier: a one-slice result must not erase the segment's
    other slices (Apply on the current slice, Propagate, slice ranges)."""
    from PromiseSegmentSlicerLib.logic import SceneLogic
    from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, segment_mask, slice_extent

    app = make_app()
    volume, seg, a, b, m, existing, other = segment_with_content(app.scene)
    editor, node = app.editor(seg, volume, a)
    node.SetOverwriteMode(node.OverwriteNone)
    result = np.zeros(SHAPE, np.uint8)
    result[4, 8:22, 8:22] = 1
    extent = slice_extent(SHAPE, 0, 4)
    assert editor.SaveStateForUndo()
    SceneLogic.writeLabelmap(labelmap_from_mask(result, m, extent), seg, a, extent, editor)
    expected = existing.copy()
    expected[4] = result[4]
    assert np.array_equal(segment_mask(seg, a, volume), expected)
    assert np.array_equal(segment_mask(seg, b, volume), other)
    editor.Undo()
    assert np.array_equal(segment_mask(seg, a, volume), existing)


def test_a_failed_write_restores_a_segment_that_shares_its_layer(monkeypatch):
    """The backup is this segment alone (0/1), not its shared layer: restoring it must not absorb the
    other segment's voxels."""
    from PromiseSegmentSlicerLib.logic import SceneLogic
    from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, segment_mask

    app = make_app()
    volume, seg, a, b, m, existing, other = segment_with_content(app.scene)
    real_write = SceneLogic.writeLabelmap

    def write_then_fail(*args, **kwargs):
        real_write(*args, **kwargs)
        raise OSError("disk gone")

    monkeypatch.setattr(SceneLogic, "writeLabelmap", staticmethod(write_then_fail))
    with pytest.raises(OSError):
        SceneLogic()._writeNewOrExisting(
            labelmap_from_mask(np.ones(SHAPE, np.uint8), m), seg, a, ("x", (1, 0, 0)), None, None
        )
    assert np.array_equal(segment_mask(seg, a, volume), existing)
    assert np.array_equal(segment_mask(seg, b, volume), other)
