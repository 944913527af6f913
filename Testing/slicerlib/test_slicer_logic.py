"""SceneLogic on real Slicer MRML (``slicer-core``): geometry, slice ranges, cancel, the Segment
Editor's masking and undo, RGB photos, propagation, training from segmentation nodes."""

import numpy as np
import pytest
from slicer_scene import add_segmentation, add_volume, ellipsoid, make_app, oblique_matrix, write_mask

from PromiseSegmentLib.data.preprocessing import IntensityRule, resolve_axis, take_slice
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.recipe import RunOptions
from PromiseSegmentLib.training.setup import build_adapter

SHAPE = (9, 40, 44)  # K, J, I


@pytest.fixture
def app():
    return make_app()


@pytest.fixture(scope="module")
def logic():
    from PromiseSegmentSlicerLib.logic import SceneLogic

    return SceneLogic(backbone="tiny_random")  # the fast fixture; LiteMedSAM has its own tests


@pytest.fixture(scope="module")
def adapter():
    """An untrained (but complete) APM+IPS adapter for the embedded backbone: automatic mode on every slice."""
    from PromiseSegmentLib.backbones.registry import BACKBONES

    cfg = TrainConfig(apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1), seed=3)
    return build_adapter(cfg, BACKBONES["tiny_random"].load()).eval()


def phantom(seed=0):
    rng = np.random.default_rng(seed)
    truth = ellipsoid(SHAPE, (4, 18, 24), (3, 9, 11))
    image = 100 + 400.0 * truth + rng.normal(0, 20, SHAPE)
    return image.astype(np.int16), truth


def test_written_mask_lands_on_the_truth_voxels_of_an_oblique_anisotropic_volume(app):
    import slicer
    import vtk

    from PromiseSegmentSlicerLib.mrml import node_matrix, segment_mask, volume_ijk_to_ras

    image, truth = phantom()
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")  # no reference geometry yet
    sid = seg.GetSegmentation().AddEmptySegment("t", "t")
    write_mask(truth, volume_ijk_to_ras(volume), seg, sid)
    assert np.array_equal(segment_mask(seg, sid, volume), truth)
    # and in world coordinates: the stored labelmap's voxel centres are the truth's RAS points
    stored = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, sid, stored)
    world = vtk.vtkMatrix4x4()
    stored.GetImageToWorldMatrix(world)
    assert np.allclose(node_matrix(world), m, atol=1e-6)


@pytest.mark.parametrize("axis", ["K", "J", "I"])
def test_segment_volume_equals_the_core_result_along_every_axis(app, logic, adapter, axis):
    from PromiseSegmentSlicerLib.mrml import segment_mask

    image, _ = phantom()
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    seg = add_segmentation(app.scene, volume)
    model = logic.loadModel(adapter=adapter)
    expected = model.segment_volume(image, m, axis=axis)
    assert expected.any()
    sid = logic.segmentVolume(volume, seg, adapter=adapter, axis=axis)
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "Segment"
    assert np.array_equal(segment_mask(seg, sid, volume), expected)


def test_clicks_in_ijk_reach_the_right_slice_pixels(app, logic):
    from PromiseSegmentLib.data.prompts import Prompts

    image, truth = phantom()
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    model = logic.loadModel()
    for axis, point in (("K", (24, 18, 4)), ("J", (24, 18, 4)), ("I", (24, 18, 4))):
        ax = resolve_axis(axis, m)
        index = point[2 - ax]
        got = logic.segmentSlice(volume, index, axis, points=[point + (1,)], mode="vanilla")
        # the same click expressed directly in the slice's pixels (x = column, y = row)
        row, col = {0: (1, 2), 1: (0, 2), 2: (0, 1)}[ax]
        ijk_kji = (point[2], point[1], point[0])
        direct = model.segment_slice(
            image, m, ax, index, Prompts([[ijk_kji[col], ijk_kji[row]]], [1]), mode="vanilla"
        ).masks[0]
        assert got.shape == take_slice(truth, ax, index).shape
        assert np.array_equal(got, direct)


def test_second_run_on_the_same_slice_reuses_the_embedding(app, logic):
    image, _ = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    logic.segmentSlice(volume, 4, points=[(24, 18, 4, 1)], mode="vanilla")
    hits, misses = logic.embeddingCache.hits, logic.embeddingCache.misses
    logic.segmentSlice(volume, 4, points=[(24, 18, 4, 1), (2, 2, 4, 0)], mode="vanilla")
    assert (logic.embeddingCache.hits, logic.embeddingCache.misses) == (hits + 1, misses)
    image[4] += 1  # edited voxels: the cached embedding must not be reused
    import slicer

    slicer.util.updateVolumeFromArray(volume, image)
    logic.segmentSlice(volume, 4, points=[(24, 18, 4, 1)], mode="vanilla")
    assert logic.embeddingCache.misses == misses + 1


def test_slice_range_changes_only_those_slices_of_an_existing_segment(app, logic, adapter):
    from PromiseSegmentSlicerLib.mrml import segment_mask, volume_ijk_to_ras

    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    sid = seg.GetSegmentation().AddEmptySegment("lesion", "lesion")
    write_mask(truth, volume_ijk_to_ras(volume), seg, sid)
    with pytest.raises(InputError, match="already has content"):
        logic.segmentVolume(volume, seg, sid, adapter=adapter, sliceRange=(2, 3))
    assert np.array_equal(segment_mask(seg, sid, volume), truth)  # refused: nothing changed
    logic.segmentVolume(volume, seg, sid, adapter=adapter, sliceRange=(2, 3), overwrite=True)
    after = segment_mask(seg, sid, volume)
    expected = logic.loadModel(adapter=adapter).segment_volume(image, volume_ijk_to_ras(volume), slice_range=(2, 3))
    keep = [k for k in range(SHAPE[0]) if k not in (2, 3)]
    assert np.array_equal(after[keep], truth[keep])
    assert np.array_equal(after[2:4], expected[2:4])


def test_cancel_leaves_the_segmentation_and_undo_history_unchanged(app, logic, adapter):
    from PromiseSegmentSlicerLib.mrml import segment_mask

    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    sid = seg.GetSegmentation().AddEmptySegment("a", "a")
    editor, _ = app.editor(seg, volume, sid)
    calls = []
    with pytest.raises(Cancelled):
        logic.segmentVolume(
            volume,
            seg,
            adapter=adapter,
            editorLogic=editor,
            progress=lambda done, total: calls.append(done),
            cancel=lambda: len(calls) >= 2,
        )
    assert len(calls) == 2
    assert seg.GetSegmentation().GetNumberOfSegments() == 1  # no half-made segment
    assert not editor.CanUndo()
    assert not segment_mask(seg, sid, volume).any()


@pytest.mark.parametrize("through_editor", [False, True])
def test_a_write_that_fails_half_way_leaves_the_scene_as_it_was(app, logic, adapter, monkeypatch, through_editor):
    """The write itself fails after changing the segment (memory, a VTK error): a new segment is removed,
    a replaced one gets its voxels back, on the editor path the saved state is restored."""
    from PromiseSegmentSlicerLib.logic import SceneLogic
    from PromiseSegmentSlicerLib.mrml import segment_mask, volume_ijk_to_ras

    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    kept = seg.GetSegmentation().AddEmptySegment("kept", "kept")
    write_mask(truth, volume_ijk_to_ras(volume), seg, kept)
    editor = app.editor(seg, volume, kept)[0] if through_editor else None
    real_write = SceneLogic.writeLabelmap

    def write_then_fail(labelmap, segmentationNode, segmentId, extent=None, editorLogic=None):
        real_write(labelmap, segmentationNode, segmentId, extent, editorLogic)
        raise MemoryError("simulated failure after the voxels were written")

    monkeypatch.setattr(SceneLogic, "writeLabelmap", staticmethod(write_then_fail))
    for target in (None, kept):  # a new segment, then overwriting the existing one
        with pytest.raises(MemoryError):
            logic.segmentVolume(volume, seg, target, adapter=adapter, overwrite=True, editorLogic=editor)
        assert seg.GetSegmentation().GetNumberOfSegments() == 1
        assert np.array_equal(segment_mask(seg, kept, volume), truth)


def test_editor_path_honours_overwrite_and_editable_area_and_undoes_in_one_step(app, logic, adapter):
    import slicer

    from PromiseSegmentSlicerLib.mrml import segment_mask, volume_ijk_to_ras

    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    segmentation = seg.GetSegmentation()
    a = segmentation.AddEmptySegment("a", "a")
    b = segmentation.AddEmptySegment("b", "b")
    m = volume_ijk_to_ras(volume)
    other = np.zeros(SHAPE, np.uint8)
    other[:, :20, :] = 1  # segment b: the upper half of every slice
    write_mask(other, m, seg, b)
    editor, node = app.editor(seg, volume, a)
    predicted = logic.loadModel(adapter=adapter).segment_volume(image, m)
    assert (predicted & other).any() and (predicted & (1 - other)).any()

    logic.segmentVolume(volume, seg, a, adapter=adapter, editorLogic=editor)
    got_a, got_b = segment_mask(seg, a, volume), segment_mask(seg, b, volume)
    assert np.array_equal(got_a, predicted)
    assert np.array_equal(got_b, other & (1 - predicted))  # default: overwrite other segments
    editor.Undo()
    assert not segment_mask(seg, a, volume).any()
    assert np.array_equal(segment_mask(seg, b, volume), other)

    # editable area = inside segment b: the result is clipped to it, b itself is kept
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(b)
    node.SetOverwriteMode(node.OverwriteNone)
    logic.segmentVolume(volume, seg, a, adapter=adapter, editorLogic=editor, overwrite=True)
    assert np.array_equal(segment_mask(seg, a, volume), predicted & other)
    assert np.array_equal(segment_mask(seg, b, volume), other)
    editor.Undo()
    assert not segment_mask(seg, a, volume).any()


def test_rgb_photo_as_single_slice_vector_volume(app, logic, make_image):
    rgb = make_image(np.random.default_rng(0), 60, 80)
    volume = add_volume(app.scene, rgb[None], np.diag([0.5, 0.5, 1.0, 1.0]), "photo", vector=True)
    seg = add_segmentation(app.scene, volume)
    mask = logic.segmentSlice(volume, 0, points=[(44, 27, 0, 1)], mode="vanilla")
    assert mask.shape == (60, 80) and mask.any()
    sid = logic.segmentVolume(volume, seg, points=[(44, 27, 0, 1)], mode="vanilla")
    from PromiseSegmentSlicerLib.mrml import segment_mask

    assert np.array_equal(segment_mask(seg, sid, volume)[0], mask)


def test_unusable_inputs_are_refused_clearly(app, logic):
    import slicer

    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    with pytest.raises(InputError, match="not in"):
        logic.segmentVolume(volume, seg, "nope", points=[(24, 18, 4, 1)], mode="vanilla")
    with pytest.raises(InputError, match="not on slice 5"):
        logic.segmentSlice(volume, 5, points=[(24, 18, 4, 1)], mode="vanilla")
    with pytest.raises(InputError, match="outside"):
        logic.segmentSlice(volume, 40, points=[(24, 18, 40, 1)], mode="vanilla")
    label = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(label, truth)
    with pytest.raises(InputError, match="label map"):
        logic.segmentSlice(label, 4, points=[(24, 18, 4, 1)], mode="vanilla")
    two = add_volume(app.scene, np.zeros((2, 8, 8, 2), np.uint8), np.eye(4), "two", vector=True)
    with pytest.raises(InputError, match="components"):
        logic.segmentSlice(two, 0, points=[(2, 2, 0, 1)], mode="vanilla")
    assert seg.GetSegmentation().GetNumberOfSegments() == 0


def test_propagation_walks_neighbours_and_stops_at_the_volume_end(app, logic, adapter):
    image, truth = phantom()
    volume = add_volume(app.scene, image, oblique_matrix())
    model = logic.loadModel(adapter=adapter)
    start = truth[4].astype(bool)
    with pytest.raises(InputError, match="empty"):
        logic.propagate(volume, "K", 4, np.zeros_like(start), model=model)
    steps = []
    out = logic.propagate(
        volume,
        "K",
        4,
        start,
        direction=1,
        minAreaFraction=0.0,
        minIntensityAgreement=0.0,
        model=model,
        progress=lambda d, t: steps.append((d, t)),
    )
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(out) == [5, 6, 7, 8]  # with no stop rule it walks to the volume's end
    with pytest.raises(Cancelled):
        logic.propagate(volume, "K", 4, start, model=model, minAreaFraction=0.0, cancel=lambda: True)


def test_propagation_with_the_default_backbone_follows_the_object_to_its_ends(app):
    """LiteMedSAM (the real default) from the middle slice of a bright ellipsoid: both directions reach
    the object's last slices with good overlap, and nothing is written beyond them."""
    from PromiseSegmentSlicerLib.logic import SceneLogic

    shape = (13, 64, 64)
    truth = ellipsoid(shape, (6, 32, 30), (5, 18, 20))
    image = (100 + 400.0 * truth + np.random.default_rng(0).normal(0, 20, shape)).astype(np.int16)
    volume = add_volume(app.scene, image, np.diag([0.8, 0.8, 2.0, 1.0]))
    present = [k for k in range(shape[0]) if truth[k].sum() >= 20]
    out = SceneLogic().propagate(volume, "K", 6, truth[6].astype(bool))
    assert set(present) - {6} <= set(out), f"stopped early: reached {sorted(out)} of {present}"
    assert set(out) <= set(range(present[0] - 1, present[-1] + 2)), "ran past the object's ends"
    for k in present:
        if k != 6:
            got = out[k]
            assert 2 * (got & (truth[k] > 0)).sum() / (got.sum() + truth[k].sum()) > 0.85, k


def test_train_adapter_from_segmentation_nodes(app, logic, tmp_path):
    from PromiseSegmentLib.model.adapter import read_metadata
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras

    pairs = []
    for seed in (0, 1):
        image, truth = phantom(seed)
        volume = add_volume(app.scene, image, oblique_matrix(), f"v{seed}")
        seg = add_segmentation(app.scene, volume)
        sid = seg.GetSegmentation().AddEmptySegment("lesion", "lesion")
        write_mask(truth, volume_ijk_to_ras(volume), seg, sid)
        pairs.append((volume, seg, sid))
    cases = logic.trainingCases(pairs, IntensityRule(), emptyShare=0.0)
    assert len(cases) == 2 * int(truth.any(axis=(1, 2)).sum())
    cfg = TrainConfig(
        epochs=1,
        batch_size=4,
        lr=1e-3,
        augment=False,
        cache_features=True,
        apm_fusion_dim=16,
        apm_head_blocks=(1, 1, 1, 1),
        target_name="Lesion",
    )
    out = tmp_path / "lesion.safetensors"
    result = logic.trainAdapter(pairs, out, config=cfg)  # only the annotated slices: not --dense
    assert out.exists() and read_metadata(out).target_name == "Lesion"
    assert read_metadata(out).training["train_cases"] + read_metadata(out).training["val_cases"] == len(cases)
    volume, seg, _ = pairs[0]
    sid = logic.segmentVolume(volume, seg, adapter=str(out), sliceRange=(3, 4))
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "Lesion"
    assert result.history and np.isfinite(result.history[0].loss)


def test_training_pairs_are_found_across_the_scene(app):
    """A cohort in one scene: each segmentation with the named segment, paired with its own volume."""
    from PromiseSegmentSlicerLib.mrml import volume_ijk_to_ras
    from PromiseSegmentSlicerLib.scene import training_pairs_in_scene

    volumes = []
    for n, name in enumerate(("Lesion", "lesion ", "liver")):
        image, truth = phantom(n)
        volume = add_volume(app.scene, image, oblique_matrix(), f"case{n}")
        seg = add_segmentation(app.scene, volume, f"seg{n}")
        sid = seg.GetSegmentation().AddEmptySegment("", name)
        write_mask(truth, volume_ijk_to_ras(volume), seg, sid)
        volumes.append(volume)
    empty = add_segmentation(app.scene, volumes[0], "empty")
    empty.GetSegmentation().AddEmptySegment("", "Lesion")
    orphan = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "orphan")  # loaded from a file, no volume
    sid = orphan.GetSegmentation().AddEmptySegment("", "Lesion")
    write_mask(phantom()[1], volume_ijk_to_ras(volumes[2]), orphan, sid)

    pairs, skipped = training_pairs_in_scene(app.scene, "LESION")
    assert [(v.GetName(), s.GetName()) for v, s, _ in pairs] == [("case0", "seg0"), ("case1", "seg1")]
    assert [s.GetSegmentation().GetSegment(i).GetName() for _, s, i in pairs] == ["Lesion", "lesion "]
    assert [x.split()[0] for x in skipped] == ["empty", "orphan"]
    pairs, skipped = training_pairs_in_scene(app.scene, "lesion", {orphan.GetID(): volumes[2]})
    assert [v.GetName() for v, _, _ in pairs] == ["case0", "case1", "case2"] and len(skipped) == 1


@pytest.mark.data
def test_mr_volume_end_to_end_with_its_real_label_map(app, logic, tmp_path, data_dir):
    """brain1 (MR, 0.78x0.78x6.5 mm): label map -> segment (exact), train an adapter from the segmentation
    node, segment the tumour slices automatically into a new segmentation, save .seg.nrrd, read it back
    with the core on the volume's own geometry."""
    import slicer
    from slicer_scene import load_nrrd, save_segmentation

    from PromiseSegmentLib.data.volume_io import read_labelmap, read_volume
    from PromiseSegmentSlicerLib.logic import SceneLogic
    from PromiseSegmentSlicerLib.mrml import segment_mask

    folder = data_dir / "mr-volumes"
    volume = load_nrrd(app.scene, folder / "brain1_image.nrrd")
    label = load_nrrd(app.scene, folder / "brain1_label.nrrd", labelmap=True)
    truth = slicer.util.arrayFromVolume(label) > 0
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "expert")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label, seg)
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    assert np.array_equal(segment_mask(seg, sid, volume), truth)

    cfg = TrainConfig(
        epochs=1,
        batch_size=4,
        lr=1e-3,
        augment=False,
        cache_features=True,
        apm_fusion_dim=16,
        apm_tap_pool=2,
        target_name="Tumour",
    )
    default = SceneLogic()  # the default backbone, LiteMedSAM
    dense = RunOptions(dense=True, empty_share=0.2)  # every slice annotated: a few empty ones too
    result = default.trainAdapter([(volume, seg, sid)], tmp_path / "tumour.safetensors", options=dense, config=cfg)
    assert result.adapter.backbone.name == "lite_medsam" and result.adapter.apm.prompts == ("box",)
    assert result.adapter.training["train_cases"] >= 2

    slices = np.nonzero(truth.any(axis=(1, 2)))[0]
    out_seg = add_segmentation(app.scene, volume, "promise")
    j, i = np.nonzero(truth.any(axis=0))
    box = (int(i.min()) - 3, int(j.min()) - 3, int(slices.min()), int(i.max()) + 3, int(j.max()) + 3, int(slices.max()))
    new = default.segmentVolume(
        volume,
        out_seg,
        adapter=str(tmp_path / "tumour.safetensors"),
        boxes=[box],
        sliceRange=(int(slices.min()), int(slices.max())),
    )  # the user's box + IPS
    written = segment_mask(out_seg, new, volume)
    outside = np.ones(truth.shape[0], bool)
    outside[slices.min() : slices.max() + 1] = False
    assert not written[outside].any()
    save_segmentation(out_seg, tmp_path / "brain1.seg.nrrd")
    back = read_labelmap(tmp_path / "brain1.seg.nrrd")
    reference = read_volume(folder / "brain1_image.nrrd")
    assert written.any()  # what matters here is where the voxels land, not how good they are
    # Slicer crops a saved segmentation to its content: compare the voxels in RAS
    ras = back.ijk_to_ras @ np.c_[np.argwhere(back.array > 0)[:, ::-1], np.ones(int((back.array > 0).sum()))].T
    ijk = np.linalg.inv(reference.ijk_to_ras) @ ras
    voxels = set(map(tuple, np.round(ijk[:3].T[:, ::-1]).astype(int)))
    assert voxels == set(map(tuple, np.argwhere(written)))


def test_a_labelmap_takes_over_the_mask_memory_and_outlives_the_array(app):
    import gc

    from vtk.util import numpy_support

    from PromiseSegmentSlicerLib.mrml import labelmap_from_mask

    mask = np.zeros((4, 5, 6), np.uint8)
    mask[1:3, 2:4, 1:5] = 1
    expected = mask.copy()
    labelmap = labelmap_from_mask(mask, oblique_matrix())
    scalars = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    assert np.shares_memory(scalars, mask)  # no second whole-volume copy
    del mask, scalars
    gc.collect()
    np.testing.assert_array_equal(
        numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(4, 5, 6), expected
    )
    one_slice = labelmap_from_mask(expected, oblique_matrix(), (0, 5, 0, 4, 1, 1))
    assert one_slice.GetPointData().GetScalars().GetNumberOfTuples() == 30  # a sub-block is its own copy


@pytest.mark.slow
def test_segment_cohort_from_the_console_with_one_model_and_cancel(cohort, ct_adapter, tmp_path):
    """``segmentCohort``: the command line's cohort run on the logic's model (loaded once, kept), progress
    per case, and a cancel that keeps the finished cases; the scene is not touched."""
    from PromiseSegmentSlicerLib.logic import SceneLogic

    scans, out = cohort
    logic, seen = SceneLogic(), []
    result = logic.segmentCohort([scans], out, str(ct_adapter), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and result.table.counts() == {"done": 4, "skipped": 0, "failed": 3}
    backbone = logic._backbone
    again = tmp_path / "again"
    with pytest.raises(Cancelled):
        logic.segmentCohort([scans], again, str(ct_adapter), cancel=lambda: (again / "results.csv").exists())
    assert logic._backbone is backbone  # no second load
    import csv

    with open(again / "results.csv", newline="") as f:
        kept = list(csv.DictReader(f))
    assert 1 <= len(kept) < 7 and all((again / f"{r['case']}.seg.nrrd").exists() for r in kept if r["status"] == "done")
