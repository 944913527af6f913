"""Slicer-hosted test (run by Slicer's ctest): drive the ProMISe effect through qMRMLSegmentEditorWidget.

What it needs: a Slicer with GUI (the effect's widgets and a slice view). The torch-free part always
runs: the effect registers, its parameters round-trip without the GUI overwriting what was typed, a
press before the model is loaded is consumed without any set-up, clicks under a transformed volume find
their voxel. The model part (load, box drag, preview, apply, undo, cancel) also needs torch and the
packages of ``Resources/requirements.txt`` already installed - the extensions dashboard runs tests with
installs skipped - and is skipped with a message naming what is missing (ctest runs each ``test_*``
method itself, so each model test checks; ``runTest`` is what Slicer's Reload and Test button calls)."""

import os
import tempfile

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


def phantom(shape=(16, 64, 64)):
    """A torch-free test volume: a bright ellipsoid on a noisy background, and its mask."""
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    truth = (((k - 8) / 5.0) ** 2 + ((j - 32) / 14.0) ** 2 + ((i - 30) / 16.0) ** 2 <= 1).astype(np.uint8)
    image = 100 + 400.0 * truth + np.random.default_rng(0).normal(0, 20, shape)
    ijk_to_ras = np.diag([0.8, 0.8, 2.5, 1.0])
    ijk_to_ras[:3, 3] = (-20.0, 10.0, 40.0)
    return image.astype(np.int16), truth, ijk_to_ras


class PromiseSegmentEffectTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        for test in (
            self.test_effect_registers_and_parameters_round_trip,
            self.test_press_before_the_model_is_loaded_is_consumed_without_setup,
            self.test_click_under_a_transform_finds_its_voxel,
        ):
            self.setUp()
            test()
        from PromiseSegmentSlicerLib.dependencies import missing_message

        if missing_message():
            self.delayDisplay(f"model tests skipped: PromiseSegment {missing_message()}")
            return
        for test in (
            self.test_box_drag_preview_apply_undo,
            self.test_cancelled_run_changes_nothing,
            self.test_cancel_in_the_effect_progress_dialog_changes_nothing,
        ):
            self.setUp()
            test()

    def requirePackages(self):
        from PromiseSegmentSlicerLib.dependencies import missing_message

        if missing_message():
            self.skipTest(f"PromiseSegment {missing_message()}")

    def _scene(self):
        from PromiseSegmentSlicerLib.mrml import volume_node_from_array

        image, truth, m = phantom()
        volume = volume_node_from_array(slicer.mrmlScene, image, m, "phantom")
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        sid = seg.GetSegmentation().AddEmptySegment("lesion")
        editor = slicer.qMRMLSegmentEditorWidget()
        editor.setMRMLScene(slicer.mrmlScene)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor.setMRMLSegmentEditorNode(node)
        editor.setSegmentationNode(seg)
        editor.setSourceVolumeNode(volume)
        editor.setCurrentSegmentID(sid)
        editor.show()
        return image, truth, m, volume, seg, sid, editor

    def _effect(self, editor):
        editor.setActiveEffectByName("ProMISe")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the ProMISe effect is registered")
        return effect

    # ------------------------------------------------------------------ torch-free
    def test_effect_registers_and_parameters_round_trip(self):
        *_, editor = self._scene()
        effect = self._effect(editor)
        widget = effect.self()
        self.assertEqual(effect.parameter("PromptTool"), "box", "box is the default prompt (LiteMedSAM)")
        widget.customWindow.checked = True
        widget.windowCenter.value = 55.0  # each write fires updateGUIFromMRML; it must not undo the others
        widget.windowWidth.value = 350.0
        self.assertEqual((effect.doubleParameter("WindowCenter"), effect.doubleParameter("WindowWidth")), (55.0, 350.0))
        self.assertEqual((widget.windowCenter.value, widget.windowWidth.value), (55.0, 350.0))
        effect.setParameter("WindowWidth", 123.0)  # and an outside change still reaches the GUI
        self.assertEqual(widget.windowWidth.value, 123.0)

    def test_press_before_the_model_is_loaded_is_consumed_without_setup(self):
        """With a logic that holds no model - whatever earlier tests of this Slicer session loaded."""
        import PromiseSegment

        saved, PromiseSegment._shared_logic = PromiseSegment._shared_logic, None
        try:
            *_, editor = self._scene()
            effect = self._effect(editor)
            sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
            interactor = sliceWidget.sliceView().interactor()
            consumed = effect.self().processInteractionEvents(
                interactor, vtk.vtkCommand.LeftButtonPressEvent, sliceWidget
            )
            self.assertTrue(consumed, "the press does not go on to window/level")
            self.assertIsNone(PromiseSegment.sharedLogic().coreIfInstalled, "nothing was installed or loaded")
            self.assertIn("Load model", effect.self().statusLabel.text)
        finally:
            PromiseSegment._shared_logic = saved

    def test_click_under_a_transform_finds_its_voxel(self):
        from PromiseSegmentSlicerLib.interaction import ClickSession
        from PromiseSegmentSlicerLib.mrml import vtk_matrix

        image, truth, m, volume, seg, sid, editor = self._scene()
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
        toWorld = np.eye(4)
        toWorld[:3, 3] = (20.0, 0.0, 10.0)
        transform.SetMatrixTransformToParent(vtk_matrix(toWorld))
        volume.SetAndObserveTransformNodeID(transform.GetID())
        world = (toWorld @ m @ np.array([30, 30, 10, 1.0]))[:3]
        index, ijk = ClickSession(None).locate(volume, list(world), [0.0, 0.0, 1.0])
        self.assertEqual(index, 10)
        self.assertTrue(np.allclose(ijk, (30, 30, 10)))

    # ------------------------------------------------------------------ with the model
    def test_box_drag_preview_apply_undo(self):
        self.requirePackages()
        from PromiseSegmentSlicerLib.mrml import segment_mask

        image, truth, m, volume, seg, sid, editor = self._scene()
        effect = self._effect(editor)
        effect.self().onLoadModel()  # the default backbone, LiteMedSAM, offline
        self.assertTrue(effect.self().loadedLogic() is not None, "Load model loaded the model")
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        (j0, i0), (j1, i1) = np.argwhere(truth[k]).min(0) - 2, np.argwhere(truth[k]).max(0) + 2
        normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
        for (i, j), pressed in (((i0, j0), True), ((i1, j1), False)):  # drag from corner to corner
            ras = (m @ np.array([i, j, k, 1.0]))[:3]
            effect.self().boxEvent(list(ras), list(normal), pressed)
        self.assertIsNotNone(effect.self().previewNode, "releasing the drag shows a preview")
        self.assertFalse(segment_mask(seg, sid, volume).any(), "the preview does not touch the segment")
        effect.self().onApply()
        written = segment_mask(seg, sid, volume)
        dice = 2 * (written[k] & truth[k]).sum() / (written[k].sum() + truth[k].sum())
        self.assertGreater(dice, 0.8, "LiteMedSAM segments the boxed ellipse")
        self.assertFalse(np.delete(written, k, axis=0).any(), "current-slice scope writes one slice")
        editor.undo()
        self.assertFalse(segment_mask(seg, sid, volume).any(), "one undo step reverts Apply")

    def test_cancelled_run_changes_nothing(self):
        self.requirePackages()
        import PromiseSegment
        from PromiseSegmentLib.errors import Cancelled
        from PromiseSegmentSlicerLib.mrml import segment_mask

        image, truth, m, volume, seg, sid, editor = self._scene()
        before = seg.GetSegmentation().GetNumberOfSegments()
        with self.assertRaises(Cancelled):
            PromiseSegment.sharedLogic().segmentVolume(
                volume, seg, boxes=[(16, 20, 8, 46, 46, 8)], mode="vanilla", cancel=lambda: True
            )
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), before)
        self.assertFalse(segment_mask(seg, sid, volume).any())

    def test_cancel_in_the_effect_progress_dialog_changes_nothing(self):
        """Whole-volume scope with an (untrained) adapter; Cancel is pressed in the effect's progress dialog
        while slices are being segmented: the segment stays empty and there is nothing to undo."""
        self.requirePackages()
        from PromiseSegmentLib.backbones.registry import load_backbone
        from PromiseSegmentLib.model.adapter import save_adapter
        from PromiseSegmentLib.training.config import TrainConfig
        from PromiseSegmentLib.training.setup import build_adapter
        from PromiseSegmentSlicerLib.mrml import segment_mask

        image, truth, m, volume, seg, sid, editor = self._scene()
        adapterPath = os.path.join(tempfile.mkdtemp(), "untrained.safetensors")
        save_adapter(build_adapter(TrainConfig(apm_fusion_dim=16, apm_tap_pool=2), load_backbone()), adapterPath)
        effect = self._effect(editor)
        effect.setParameter("Adapter", adapterPath)
        effect.setParameter("Scope", "whole volume")
        effect.self().onLoadModel()
        pressed = []

        def pressCancel():
            if effect.self().progress is not None and not pressed:
                pressed.append(True)
                effect.self().progress.dialog.cancel()

        timer = qt.QTimer()
        timer.setInterval(0)
        timer.connect("timeout()", pressCancel)  # runs whenever the effect processes events between slices
        timer.start()
        try:
            effect.self().onApply()
        finally:
            timer.stop()
        self.assertTrue(pressed, "the run showed a progress dialog and Cancel was pressed")
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertFalse(segment_mask(seg, sid, volume).any(), "a cancelled run leaves the segment unchanged")
        self.assertFalse(slicer.util.findChild(editor, "UndoButton").enabled, "nothing to undo after a cancelled run")
