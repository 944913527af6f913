"""PromiseSegment scripted module (3D Slicer): module declaration, parameter node, a thin widget and
``PromiseSegmentLogic`` for the Python console.

Everything the widget and the Segment Editor effect do is a call into
``PromiseSegmentSlicerLib.logic.SceneLogic`` (Qt-free, tested with pytest on slicer-core);
the algorithms live in ``PromiseSegmentLib`` (torch/numpy only). Nothing heavy is imported here:
torch & co. are installed on first use, after asking.
"""

import os
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from PromiseSegmentLib.names import AXES, DEVICES, RUNTIMES, USER_BACKBONES

BACKBONES = list(USER_BACKBONES)  # from the torch-free names module: the registry needs torch


class PromiseSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PromiseSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["PromiseSegment developers"]
        self.parent.helpText = _(
            "ProMISe: a frozen Segment Anything Model with an Auto-Prompting Module and Incremental Pattern "
            "Shifting, for automatic and click-refined segmentation. Segment interactively with the "
            "<b>ProMISe</b> effect of the Segment Editor; here: choose the backbone, manage and train "
            "adapters, segment whole volumes."
        )
        self.parent.acknowledgementText = _(
            "Uses Segment Anything (Meta AI, Apache-2.0) and LiteMedSAM (bowang-lab/MedSAM, Apache-2.0; weights "
            "distilled from MedSAM, trained on public medical data sets with their own terms)."
        )
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
    axis: Annotated[str, Choice(list(AXES))] = AXES[0]
    device: Annotated[str, Choice(list(DEVICES))] = DEVICES[0]
    trainSegmentName: str = ""
    trainTimeBudget: Annotated[int, WithinRange(0, 1440)] = 0  # minutes; 0: the recipe's (auto: 30)
    trainDense: bool = False
    trainOutput: str = ""


_shared_logic = None


def sharedLogic():
    """One logic (one SAM in memory, one embedding cache) shared by the widget, the effect and the console."""
    global _shared_logic
    if _shared_logic is None:
        _shared_logic = PromiseSegmentLogic()
    return _shared_logic


# The console API of the Qt-free logic, reachable from the module logic: only these names are forwarded, so
# a ``hasattr`` probe of anything else (Slicer and IDEs probe) never installs packages.
CORE_METHODS = frozenset(
    {
        "segmentVolume",
        "segmentCohort",
        "segmentSlice",
        "predictVolume",
        "segmentScope",
        "propagate",
        "trainAdapter",
        "trainingCases",
        "loadModel",
        "loadBackbone",
        "hasModel",
        "writeLabelmap",
        "slicesLabelmap",
        "valueRange",
        "embeddingCache",
    }
)


class PromiseSegmentLogic(ScriptedLoadableModuleLogic):
    """Module logic for the console: ``segmentVolume``, ``segmentSlice``, ``predictVolume``, ``propagate``,
    ``trainAdapter``, ``loadModel`` ... are forwarded to the Qt-free ``PromiseSegmentSlicerLib.logic``
    (whose first use checks dependencies and installs missing ones after asking)."""

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
            from PromiseSegmentSlicerLib.logic import SceneLogic

            self._core = SceneLogic(runtime=savedRuntime())
        return self._core

    @property
    def coreIfInstalled(self):
        """The Qt-free logic if it exists already, else None: never installs or loads anything."""
        return self._core

    def getParameterNode(self):
        return PromiseSegmentParameterNode(super().getParameterNode())

    def __getattr__(self, name):
        if name not in CORE_METHODS:
            raise AttributeError(name)
        return getattr(self.core, name)


def backboneSpec(parameterNode):
    """A checkpoint file overrides the registry choice."""
    return parameterNode.backboneFile or parameterNode.backbone


RUNTIME_SETTING = "PromiseSegment/Runtime"  # a machine's preference (application settings), not the scene's


def savedRuntime() -> str:
    """The CPU runtime chosen in the module (auto, torch or openvino), kept across Slicer sessions."""
    value = str(qt.QSettings().value(RUNTIME_SETTING, "auto"))
    return value if value in RUNTIMES else "auto"


def deviceSpec(parameterNode):
    return None if parameterNode.device == "auto" else parameterNode.device


class ProgressWithCancel:
    """A window-modal progress dialog whose Cancel the logic polls (no threads: events are processed in
    between, and the modality keeps the user from clicking elsewhere meanwhile; the logic also refuses
    calls made from inside a running call).

    As a context manager with ``errorMessage`` it also reports what went wrong: a cancelled run gets a
    status-bar line, a failure an error dialog (the logic has already left the scene as it was)."""

    def __init__(self, title, errorMessage=None):
        self.title, self.errorMessage = title, errorMessage
        # no auto-reset/close: reaching 100 % would clear wasCanceled and a later setValue would reopen it
        self.dialog = slicer.util.createProgressDialog(
            windowTitle=title, labelText=title, maximum=100, autoReset=False, autoClose=False
        )
        self.dialog.setWindowModality(qt.Qt.WindowModal)
        self.dialog.setCancelButtonText(_("Cancel"))

    def progress(self, done, total, *_args):
        if not self.dialog.wasCanceled:
            self.dialog.setValue(int(100 * done / max(total or 1, 1)))
        slicer.app.processEvents()

    def trainingStatus(self, status):
        """A training run's ``TrainStatus``: the phase and epoch in the label, the phase's share as the bar."""
        if not self.dialog.wasCanceled:
            epoch = f", epoch {status.epoch + 1}/{status.epochs}" if status.epoch is not None else ""
            self.dialog.setLabelText(f"{self.title}: {status.phase}{epoch}")
        self.progress(status.done, status.total)

    def cancelled(self):
        slicer.app.processEvents()
        return self.dialog.wasCanceled

    def close(self):
        """Close and delete (a closed dialog stays a child of the main window until deleted)."""
        self.dialog.close()
        self.dialog.deleteLater()

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
            slicer.util.showStatusMessage(_("{title}: cancelled, nothing was changed").format(title=self.title), 5000)
        else:
            import traceback

            slicer.util.errorDisplay(
                f"{self.errorMessage}\n\n{exc}", detailedText="".join(traceback.format_exception(excType, exc, tb))
            )
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

        self.setupModelSection(ctkCollapsible(_("Model"), top))
        self.setupRunSection(ctkCollapsible(_("Segment a volume"), top))
        self.setupTrainSection(ctkCollapsible(_("Train an adapter from this scene"), top, collapsed=True))
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

    def setupModelSection(self, model):
        self.backboneCombo = self._field(
            model,
            _("Backbone:"),
            qt.QComboBox(),
            "backbone",
            _(
                "lite_medsam (default) ships with its Python package and works offline; sam_vit_b/l/h are downloaded "
                "once into your cache and SHA-256 verified"
            ),
        )
        self.checkpointFile = self._field(
            model,
            _("or local file:"),
            qt.QLineEdit(),
            "backboneFile",
            _("path to a LiteMedSAM/SAM/MedSAM .pth (overrides the choice above)"),
        )
        self.downloadButton = qt.QPushButton(_("Download / verify checkpoint"))
        model.addRow(self.downloadButton)
        self.adapterFile = self._field(
            model,
            _("Adapter:"),
            qt.QLineEdit(),
            "adapterFile",
            _("APM+IPS adapter (.safetensors); empty = the plain backbone with your prompts"),
        )
        self.adapterCombo = qt.QComboBox()
        self.adapterCombo.toolTip = _("adapters imported into your adapter folder")
        model.addRow(_("Installed adapters:"), self.adapterCombo)
        self.importAdapterButton = qt.QPushButton(_("Import adapter file..."))
        model.addRow(self.importAdapterButton)
        self.adapterInfo = qt.QLabel()
        self.adapterInfo.wordWrap = True
        model.addRow(self.adapterInfo)
        self.deviceCombo = self._field(model, _("Device:"), qt.QComboBox(), "device")
        self.runtimeCombo = self._field(
            model,
            _("CPU runtime:"),
            qt.QComboBox(),
            tooltip=_(
                "the image encoder's runtime on CPUs: auto = OpenVINO where it is installed (faster), else "
                "PyTorch; GPUs always run PyTorch. The first OpenVINO use converts the encoder once (about 30 s)."
            ),
        )
        for name in RUNTIMES:
            self.runtimeCombo.addItem(name)
        self.runtimeCombo.currentText = savedRuntime()
        self.runtimeCombo.connect("currentTextChanged(QString)", self.onRuntimeChosen)

    def onRuntimeChosen(self, name):
        qt.QSettings().setValue(RUNTIME_SETTING, name)
        core = self.logic.coreIfInstalled if self.logic else None
        if core is not None:
            core.runtime = name  # the next model load (the effect's too: one shared logic) uses it

    def setupRunSection(self, run):
        self.volumeSelector = self._field(run, _("Volume:"), mrmlSelector(["vtkMRMLScalarVolumeNode"]), "inputVolume")
        self.segmentationSelector = self._field(
            run, _("Segmentation:"), mrmlSelector(["vtkMRMLSegmentationNode"], True), "segmentation"
        )
        self.axisCombo = self._field(run, _("Slice axis:"), qt.QComboBox(), "axis")
        self.segmentButton = qt.QPushButton(_("Segment whole volume (new segment)"))
        run.addRow(self.segmentButton)

    def setupTrainSection(self, train):
        self.trainSegment = self._field(
            train,
            _("Segment name:"),
            qt.QLineEdit(),
            "trainSegmentName",
            _(
                "every segmentation in the scene with a segment of this name is used, on the volume it was drawn on "
                "(a cohort loaded into one scene trains one adapter)"
            ),
        )
        self.trainTimeBudget = self._field(
            train,
            _("Time budget (min):"),
            qt.QSpinBox(),
            "trainTimeBudget",
            _(
                "0: the recipe's (auto: its plan fitted to 30 minutes on this computer); otherwise the plan is "
                "scaled to fit and training stops at the budget with the best adapter so far"
            ),
        )
        self.trainDense = self._field(
            train,
            _("Every slice annotated:"),
            qt.QCheckBox(),
            "trainDense",
            _(
                "checked: a slice without the segment is truly empty; unchecked: only annotated slices are used (the "
                "others are unknown)"
            ),
        )
        self.trainOutput = self._field(
            train,
            _("Save adapter as:"),
            qt.QLineEdit(),
            "trainOutput",
            _("a new .safetensors file (an existing file is never replaced)"),
        )
        self.trainButton = qt.QPushButton(_("Train adapter (the backbone stays frozen)"))
        train.addRow(self.trainButton)

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
            from PromiseSegmentSlicerLib.adapter_folder import describe

            self.adapterInfo.text = describe(p.adapterFile)
        else:
            self.adapterInfo.text = _("no adapter: the plain backbone, prompts needed")

    # ------------------------------------------------------------------ actions (all logic calls)
    def refreshAdapters(self):
        from PromiseSegmentSlicerLib.adapter_folder import installed_adapters

        self.adapterCombo.clear()
        self.adapterCombo.addItem(_("(choose)"), "")
        for path in installed_adapters():
            self.adapterCombo.addItem(path.stem, str(path))

    def onAdapterChosen(self, index):
        path = self.adapterCombo.itemData(index)
        if path:
            self._parameterNode.adapterFile = path

    def onImportAdapter(self):
        source = qt.QFileDialog.getOpenFileName(self.parent, _("Import adapter"), "", _("Adapters (*.safetensors)"))
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not import the adapter."), waitCursor=True):
            from PromiseSegmentSlicerLib.adapter_folder import import_adapter

            self._parameterNode.adapterFile = str(import_adapter(source))
            self.refreshAdapters()

    def onDownload(self):
        spec = backboneSpec(self._parameterNode)
        with ProgressWithCancel(
            _("Getting / verifying {spec}").format(spec=spec),
            _("Checkpoint download or verification failed; nothing was kept."),
        ) as progress:
            self.logic.core  # noqa: B018  (first use: torch & co. are installed before the import below)
            from PromiseSegmentLib.backbones.registry import BACKBONES

            if spec in BACKBONES:
                path = BACKBONES[spec].locate(
                    progress=lambda done, total: progress.progress(done, total or 1), cancel=progress.cancelled
                )
            else:
                path = self.logic.loadBackbone(spec).path
            slicer.util.infoDisplay(_("Checkpoint ready and verified:") + f"\n{path}")

    def onSegment(self):
        p = self._parameterNode
        with ProgressWithCancel(
            _("ProMISe: segmenting"), _("Segmentation failed; the segmentation was not changed.")
        ) as progress:
            self.logic.segmentVolume(
                p.inputVolume,
                p.segmentation,
                adapter=p.adapterFile or None,
                backbone=backboneSpec(p),
                axis=p.axis,
                device=deviceSpec(p),
                progress=progress.progress,
                cancel=progress.cancelled,
            )

    def onTrain(self):
        p = self._parameterNode
        with ProgressWithCancel(_("ProMISe: training adapter"), _("Training failed.")) as progress:
            self.logic.core  # noqa: B018  (first use: torch & co. are installed before the imports below)
            from PromiseSegmentLib.training.recipe import RunOptions
            from PromiseSegmentSlicerLib.scene import training_pairs_in_scene

            fallback = {p.segmentation.GetID(): p.inputVolume} if p.segmentation and p.inputVolume else {}
            pairs, skipped = training_pairs_in_scene(slicer.mrmlScene, p.trainSegmentName, fallback)
            if not pairs:
                raise ValueError(
                    _("no segmentation in the scene has a non-empty segment named {name}").format(
                        name=repr(p.trainSegmentName)
                    )
                    + (f"; skipped: {', '.join(skipped)}" if skipped else "")
                )
            options = RunOptions(
                overrides={"target_name": p.trainSegmentName},
                time_budget_min=p.trainTimeBudget or None,
                dense=p.trainDense,
            )
            result = self.logic.trainAdapter(
                pairs,
                p.trainOutput,
                backbone=backboneSpec(p),
                device=deviceSpec(p),
                options=options,
                progress=progress.trainingStatus,
                cancel=progress.cancelled,
            )
            p.adapterFile = p.trainOutput
            slicer.util.infoDisplay(
                _("Adapter saved: {path}\ntrained on {n} segmentation(s)").format(path=p.trainOutput, n=len(pairs))
                + (f" (skipped: {', '.join(skipped)})" if skipped else "")
                + "\n"
                + _("best selection Dice {dice} after {epochs} epochs").format(
                    dice=f"{result.best_val_dice:.3f}", epochs=len(result.history)
                )
            )


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
    """Module-level tests inside Slicer (the effect is exercised in Testing/Python). The torch-free part
    always runs; the console-logic part needs torch and Resources/requirements.txt installed and is
    skipped with a message naming what is missing (the extensions dashboard does not install packages)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_module_logic_forwards_only_its_console_api()
        from PromiseSegmentSlicerLib.dependencies import missing_message

        if missing_message():
            self.delayDisplay(f"console logic test skipped: PromiseSegment {missing_message()}")
            return
        self.setUp()
        self.test_console_logic_segments_a_volume()

    def test_module_logic_forwards_only_its_console_api(self):
        logic = PromiseSegmentLogic()
        self.assertFalse(hasattr(logic, "noSuchMethod"), "a probe is answered without installing anything")
        self.assertIsNone(logic.coreIfInstalled)
        self.assertTrue(CORE_METHODS >= {"segmentVolume", "propagate", "trainAdapter", "loadModel"})

    def test_console_logic_segments_a_volume(self):
        from PromiseSegmentSlicerLib.dependencies import missing_message

        if missing_message():  # ctest calls test_* methods directly, not runTest
            self.skipTest(f"PromiseSegment {missing_message()}")
        import numpy as np

        from PromiseSegmentSlicerLib.mrml import segment_mask, volume_node_from_array

        k, j, i = np.ogrid[:12, :48, :48]
        truth = (((k - 6) / 4.0) ** 2 + ((j - 24) / 10.0) ** 2 + ((i - 22) / 12.0) ** 2 <= 1).astype(np.uint8)
        image = (100 + 400.0 * truth + np.random.default_rng(0).normal(0, 20, truth.shape)).astype(np.int16)
        volume = volume_node_from_array(slicer.mrmlScene, image, np.diag([0.8, 0.8, 2.5, 1.0]), "phantom")
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        j0, i0 = np.argwhere(truth[6]).min(0)
        j1, i1 = np.argwhere(truth[6]).max(0)
        sid = sharedLogic().segmentVolume(volume, seg, boxes=[(i0, j0, 6, i1, j1, 6)], mode="vanilla")
        written = segment_mask(seg, sid, volume)[6]
        self.assertGreater(2 * (written & truth[6]).sum() / (written.sum() + truth[6].sum()), 0.8)
        self.delayDisplay("console logic test passed")
