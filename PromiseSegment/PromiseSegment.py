"""PromiseSegment scripted module (3D Slicer): module declaration, parameter node, a thin widget and
``PromiseSegmentLogic`` for the Python console.

Everything the widget and the Segment Editor effect do is a call into
``PromiseSegmentSlicerLib.logic.PromiseSegmentLogic`` (Qt-free, tested with pytest on slicer-core);
the algorithms live in ``PromiseSegmentLib`` (torch/numpy only). Nothing heavy is imported here:
torch & co. are installed on first use, after asking.
"""
import os
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from PromiseSegmentLib.names import USER_BACKBONES

BACKBONES = list(USER_BACKBONES)  # from the torch-free names module: the registry needs torch


class PromiseSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PromiseSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["PromiseSegment developers"]
        self.parent.helpText = (
            "ProMISe: a frozen Segment Anything Model with an Auto-Prompting Module and Incremental Pattern "
            "Shifting, for automatic and click-refined segmentation. Segment interactively with the "
            "<b>ProMISe</b> effect of the Segment Editor; here: choose the backbone, manage and train "
            "adapters, segment whole volumes.")
        self.parent.acknowledgementText = (
            "Uses Segment Anything (Meta AI, Apache-2.0) and LiteMedSAM (bowang-lab/MedSAM, Apache-2.0; weights "
            "distilled from MedSAM, trained on public medical data sets with their own terms).")
        slicer.app.connect("startupCompleted()", registerEditorEffect)


def registerEditorEffect():
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    path = os.path.join(os.path.dirname(__file__), "SegmentEditorPromiseSegmentLib", "SegmentEditorEffect.py")
    instance.setPythonSource(path.replace("\\", "/"))
    instance.self().register()


@parameterNodeWrapper
class PromiseSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    backbone: Annotated[str, Choice(BACKBONES)] = BACKBONES[0]
    backboneFile: str = ""
    adapterFile: str = ""
    axis: Annotated[str, Choice(["axial", "coronal", "sagittal", "K", "J", "I"])] = "axial"
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    trainSegmentName: str = ""
    trainEpochs: Annotated[int, WithinRange(1, 1000)] = 50
    trainOutput: str = ""


_shared_logic = None


def sharedLogic():
    """One logic (one SAM in memory, one embedding cache) shared by the widget, the effect and the console."""
    global _shared_logic
    if _shared_logic is None:
        _shared_logic = PromiseSegmentLogic()
    return _shared_logic


class PromiseSegmentLogic(ScriptedLoadableModuleLogic):
    """Console API: ``segmentVolume``, ``segmentSlice``, ``predictVolume``, ``propagate``, ``trainAdapter``,
    ``loadModel`` ... (see ``PromiseSegmentSlicerLib/logic.py``). Dependencies are checked on first use."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    @property
    def core(self):
        """The Qt-free logic; the first access installs missing packages (after asking), so call it before
        importing anything from ``PromiseSegmentLib`` (which needs torch)."""
        if self._core is None:
            from PromiseSegmentSlicerLib import dependencies

            dependencies.ensure()
            from PromiseSegmentSlicerLib.logic import PromiseSegmentLogic as CoreLogic

            self._core = CoreLogic()
        return self._core

    def getParameterNode(self):
        return PromiseSegmentParameterNode(super().getParameterNode())

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.core, name)


def backboneSpec(parameterNode):
    """A checkpoint file overrides the registry choice."""
    return parameterNode.backboneFile or parameterNode.backbone


def deviceSpec(parameterNode):
    return None if parameterNode.device == "auto" else parameterNode.device


class ProgressWithCancel:
    """A modal progress dialog whose Cancel the logic polls (no threads: events are processed in between).

    As a context manager with ``errorMessage`` it also reports what went wrong: a cancelled run gets a
    status-bar line, a failure an error dialog (the logic has already left the scene as it was)."""

    def __init__(self, title, errorMessage=None):
        self.title, self.errorMessage = title, errorMessage
        self.dialog = slicer.util.createProgressDialog(windowTitle=title, labelText=title, maximum=100)
        self.dialog.setCancelButtonText("Cancel")

    def progress(self, done, total, *_):
        self.dialog.setValue(int(100 * done / max(total, 1)))
        slicer.app.processEvents()

    def cancelled(self):
        slicer.app.processEvents()
        return self.dialog.wasCanceled

    def close(self):
        self.dialog.close()

    def __enter__(self):
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, excType, exc, tb):
        qt.QApplication.restoreOverrideCursor()
        cancelled = self.dialog.wasCanceled
        self.close()
        if exc is None or self.errorMessage is None:
            return False
        if cancelled:
            slicer.util.showStatusMessage(f"{self.title}: cancelled, nothing was changed", 5000)
        else:
            import traceback

            slicer.util.errorDisplay(f"{self.errorMessage}\n\n{exc}",
                                     detailedText="".join(traceback.format_exception(excType, exc, tb)))
        return True


class PromiseSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def _field(self, layout, label, widget, parameter=None, tooltip=""):
        if parameter:
            widget.setProperty("SlicerParameterName", parameter)
        widget.toolTip = tooltip
        layout.addRow(label, widget)
        return widget

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.gui = qt.QWidget()
        self.layout.addWidget(self.gui)
        top = qt.QVBoxLayout(self.gui)

        model = ctkCollapsible("Model", top)
        self.checkpointCombo = self._field(model, "Backbone:", qt.QComboBox(), "backbone",
                                           "lite_medsam (default) ships with its Python package and works offline; "
                                           "sam_vit_b/l/h are downloaded once into your cache and SHA-256 verified")
        self.checkpointFile = self._field(model, "or local file:", qt.QLineEdit(), "backboneFile",
                                          "path to a LiteMedSAM/SAM/MedSAM .pth (overrides the choice above)")
        self.downloadButton = qt.QPushButton("Download / verify checkpoint")
        model.addRow(self.downloadButton)
        self.adapterFile = self._field(model, "Adapter:", qt.QLineEdit(), "adapterFile",
                                       "APM+IPS adapter (.safetensors); empty = plain SAM with your prompts")
        self.adapterCombo = qt.QComboBox()
        self.adapterCombo.toolTip = "adapters imported into your adapter folder"
        model.addRow("Installed adapters:", self.adapterCombo)
        self.importAdapterButton = qt.QPushButton("Import adapter file...")
        model.addRow(self.importAdapterButton)
        self.adapterInfo = qt.QLabel()
        self.adapterInfo.wordWrap = True
        model.addRow(self.adapterInfo)
        self.deviceCombo = self._field(model, "Device:", qt.QComboBox(), "device")

        run = ctkCollapsible("Segment a volume", top)
        self.volumeSelector = self._field(run, "Volume:", mrmlSelector(["vtkMRMLScalarVolumeNode"]), "inputVolume")
        self.segmentationSelector = self._field(run, "Segmentation:", mrmlSelector(["vtkMRMLSegmentationNode"], True),
                                                "segmentation")
        self.axisCombo = self._field(run, "Slice axis:", qt.QComboBox(), "axis")
        self.segmentButton = qt.QPushButton("Segment whole volume (new segment)")
        run.addRow(self.segmentButton)

        train = ctkCollapsible("Train an adapter from this scene", top, collapsed=True)
        self.trainSegment = self._field(train, "Segment name:", qt.QLineEdit(), "trainSegmentName",
                                        "every segmentation in the scene with a segment of this name is used, "
                                        "on the volume it was drawn on (a cohort loaded into one scene trains "
                                        "one adapter)")
        self.trainEpochs = self._field(train, "Epochs:", qt.QSpinBox(), "trainEpochs")
        self.trainOutput = self._field(train, "Save adapter as:", qt.QLineEdit(), "trainOutput")
        self.trainButton = qt.QPushButton("Train adapter (SAM stays frozen)")
        train.addRow(self.trainButton)
        top.addStretch(1)

        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        self.segmentationSelector.setMRMLScene(slicer.mrmlScene)
        self.logic = sharedLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.downloadButton.connect("clicked(bool)", self.onDownload)
        self.importAdapterButton.connect("clicked(bool)", self.onImportAdapter)
        self.adapterCombo.connect("activated(int)", self.onAdapterChosen)
        self.segmentButton.connect("clicked(bool)", self.onSegment)
        self.trainButton.connect("clicked(bool)", self.onTrain)
        self.initializeParameterNode()
        self.refreshAdapters()

    def cleanup(self):
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.gui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.updateButtons()

    def updateButtons(self, caller=None, event=None):
        p = self._parameterNode
        ready = bool(p and p.inputVolume and p.segmentation)
        self.segmentButton.enabled = ready
        self.trainButton.enabled = bool(p and p.trainSegmentName and p.trainOutput)
        if p and p.adapterFile and os.path.exists(p.adapterFile):
            from PromiseSegmentSlicerLib.adapters import describe

            self.adapterInfo.text = describe(p.adapterFile)
        else:
            self.adapterInfo.text = "no adapter: plain SAM, prompts needed"

    # ------------------------------------------------------------------ actions (all logic calls)
    def refreshAdapters(self):
        from PromiseSegmentSlicerLib.adapters import installed_adapters

        self.adapterCombo.clear()
        self.adapterCombo.addItem("(choose)", "")
        for path in installed_adapters():
            self.adapterCombo.addItem(path.stem, str(path))

    def onAdapterChosen(self, index):
        path = self.adapterCombo.itemData(index)
        if path:
            self._parameterNode.adapterFile = path

    def onImportAdapter(self):
        source = qt.QFileDialog.getOpenFileName(self.parent, "Import adapter", "", "Adapters (*.safetensors)")
        if not source:
            return
        with slicer.util.tryWithErrorDisplay("Could not import the adapter.", waitCursor=True):
            from PromiseSegmentSlicerLib.adapters import import_adapter

            self._parameterNode.adapterFile = str(import_adapter(source))
            self.refreshAdapters()

    def onDownload(self):
        spec = backboneSpec(self._parameterNode)
        with ProgressWithCancel(f"Getting / verifying {spec}",
                                "Checkpoint download or verification failed; nothing was kept.") as progress:
            self.logic.core  # noqa: B018  (first use: torch & co. are installed before the import below)
            from PromiseSegmentLib.backbone import BACKBONES

            if spec in BACKBONES:
                path = BACKBONES[spec].locate(progress=lambda done, total: progress.progress(done, total or 1),
                                              cancel=progress.cancelled)
            else:
                path = self.logic.loadBackbone(spec).path
            slicer.util.infoDisplay(f"Checkpoint ready and verified:\n{path}")

    def onSegment(self):
        p = self._parameterNode
        with ProgressWithCancel("ProMISe: segmenting",
                                "Segmentation failed; the segmentation was not changed.") as progress:
            self.logic.segmentVolume(p.inputVolume, p.segmentation, adapter=p.adapterFile or None,
                                     backbone=backboneSpec(p), axis=p.axis, device=deviceSpec(p),
                                     progress=progress.progress, cancel=progress.cancelled)

    def onTrain(self):
        p = self._parameterNode
        with ProgressWithCancel("ProMISe: training adapter", "Training failed.") as progress:
            self.logic.core  # noqa: B018  (first use: torch & co. are installed before the imports below)
            from PromiseSegmentLib.training import TrainConfig

            from PromiseSegmentSlicerLib.logic import training_pairs_in_scene

            fallback = {p.segmentation.GetID(): p.inputVolume} if p.segmentation and p.inputVolume else {}
            pairs, skipped = training_pairs_in_scene(slicer.mrmlScene, p.trainSegmentName, fallback)
            if not pairs:
                raise ValueError(f"no segmentation in the scene has a non-empty segment named "
                                 f"{p.trainSegmentName!r}" + (f"; skipped: {', '.join(skipped)}" if skipped else ""))
            result = self.logic.trainAdapter(pairs, p.trainOutput, backbone=backboneSpec(p),
                                             device=deviceSpec(p),
                                             config=TrainConfig(epochs=p.trainEpochs, target_name=p.trainSegmentName),
                                             progress=progress.progress, cancel=progress.cancelled)
            p.adapterFile = p.trainOutput
            slicer.util.infoDisplay(f"Adapter saved: {p.trainOutput}\ntrained on {len(pairs)} segmentation(s)"
                                    + (f" (skipped: {', '.join(skipped)})" if skipped else "")
                                    + f"\nbest validation Dice {result.best_val_dice:.3f} after "
                                    f"{len(result.history)} epochs")


def ctkCollapsible(title, parentLayout, collapsed=False):
    import ctk

    box = ctk.ctkCollapsibleButton()
    box.text = title
    box.collapsed = collapsed
    parentLayout.addWidget(box)
    return qt.QFormLayout(box)


def mrmlSelector(classes, addable=False):
    selector = slicer.qMRMLNodeComboBox()
    selector.nodeTypes = classes
    selector.addEnabled = addable
    selector.removeEnabled = False
    selector.noneEnabled = False
    selector.renameEnabled = addable
    return selector


class PromiseSegmentTest(ScriptedLoadableModuleTest):
    """Module-level smoke test inside Slicer; the effect is exercised in Testing/Python."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_console_logic_segments_a_volume()

    def test_console_logic_segments_a_volume(self):
        import numpy as np

        from PromiseSegmentLib.sample_data import make_sample_volume
        from PromiseSegmentSlicerLib.mrml import segment_mask, volume_node_from_array

        vol, truth = make_sample_volume(0)
        volume = volume_node_from_array(slicer.mrmlScene, vol.array, vol.ijk_to_ras, "sample")
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        k = int(np.argmax(truth.sum(axis=(1, 2))))
        j0, i0 = np.argwhere(truth[k]).min(0)
        j1, i1 = np.argwhere(truth[k]).max(0)
        sid = sharedLogic().segmentVolume(volume, seg, boxes=[(i0, j0, k, i1, j1, k)], mode="vanilla")
        self.assertTrue(segment_mask(seg, sid, volume)[k].any())
        self.delayDisplay("console logic test passed")
