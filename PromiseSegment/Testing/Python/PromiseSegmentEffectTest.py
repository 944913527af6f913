"""Slicer-hosted test (run by Slicer's ctest): drive the ProMISe effect through qMRMLSegmentEditorWidget -
activate, click (simulated at a RAS position), preview, apply, undo, and runs cancelled from the console
and from the effect's own progress dialog."""
import os
import tempfile

import numpy as np
import qt
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class PromiseSegmentEffectTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_box_drag_preview_apply_undo()
        self.setUp()
        self.test_cancelled_run_changes_nothing()
        self.setUp()
        self.test_cancel_in_the_effect_progress_dialog_changes_nothing()

    def _scene(self):
        from PromiseSegmentLib.sample_data import make_sample_volume
        from PromiseSegmentSlicerLib.mrml import volume_node_from_array

        vol, truth = make_sample_volume(0)
        volume = volume_node_from_array(slicer.mrmlScene, vol.array, vol.ijk_to_ras, "sample")
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
        return vol, truth, volume, seg, sid, editor

    def test_box_drag_preview_apply_undo(self):
        from PromiseSegmentSlicerLib.mrml import segment_mask

        vol, truth, volume, seg, sid, editor = self._scene()
        editor.setActiveEffectByName("ProMISe")
        effect = editor.activeEffect()
        self.assertIsNotNone(effect, "the ProMISe effect is registered")
        effect.setParameter("Mode", "box")  # LiteMedSAM's native prompt, the default backbone
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        (j0, i0), (j1, i1) = np.argwhere(truth[k]).min(0) - 2, np.argwhere(truth[k]).max(0) + 2
        normal = vol.ijk_to_ras[:3, 2] / np.linalg.norm(vol.ijk_to_ras[:3, 2])
        for (i, j), pressed in (((i0, j0), True), ((i1, j1), False)):  # drag from corner to corner
            ras = (vol.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]
            effect.self().boxEvent(list(ras), list(normal), pressed)
        preview = effect.self().previewNode
        self.assertIsNotNone(preview, "releasing the drag shows a preview")
        self.assertFalse(segment_mask(seg, sid, volume).any(), "the preview does not touch the segment")
        effect.self().onApply()
        written = segment_mask(seg, sid, volume)
        self.assertTrue(written[k].any())
        self.assertFalse(np.delete(written, k, axis=0).any(), "current-slice scope writes one slice")
        editor.undo()
        self.assertFalse(segment_mask(seg, sid, volume).any(), "one undo step reverts Apply")

    def test_cancelled_run_changes_nothing(self):
        import PromiseSegment
        from PromiseSegmentLib.engine import Cancelled
        from PromiseSegmentSlicerLib.mrml import segment_mask

        vol, truth, volume, seg, sid, editor = self._scene()
        before = seg.GetSegmentation().GetNumberOfSegments()
        with self.assertRaises(Cancelled):
            PromiseSegment.sharedLogic().segmentVolume(volume, seg, boxes=[(30, 30, 8, 50, 50, 8)], mode="vanilla",
                                                       cancel=lambda: True)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), before)
        self.assertFalse(segment_mask(seg, sid, volume).any())

    def test_cancel_in_the_effect_progress_dialog_changes_nothing(self):
        """Whole-volume scope with an (untrained) adapter; Cancel is pressed in the effect's progress dialog
        while slices are being segmented: the segment stays empty and there is nothing to undo."""
        from PromiseSegmentLib.adapter import save_adapter
        from PromiseSegmentLib.backbone import load_backbone
        from PromiseSegmentLib.training import TrainConfig, build_adapter
        from PromiseSegmentSlicerLib.mrml import segment_mask

        vol, truth, volume, seg, sid, editor = self._scene()
        folder = tempfile.mkdtemp()
        adapterPath = os.path.join(folder, "untrained.safetensors")
        save_adapter(build_adapter(TrainConfig(apm_fusion_dim=16, apm_tap_pool=2), load_backbone()), adapterPath)
        editor.setActiveEffectByName("ProMISe")
        effect = editor.activeEffect()
        effect.setParameter("Adapter", adapterPath)
        effect.setParameter("Scope", "whole volume")
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
