"""Segment Editor effect "ProMISe": automatic prompts or the user's clicks/box, refined by the model.

Self-contained, as Slicer's effect template: ``qSlicerSegmentEditorScriptedEffect::setPythonSource`` runs
this file as a plain module named after its folder (``SegmentEditorPromiseSegmentLib``), so it must not
import siblings from that folder; the folder's ``__init__`` re-exports the class for the case where the
package was imported first.

Thin on purpose: mouse events become world RAS positions handed to ``ClickSession`` (which converts them
through the volume's parent transform); Preview, Propagate and Apply are logic calls; results are written
only through ``modifySelectedSegmentByLabelmap`` (``editor_write.write_block``: the editor's masking and
overwrite settings apply on the written slices, nothing changes elsewhere, one Ctrl+Z reverts an Apply).
The model is loaded by an explicit action (or on activation when that is cheap), never inside a mouse
handler; every handler reports an error once and never lets it escape into Slicer.
"""

import contextlib
import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect
from slicer.i18n import tr as _

from PromiseSegmentLib.names import DEFAULT_BACKBONE, DEVICES, USER_BACKBONES  # torch-free (registries need torch)

__all__ = ["SegmentEditorEffect"]

SCOPES = ("current slice", "slice range", "whole volume")
NO_ADAPTER = "none"  # an empty default would never be stored (Slicer skips empty new values) and reads log errors
DEFAULTS = (
    ("Backbone", DEFAULT_BACKBONE),
    ("Adapter", NO_ADAPTER),
    ("PromptTool", "box"),
    ("Scope", SCOPES[0]),
    ("RangeFirst", 0),
    ("RangeLast", 0),
    ("CustomWindow", 0),
    ("WindowCenter", 40),
    ("WindowWidth", 400),
    ("Device", DEVICES[0]),
    ("NegativeOthers", 0),
)
# VTK delivers a quick second press as a double-click event *instead of* a press: both count as presses.
LEFT_PRESS = (vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonDoubleClickEvent)
RIGHT_PRESS = (vtk.vtkCommand.RightButtonPressEvent, vtk.vtkCommand.RightButtonDoubleClickEvent)
BOX_EVENTS = LEFT_PRESS + (vtk.vtkCommand.LeftButtonReleaseEvent,)
CLICK_EVENTS = LEFT_PRESS + RIGHT_PRESS
CURSOR_FILE = "SegmentEditorEffectCursor.png"  # arrow + 21 px icon, the size of Slicer's own effect cursors
CURSOR_HOT_SPOT = (1, 1)  # the arrow's tip


def modeLabels():
    return {
        "box": _("box (drag in a slice view)"),
        "automatic": _("automatic (adapter's APM; clicks refine)"),
        "clicks": _("clicks (left +, Shift/right -; SAM ViT backbones)"),
    }


def sliceNormal(sliceWidget):
    sliceToRas = sliceWidget.mrmlSliceNode().GetSliceToRAS()
    return [sliceToRas.GetElement(r, 2) for r in range(3)]


def row(*widgets):
    layout = qt.QHBoxLayout()
    for w in widgets:
        layout.addWidget(w)
    return layout


def setIfChanged(widget, prop, value):
    """Only write differing values: re-setting an editable combo's text moves the user's cursor."""
    if getattr(widget, prop) != value:
        setattr(widget, prop, value)


@contextlib.contextmanager
def blockedSignals(*widgets):
    blocked = [w.blockSignals(True) for w in widgets]
    try:
        yield
    finally:
        for w, b in zip(widgets, blocked):
            w.blockSignals(b)


def exactNumber(value):
    """A parameter string that reads back as the same double: ``setParameter(name, float)`` would store
    ``QString::number(value)``, 6 significant digits (qSlicerSegmentEditorAbstractEffect.cxx)."""
    return repr(float(value))


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "ProMISe"  # the registry key: never translated
        if hasattr(scriptedEffect, "title"):  # translatable title: Slicer >= 5.6
            scriptedEffect.title = _("ProMISe")
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.previewNode = None
        self.progress = None
        self._writingParameters = False  # updateMRMLFromGUI in progress: updateGUIFromMRML must not run
        self.activationTimer = None  # created with the options frame; stopped on deactivate and cleanup

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def createCursor(self, widget):
        """Slicer's default stacks the effect icon (128 px here) under an arrow: a 149 px cursor. This one
        has the 21 px icon of Slicer's own effects."""
        path = os.path.join(os.path.dirname(__file__), CURSOR_FILE)
        return qt.QCursor(qt.QPixmap(path), *CURSOR_HOT_SPOT)

    def helpText(self):
        return (
            "<html>"
            + _(
                "ProMISe: a frozen medical SAM with an adapter's automatic prompts, or your box/clicks refined by "
                "the model.<p>Press <b>Load model</b> once. <b>Box</b>: drag over the object in a slice view. "
                "<b>Clicks</b>: left-click positive, Shift+click or right-click negative. A preview appears; "
                "<b>Apply</b> writes it into the selected segment (one undo step). <b>Propagate</b> continues from "
                "the previewed slice to its neighbours until the object vanishes."
            )
            + "</html>"
        )

    # ------------------------------------------------------------------ logic access
    @property
    def logic(self):
        """The shared Qt-free logic; its first use installs torch & co. (after asking), so every action asks
        for it before importing anything from ``PromiseSegmentLib`` beyond the torch-free names."""
        import PromiseSegment

        return PromiseSegment.sharedLogic().core

    def loadedLogic(self):
        """The core logic if it holds the model the current parameters ask for, else None (no set-up)."""
        import PromiseSegment

        core = PromiseSegment.sharedLogic().coreIfInstalled
        return core if core is not None and core.hasModel(**self.modelArgs()) else None

    def _session(self):
        if self.session is None:
            from PromiseSegmentSlicerLib.interaction import ClickSession

            self.session = ClickSession(self.logic)
        self.session.prompt_tool = self.scriptedEffect.parameter("PromptTool") or "box"
        return self.session

    def modelArgs(self):
        device = self.scriptedEffect.parameter("Device")
        return {
            "backbone": self.scriptedEffect.parameter("Backbone") or None,
            "adapter": self.adapterPath(),
            "device": None if device in ("", "auto") else device,
        }

    def adapterPath(self):
        path = self.scriptedEffect.parameter("Adapter")
        return None if path in ("", NO_ADAPTER) else path

    def intensity(self):
        if not self.scriptedEffect.integerParameter("CustomWindow"):
            return None  # the adapter's own rule (or percentiles without an adapter)
        from PromiseSegmentLib.data.preprocessing import IntensityRule

        return IntensityRule.ct(
            self.scriptedEffect.doubleParameter("WindowCenter"), self.scriptedEffect.doubleParameter("WindowWidth")
        )

    def guarded(self, message, call, *args):
        """Run a handler; an error is shown once (one dialog, also in the status line) and logged, and never
        escapes into Qt or VTK (an escaped error would leave a mouse press half-handled)."""
        try:
            with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
                return call(*args)
        except Exception as error:  # already displayed by tryWithErrorDisplay
            logging.error("%s %s", message, error, exc_info=True)
            self.statusLabel.text = f"{message} {error}"
            return None

    # ------------------------------------------------------------------ GUI
    def setupOptionsFrame(self):
        self.backboneCombo = self.addCombo(
            _("Backbone:"),
            USER_BACKBONES,
            _("frozen backbone: lite_medsam (default, offline, box prompts) or SAM ViT (downloaded once; points)"),
        )
        self.adapterCombo = qt.QComboBox()  # installed adapters; editable so any file path can be typed
        self.adapterCombo.editable = True
        self.adapterCombo.toolTip = _(
            "adapter file (.safetensors); import or train adapters in the PromiseSegment module"
        )
        self.fillAdapters()
        self.scriptedEffect.addLabeledOptionsWidget(_("Adapter:"), self.adapterCombo)
        self.promptToolCombo = qt.QComboBox()
        for key, label in modeLabels().items():
            self.promptToolCombo.addItem(label, key)
        self.scriptedEffect.addLabeledOptionsWidget(_("Prompts:"), self.promptToolCombo)
        self.scopeCombo = self.addCombo(_("Scope:"), SCOPES, _("what Apply writes"))
        self.rangeFirst, self.rangeLast = qt.QSpinBox(), qt.QSpinBox()
        for box in (self.rangeFirst, self.rangeLast):
            box.maximum = 100000
        self.scriptedEffect.addLabeledOptionsWidget(_("Slices (first, last):"), row(self.rangeFirst, self.rangeLast))
        self.customWindow = qt.QCheckBox(_("custom window (center, width)"))
        self.windowCenter, self.windowWidth = qt.QDoubleSpinBox(), qt.QDoubleSpinBox()
        for box in (self.windowCenter, self.windowWidth):
            box.minimum, box.maximum = -100000, 100000
        self.scriptedEffect.addLabeledOptionsWidget(
            _("Intensity:"), row(self.customWindow, self.windowCenter, self.windowWidth)
        )
        self.deviceCombo = self.addCombo(_("Device:"), DEVICES, _("auto: CUDA, then Apple MPS, then CPU"))
        self.negativeOthers = qt.QCheckBox(_("other visible segments are negative prompts"))
        self.scriptedEffect.addOptionsWidget(self.negativeOthers)
        self.setupButtons()
        # The activation's deferred model load: owned here (a bare singleShot would outlive the editor).
        self.activationTimer = qt.QTimer()
        self.activationTimer.setSingleShot(True)  # methods: ``singleShot`` is also QTimer's static function
        self.activationTimer.setInterval(0)
        self.activationTimer.connect("timeout()", self.onActivated)
        self.connections = [
            (self.backboneCombo, "currentIndexChanged(int)"),
            (self.adapterCombo, "currentTextChanged(QString)"),
            (self.promptToolCombo, "currentIndexChanged(int)"),
            (self.scopeCombo, "currentIndexChanged(int)"),
            (self.rangeFirst, "valueChanged(int)"),
            (self.rangeLast, "valueChanged(int)"),
            (self.customWindow, "toggled(bool)"),
            (self.windowCenter, "valueChanged(double)"),
            (self.windowWidth, "valueChanged(double)"),
            (self.deviceCombo, "currentIndexChanged(int)"),
            (self.negativeOthers, "toggled(bool)"),
        ]
        for widget, signal in self.connections:
            widget.connect(signal, self.updateMRMLFromGUI)

    def addCombo(self, label, items, toolTip):
        combo = qt.QComboBox()
        combo.addItems(list(items))
        combo.toolTip = toolTip
        self.scriptedEffect.addLabeledOptionsWidget(label, combo)
        return combo

    def setupButtons(self):
        self.loadButton = qt.QPushButton(_("Load model"))
        self.loadButton.toolTip = _(
            "load the backbone (and adapter) now; the first time may install packages or "
            "download a checkpoint, with progress and Cancel"
        )
        self.scriptedEffect.addOptionsWidget(self.loadButton)
        self.previewButton = qt.QPushButton(_("Preview"))
        self.propagateButton = qt.QPushButton(_("Propagate"))
        self.applyButton = qt.QPushButton(_("Apply"))
        self.clearButton = qt.QPushButton(_("Clear"))
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.scriptedEffect.addOptionsWidget(
            row(self.previewButton, self.propagateButton, self.applyButton, self.clearButton)
        )
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.buttons = [
            (self.loadButton, self.onLoadModel),
            (self.previewButton, self.onPreview),
            (self.propagateButton, self.onPropagate),
            (self.applyButton, self.onApply),
            (self.clearButton, self.onClear),
        ]
        for button, slot in self.buttons:
            button.connect("clicked()", slot)

    def fillAdapters(self):
        from PromiseSegmentSlicerLib.adapter_folder import installed_adapters

        current = self.adapterCombo.currentText
        wasBlocked = self.adapterCombo.blockSignals(True)  # refilling must not change the parameter
        self.adapterCombo.clear()
        self.adapterCombo.addItem("")  # none: prompts with the plain backbone
        for path in installed_adapters():
            self.adapterCombo.addItem(str(path))
        self.adapterCombo.currentText = current
        self.adapterCombo.blockSignals(wasBlocked)

    def activate(self):
        self.fillAdapters()  # adapters imported or trained since the effect was set up
        # after the editor has recorded this effect as active (activate() runs inside its update), and
        # never with a dialog inside that update; deactivate() and cleanup() stop it
        if self.activationTimer is not None:
            self.activationTimer.start()

    def onActivated(self):
        self.guarded(_("ProMISe could not load its model."), self.loadIfCheap)

    def loadIfCheap(self):
        """On activation, load the default offline backbone at once when its packages are installed (about
        a second); anything that would install packages or download waits for Load model."""
        from PromiseSegmentSlicerLib import dependencies

        if not self.scriptedEffect.active():
            return  # another effect was chosen meanwhile
        if self.loadedLogic() is not None:
            self.showModelStatus()
        elif not dependencies.missing() and (self.modelArgs()["backbone"] or DEFAULT_BACKBONE) == DEFAULT_BACKBONE:
            self.onLoadModel()
        else:
            self.showModelStatus()

    def showModelStatus(self):
        core = self.loadedLogic()
        self.statusLabel.text = (
            _("model loaded ({engine}): drag a box or click in a slice view").format(engine=core.engineDescription)
            if core is not None
            else _("press Load model first")
        )

    def setMRMLDefaults(self):
        for name, value in DEFAULTS:
            self.scriptedEffect.setParameterDefault(name, value)

    def updateGUIFromMRML(self):
        if self._writingParameters:
            return  # our own write: the widgets already show these values (and may be mid-typing)
        p = self.scriptedEffect
        widgets = [w for w, _signal in self.connections]
        blocked = [w.blockSignals(True) for w in widgets]
        try:
            setIfChanged(self.backboneCombo, "currentText", p.parameter("Backbone"))
            setIfChanged(self.adapterCombo, "currentText", self.adapterPath() or "")
            setIfChanged(
                self.promptToolCombo, "currentIndex", max(0, self.promptToolCombo.findData(p.parameter("PromptTool")))
            )
            setIfChanged(self.scopeCombo, "currentText", p.parameter("Scope"))
            setIfChanged(self.rangeFirst, "value", p.integerParameter("RangeFirst"))
            setIfChanged(self.rangeLast, "value", p.integerParameter("RangeLast"))
            setIfChanged(self.customWindow, "checked", bool(p.integerParameter("CustomWindow")))
            setIfChanged(self.windowCenter, "value", p.doubleParameter("WindowCenter"))
            setIfChanged(self.windowWidth, "value", p.doubleParameter("WindowWidth"))
            setIfChanged(self.deviceCombo, "currentText", p.parameter("Device"))
            setIfChanged(self.negativeOthers, "checked", bool(p.integerParameter("NegativeOthers")))
        finally:
            for w, b in zip(widgets, blocked):
                w.blockSignals(b)

    def updateMRMLFromGUI(self, *_args):
        """Each ``setParameter`` fires EffectParameterModified -> ``updateGUIFromMRML`` at once; the guard keeps
        those half-written states from being pushed back into the widgets."""
        p = self.scriptedEffect
        adapter = self.adapterCombo.currentText.strip()
        if adapter != (self.adapterPath() or "") and not self.customWindow.checked:
            with blockedSignals(self.windowCenter, self.windowWidth):
                self.showAdapterWindow(adapter)  # the window fields start from the new adapter's own rule
        self._writingParameters = True
        try:
            for name, value in (
                ("Backbone", self.backboneCombo.currentText),
                ("Adapter", adapter or NO_ADAPTER),
                ("PromptTool", self.promptToolCombo.currentData),
                ("Scope", self.scopeCombo.currentText),
                ("RangeFirst", self.rangeFirst.value),
                ("RangeLast", self.rangeLast.value),
                ("CustomWindow", int(self.customWindow.checked)),
                ("WindowCenter", exactNumber(self.windowCenter.value)),
                ("WindowWidth", exactNumber(self.windowWidth.value)),
                ("Device", self.deviceCombo.currentText),
                ("NegativeOthers", int(self.negativeOthers.checked)),
            ):
                p.setParameter(name, value)
        finally:
            self._writingParameters = False

    def showAdapterWindow(self, adapterPath):
        from PromiseSegmentSlicerLib.adapter_folder import adapter_metadata

        try:
            rule = adapter_metadata(adapterPath).intensity if adapterPath else None
        except (OSError, ValueError):
            rule = None  # not (yet) a readable adapter: the error comes when it is used
        if rule is not None and rule.kind == "window":
            self.windowCenter.value, self.windowWidth.value = rule.center, rule.width
            self.customWindow.toolTip = _("off: the adapter's window {c}/{w}").format(
                c=f"{rule.center:g}", w=f"{rule.width:g}"
            )
        elif rule is not None:
            self.customWindow.toolTip = _("off: the adapter's rule ({kind})").format(kind=rule.kind)
        else:
            self.customWindow.toolTip = _("off: percentiles 0.5-99.5 of the volume (no adapter)")

    # ------------------------------------------------------------------ interaction
    def sourceVolume(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    def segmentationNode(self):
        return self.scriptedEffect.parameterSetNode().GetSegmentationNode()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        box = self.scriptedEffect.parameter("PromptTool") == "box"
        if eventId not in (BOX_EVENTS if box else CLICK_EVENTS) or self.passesThrough(callerInteractor, eventId, box):
            return False
        if self.loadedLogic() is None:
            self.showModelStatus()  # no set-up inside a mouse handler
            return True
        ras = self.xyToRas(callerInteractor.GetEventPosition(), viewWidget)  # world RAS
        normal = sliceNormal(viewWidget)
        if box:
            self.guarded(_("ProMISe could not use this box."), self.boxEvent, ras, normal, eventId in LEFT_PRESS)
        else:
            positive = eventId in LEFT_PRESS and not callerInteractor.GetShiftKey()
            self.guarded(_("ProMISe could not use this click."), self.addClick, ras, normal, positive)
        return True  # consumed, also after an error: no window/level, menu or view maximize on these

    def passesThrough(self, interactor, eventId, box):
        """Presses with Ctrl or Alt (and Shift in Box mode, where it means nothing) go on to the view, as in
        Slicer's own effects (SegmentEditorDrawEffect.py, SegmentEditorThresholdEffect.py); so does the
        release of a press that went on. In Clicks mode Shift+click is a negative click."""
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent:
            return self.session is None or not self.session.dragging
        modifiers = interactor.GetControlKey() or interactor.GetAltKey()
        return bool(modifiers or (box and interactor.GetShiftKey()))

    def addClick(self, ras, normal, positive=True):
        """One click (world RAS, slice-view normal); errors propagate (the caller reports them once)."""
        session = self._session()
        session.click(self.sourceVolume(), ras, normal, positive)
        if session.ready:
            self.preview()

    def boxEvent(self, ras, normal, pressed):
        """Box mode: button down starts a drag, button up ends it (then previews)."""
        session = self._session()
        if pressed:
            session.press(self.sourceVolume(), ras, normal)
            return
        session.release(self.sourceVolume(), ras, normal)
        if session.ready:
            self.preview()

    # ------------------------------------------------------------------ buttons
    def onLoadModel(self):
        def load():
            from PromiseSegmentLib.errors import Cancelled

            try:
                self.withProgress(
                    _("ProMISe: loading the model"),
                    lambda progress, cancel: self.logic.loadModel(progress=progress, cancel=cancel, **self.modelArgs()),
                )
            except Cancelled:
                self.statusLabel.text = _("loading cancelled; nothing was kept")
                return
            self.showModelStatus()

        self.guarded(_("ProMISe could not load its model."), load)

    def onPreview(self):
        self.guarded(_("ProMISe preview failed."), self.preview)

    def preview(self):
        from PromiseSegmentSlicerLib.mrml import update_preview

        session = self._session()
        if session.volume_node is None and session.prompt_tool == "automatic":
            self.locateCurrentSlice(session)
        mask = session.preview(intensity=self.intensity(), **self.modelArgs())
        labelmap, _extent = session.labelmap(self.segmentationNode())
        self.previewNode = update_preview(
            slicer.mrmlScene, self.previewNode, self.sourceVolume(), labelmap, self.segmentationNode()
        )
        self.statusLabel.text = _("preview on slice {index}: {pixels} pixels; Apply to keep it").format(
            index=session.index, pixels=int(mask.sum())
        )

    def locateCurrentSlice(self, session):
        """Automatic mode without a click: the slice shown in the red view."""
        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        sliceToRas = sliceWidget.mrmlSliceNode().GetSliceToRAS()
        ras = [sliceToRas.GetElement(r, 3) for r in range(3)]
        session.locate(self.sourceVolume(), ras, sliceNormal(sliceWidget))

    def onClear(self):
        from PromiseSegmentSlicerLib.mrml import remove_preview

        if self.session is not None:
            self.session.clear()
        remove_preview(self.previewNode)
        self.previewNode = None
        self.statusLabel.text = ""

    def onApply(self):
        """Writes the preview (current slice) or runs the chosen scope: one modify call = one undo step."""
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        self.guarded(_("ProMISe failed; the segment was not changed."), self.apply)

    def apply(self):
        from PromiseSegmentLib.errors import Cancelled

        scope = self.scriptedEffect.parameter("Scope")
        if scope == SCOPES[0]:
            labelmap, extent = self._session().labelmap(self.segmentationNode())
        else:
            try:
                labelmap, extent = self.runScope(scope)
            except Cancelled:
                self.statusLabel.text = _("cancelled: the segment was not changed")
                return
        self.modify(labelmap, extent)
        self.onClear()

    def modify(self, labelmap, extent):
        """Replace the slices ``extent`` of the selected segment (``editor_write.write_block``): the editor's
        masking and overwrite mode apply there, nothing changes elsewhere; one undo step."""
        from PromiseSegmentSlicerLib.editor_write import write_block

        reference = self.scriptedEffect.defaultModifierLabelmap()
        if reference is None:
            raise ValueError(_("the segmentation has no geometry; select a source volume"))
        segmentId = self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()

        def modifySelected(modifier, mode, modifierExtent, bypassMasking):
            if modifierExtent is None:
                self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode, bypassMasking)
            else:
                self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode, modifierExtent, bypassMasking)

        self.scriptedEffect.saveStateForUndo()
        write_block(modifySelected, self.segmentationNode(), segmentId, labelmap, extent, reference)

    def runScope(self, scope):
        session = self._session()
        axis = session.axis if session.axis is not None else "axial"
        sliceRange = None
        if scope == SCOPES[1]:
            sliceRange = (
                self.scriptedEffect.integerParameter("RangeFirst"),
                self.scriptedEffect.integerParameter("RangeLast"),
            )
        return self.withProgress(
            _("ProMISe: segmenting ({scope})").format(scope=scope),
            lambda progress, cancel: self.logic.segmentScope(
                self.sourceVolume(),
                self.segmentationNode(),
                axis,
                sliceRange,
                mode="auto",
                intensity=self.intensity(),
                progress=progress,
                cancel=cancel,
                **self.modelArgs(),
            ),
        )

    def withProgress(self, title, call):
        """``call(progress, cancel)`` under the module's window-modal progress dialog; ``self.progress`` while
        it runs (the Slicer-hosted test presses its Cancel)."""
        import PromiseSegment

        with PromiseSegment.ProgressWithCancel(title) as self.progress:
            try:
                return call(self.progress.progress, self.progress.cancelled)
            finally:
                self.progress = None

    def onPropagate(self):
        """From the previewed (accepted) slice to its neighbours, written as one undo step."""
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        self.guarded(_("ProMISe propagation failed; the segment was not changed."), self.propagate)

    def propagate(self):
        from PromiseSegmentLib.errors import Cancelled

        session = self._session()
        if session.preview_mask is None:
            raise ValueError(_("preview a slice first (box or clicks), then Propagate"))
        volume, segmentation = self.sourceVolume(), self.segmentationNode()
        negative = None
        if self.scriptedEffect.integerParameter("NegativeOthers"):
            from PromiseSegmentSlicerLib.scene import visible_other_segments_mask

            negative = visible_other_segments_mask(
                segmentation, volume, self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()
            )
        try:
            results = self.withProgress(
                _("ProMISe: propagating"),
                lambda progress, cancel: self.logic.propagate(
                    volume,
                    session.axis,
                    session.index,
                    session.preview_mask,
                    negativeMask=negative,
                    intensity=self.intensity(),
                    progress=progress,
                    cancel=cancel,
                    **self.modelArgs(),
                ),
            )
        except Cancelled:
            self.statusLabel.text = _("cancelled: the segment was not changed")
            return
        results[session.index] = session.preview_mask
        labelmap, extent = self.logic.slicesLabelmap(volume, session.axis, results, segmentation)
        self.modify(labelmap, extent)
        self.onClear()  # clears the status line too: the summary comes after it
        self.statusLabel.text = _("propagated to slices {first}..{last}").format(first=min(results), last=max(results))

    def deactivate(self):
        if self.activationTimer is not None:
            self.activationTimer.stop()
        self.onClear()

    def cleanup(self):
        """Disconnect what setupOptionsFrame connected (Slicer issue 7392: otherwise the effect leaks)."""
        if self.activationTimer is not None:
            self.activationTimer.stop()
            self.activationTimer.disconnect("timeout()", self.onActivated)
            self.activationTimer = None
        self.onClear()
        for widget, signal in getattr(self, "connections", []):
            widget.disconnect(signal, self.updateMRMLFromGUI)
        for button, slot in getattr(self, "buttons", []):
            button.disconnect("clicked()", slot)
        AbstractScriptedSegmentEditorEffect.cleanup(self)
