"""Segment Editor effect "ProMISe": automatic prompts or the user's clicks, refined by the model.

Thin on purpose: mouse events become RAS positions handed to ``ClickSession``; Preview, Propagate and
Apply are logic calls; results are written only through ``modifySelectedSegmentByLabelmap`` (so the
editor's masking and overwrite settings apply and one Ctrl+Z reverts an Apply).
"""
import logging
import os

import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from PromiseSegmentLib.names import USER_BACKBONES  # torch-free: the registry itself needs torch

SCOPES = ("current slice", "slice range", "whole volume")
MODE_LABELS = {"box": "box (drag in a slice view)", "automatic": "automatic (adapter's APM; clicks refine)",
               "clicks": "clicks (left +, Shift/right -; SAM ViT backbones)"}


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    def __init__(self, scriptedEffect):
        scriptedEffect.name = "ProMISe"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session = None
        self.previewNode = None
        self.progress = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>ProMISe: SAM with an adapter's automatic prompts, or your clicks refined by the model."
                "<p><b>Left-click</b>: positive point, <b>Shift+click</b> or <b>right-click</b>: negative point "
                "on the slice under the mouse. A preview appears; <b>Apply</b> writes it into the selected "
                "segment (one undo step). <b>Propagate</b> continues from the accepted slice to its neighbours "
                "until the object vanishes.</html>")

    # ------------------------------------------------------------------ logic access
    @property
    def logic(self):
        """The shared logic; its first use installs torch & co. (after asking), so every action asks for
        the logic before importing anything from ``PromiseSegmentLib``."""
        import PromiseSegment

        logic = PromiseSegment.sharedLogic()
        logic.core  # noqa: B018
        return logic

    def _session(self):
        if self.session is None:
            from PromiseSegmentSlicerLib.interaction import ClickSession

            self.session = ClickSession(self.logic)
        self.session.mode = self.scriptedEffect.parameter("Mode") or "clicks"
        return self.session

    def modelArgs(self):
        backbone = self.scriptedEffect.parameter("Backbone")
        device = self.scriptedEffect.parameter("Device")
        return {"backbone": backbone or None,
                "adapter": self.scriptedEffect.parameter("Adapter") or None,
                "device": None if device in ("", "auto") else device}

    def intensity(self):
        if not self.scriptedEffect.integerParameter("CustomWindow"):
            return None  # the adapter's own rule (or percentiles without an adapter)
        from PromiseSegmentLib.preprocessing import IntensityRule

        return IntensityRule.ct(self.scriptedEffect.doubleParameter("WindowCenter"),
                                self.scriptedEffect.doubleParameter("WindowWidth"))

    # ------------------------------------------------------------------ GUI
    def setupOptionsFrame(self):
        self.checkpointCombo = qt.QComboBox()
        self.checkpointCombo.addItems(list(USER_BACKBONES))
        self.checkpointCombo.toolTip = ("frozen backbone: lite_medsam (default, offline, box prompts) or SAM ViT "
                                        "(downloaded once; point prompts)")
        self.scriptedEffect.addLabeledOptionsWidget("Backbone:", self.checkpointCombo)
        self.adapterCombo = qt.QComboBox()  # installed adapters; editable so any file path can be typed
        self.adapterCombo.editable = True
        self.adapterCombo.toolTip = "adapter file (.safetensors); import or train adapters in the PromiseSegment module"
        self.fillAdapters()
        self.scriptedEffect.addLabeledOptionsWidget("Adapter:", self.adapterCombo)
        self.modeCombo = qt.QComboBox()
        for key, label in MODE_LABELS.items():
            self.modeCombo.addItem(label, key)
        self.scriptedEffect.addLabeledOptionsWidget("Prompts:", self.modeCombo)
        self.scopeCombo = qt.QComboBox()
        self.scopeCombo.addItems(list(SCOPES))
        self.scriptedEffect.addLabeledOptionsWidget("Scope:", self.scopeCombo)
        self.rangeFirst, self.rangeLast = qt.QSpinBox(), qt.QSpinBox()
        for box in (self.rangeFirst, self.rangeLast):
            box.maximum = 100000
        rangeRow = qt.QHBoxLayout()
        rangeRow.addWidget(self.rangeFirst)
        rangeRow.addWidget(self.rangeLast)
        self.scriptedEffect.addLabeledOptionsWidget("Slices (first, last):", rangeRow)
        self.customWindow = qt.QCheckBox("custom window (center, width)")
        self.customWindow.toolTip = "off: the adapter's intensity rule"
        self.windowCenter, self.windowWidth = qt.QDoubleSpinBox(), qt.QDoubleSpinBox()
        for box in (self.windowCenter, self.windowWidth):
            box.minimum, box.maximum = -100000, 100000
        windowRow = qt.QHBoxLayout()
        for w in (self.customWindow, self.windowCenter, self.windowWidth):
            windowRow.addWidget(w)
        self.scriptedEffect.addLabeledOptionsWidget("Intensity:", windowRow)
        self.deviceCombo = qt.QComboBox()
        self.deviceCombo.addItems(["auto", "cuda", "mps", "cpu"])
        self.scriptedEffect.addLabeledOptionsWidget("Device:", self.deviceCombo)
        self.negativeOthers = qt.QCheckBox("other visible segments are negative prompts")
        self.scriptedEffect.addOptionsWidget(self.negativeOthers)
        self.setupButtons()

        for w, signal in ((self.checkpointCombo, "currentIndexChanged(int)"),
                          (self.adapterCombo, "currentTextChanged(QString)"),
                          (self.modeCombo, "currentIndexChanged(int)"), (self.scopeCombo, "currentIndexChanged(int)"),
                          (self.rangeFirst, "valueChanged(int)"), (self.rangeLast, "valueChanged(int)"),
                          (self.customWindow, "toggled(bool)"), (self.windowCenter, "valueChanged(double)"),
                          (self.windowWidth, "valueChanged(double)"), (self.deviceCombo, "currentIndexChanged(int)"),
                          (self.negativeOthers, "toggled(bool)")):
            w.connect(signal, self.updateMRMLFromGUI)

    def setupButtons(self):
        buttons = qt.QHBoxLayout()
        self.previewButton = qt.QPushButton("Preview")
        self.propagateButton = qt.QPushButton("Propagate")
        self.applyButton = qt.QPushButton("Apply")
        self.clearButton = qt.QPushButton("Clear")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        for b in (self.previewButton, self.propagateButton, self.applyButton, self.clearButton):
            buttons.addWidget(b)
        self.scriptedEffect.addOptionsWidget(buttons)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.previewButton.connect("clicked()", self.onPreview)
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.applyButton.connect("clicked()", self.onApply)
        self.clearButton.connect("clicked()", self.onClear)

    def fillAdapters(self):
        from PromiseSegmentSlicerLib.adapters import installed_adapters

        current = self.adapterCombo.currentText
        wasBlocked = self.adapterCombo.blockSignals(True)  # refilling must not change the parameter
        self.adapterCombo.clear()
        self.adapterCombo.addItem("")  # none: clicks with plain SAM
        for path in installed_adapters():
            self.adapterCombo.addItem(str(path))
        self.adapterCombo.currentText = current
        self.adapterCombo.blockSignals(wasBlocked)

    def activate(self):
        self.fillAdapters()  # adapters imported or trained since the effect was set up

    def setMRMLDefaults(self):
        for name, value in (("Backbone", USER_BACKBONES[0]), ("Adapter", ""), ("Mode", "box"), ("Scope", SCOPES[0]),
                            ("RangeFirst", 0), ("RangeLast", 0), ("CustomWindow", 0), ("WindowCenter", 40),
                            ("WindowWidth", 400), ("Device", "auto"), ("NegativeOthers", 0)):
            self.scriptedEffect.setParameterDefault(name, value)

    def updateGUIFromMRML(self):
        p = self.scriptedEffect
        widgets = [self.checkpointCombo, self.adapterCombo, self.modeCombo, self.scopeCombo, self.rangeFirst,
                   self.rangeLast, self.customWindow, self.windowCenter, self.windowWidth, self.deviceCombo,
                   self.negativeOthers]
        blocked = [w.blockSignals(True) for w in widgets]
        self.checkpointCombo.currentText = p.parameter("Backbone")
        self.adapterCombo.currentText = p.parameter("Adapter")
        self.modeCombo.currentIndex = max(0, self.modeCombo.findData(p.parameter("Mode")))
        self.scopeCombo.currentText = p.parameter("Scope")
        self.rangeFirst.value, self.rangeLast.value = p.integerParameter("RangeFirst"), p.integerParameter("RangeLast")
        self.customWindow.checked = bool(p.integerParameter("CustomWindow"))
        self.windowCenter.value, self.windowWidth.value = p.doubleParameter("WindowCenter"), p.doubleParameter(
            "WindowWidth")
        self.deviceCombo.currentText = p.parameter("Device")
        self.negativeOthers.checked = bool(p.integerParameter("NegativeOthers"))
        for w, b in zip(widgets, blocked):
            w.blockSignals(b)

    def updateMRMLFromGUI(self, *_):
        p = self.scriptedEffect
        p.setParameter("Backbone", self.checkpointCombo.currentText)
        adapter = self.adapterCombo.currentText.strip()
        if adapter != p.parameter("Adapter") and not self.customWindow.checked:
            blocked = [w.blockSignals(True) for w in (self.windowCenter, self.windowWidth)]
            self.showAdapterWindow(adapter)  # the window fields start from the new adapter's own rule
            for w, b in zip((self.windowCenter, self.windowWidth), blocked):
                w.blockSignals(b)
        p.setParameter("Adapter", adapter)
        p.setParameter("Mode", self.modeCombo.currentData)
        p.setParameter("Scope", self.scopeCombo.currentText)
        p.setParameter("RangeFirst", self.rangeFirst.value)
        p.setParameter("RangeLast", self.rangeLast.value)
        p.setParameter("CustomWindow", int(self.customWindow.checked))
        p.setParameter("WindowCenter", self.windowCenter.value)
        p.setParameter("WindowWidth", self.windowWidth.value)
        p.setParameter("Device", self.deviceCombo.currentText)
        p.setParameter("NegativeOthers", int(self.negativeOthers.checked))

    def showAdapterWindow(self, adapterPath):
        from PromiseSegmentSlicerLib.adapters import header_metadata

        try:
            rule = header_metadata(adapterPath).get("intensity") or {} if adapterPath else {}
        except (OSError, ValueError):
            rule = {}  # not (yet) a readable adapter: the error comes when it is used
        if rule.get("kind") == "window":
            self.windowCenter.value, self.windowWidth.value = rule["center"], rule["width"]
            self.customWindow.toolTip = f"off: the adapter's window {rule['center']:g}/{rule['width']:g}"
        elif rule:
            self.customWindow.toolTip = f"off: the adapter's rule ({rule.get('kind')})"
        else:
            self.customWindow.toolTip = "off: percentiles 0.5-99.5 of the volume (no adapter)"

    # ------------------------------------------------------------------ interaction
    def sourceVolume(self):
        return self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if eventId == vtk.vtkCommand.LeftButtonDoubleClickEvent:
            return True  # consumed: Slicer would maximize the view
        if self.scriptedEffect.parameter("Mode") == "box" and eventId in (vtk.vtkCommand.LeftButtonPressEvent,
                                                                        vtk.vtkCommand.LeftButtonReleaseEvent):
            xy = callerInteractor.GetEventPosition()
            self.boxEvent(self.xyToRas(xy, viewWidget), sliceNormal(viewWidget),
                          eventId == vtk.vtkCommand.LeftButtonPressEvent)
            return True  # consumed: no window/level while dragging a box
        press = vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.RightButtonPressEvent
        if eventId not in press:
            return False
        positive = eventId == vtk.vtkCommand.LeftButtonPressEvent and not callerInteractor.GetShiftKey()
        xy = callerInteractor.GetEventPosition()
        self.addClick(self.xyToRas(xy, viewWidget), sliceNormal(viewWidget), positive)
        return True  # consumed: no window/level or menu on these clicks

    def addClick(self, ras, normal, positive=True):
        """One click (RAS, slice-view normal); also the entry point of the Slicer-hosted tests."""
        with slicer.util.tryWithErrorDisplay("ProMISe could not use this click.", waitCursor=True):
            session = self._session()
            session.click(self.sourceVolume(), ras, normal, positive)
            if session.ready:
                self.onPreview()

    def boxEvent(self, ras, normal, pressed):
        """Box mode: button down starts a drag, button up ends it (then previews)."""
        with slicer.util.tryWithErrorDisplay("ProMISe could not use this box.", waitCursor=not pressed):
            session = self._session()
            if pressed:
                session.press(self.sourceVolume(), ras, normal)
                return
            session.release(self.sourceVolume(), ras, normal)
            if session.ready:
                self.onPreview()

    def onPreview(self):
        from PromiseSegmentSlicerLib.mrml import update_preview

        with slicer.util.tryWithErrorDisplay("ProMISe preview failed.", waitCursor=True):
            session = self._session()
            if session.volume_node is None and session.mode == "automatic":
                self.locateCurrentSlice(session)
            mask = session.preview(intensity=self.intensity(), **self.modelArgs())
            labelmap, _ = session.labelmap(self.segmentationNode())
            self.previewNode = update_preview(slicer.mrmlScene, self.previewNode, self.sourceVolume(), labelmap)
            self.statusLabel.text = f"preview on slice {session.index}: {int(mask.sum())} pixels; Apply to keep it"

    def locateCurrentSlice(self, session):
        """Automatic mode without a click: the slice shown in the red view."""
        sliceWidget = slicer.app.layoutManager().sliceWidget("Red")
        sliceNode = sliceWidget.mrmlSliceNode()
        sliceToRas = sliceNode.GetSliceToRAS()
        ras = [sliceToRas.GetElement(r, 3) for r in range(3)]
        session.locate(self.sourceVolume(), ras, sliceNormal(sliceWidget))

    def segmentationNode(self):
        return self.scriptedEffect.parameterSetNode().GetSegmentationNode()

    def onClear(self):
        from PromiseSegmentSlicerLib.mrml import remove_preview

        if self.session is not None:
            self.session.clear()
        remove_preview(self.previewNode)
        self.previewNode = None
        self.statusLabel.text = ""

    def onApply(self):
        """Writes the preview (current slice) or runs the chosen scope, then one modify call = one undo step."""
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        scope = self.scriptedEffect.parameter("Scope")
        with slicer.util.tryWithErrorDisplay("ProMISe failed; the segment was not changed.", waitCursor=True):
            if scope == SCOPES[0]:
                labelmap, extent = self._session().labelmap(self.segmentationNode())
            else:
                labelmap, extent = self.runScope(scope)
                if labelmap is None:
                    return  # cancelled: nothing changed
            self.modify(labelmap, extent)
            self.onClear()

    def modify(self, labelmap, extent):
        self.scriptedEffect.saveStateForUndo()
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            labelmap, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet, list(extent))

    def runScope(self, scope):
        from PromiseSegmentLib.errors import Cancelled
        from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, slice_extent, volume_ijk_to_ras

        volume, segmentation = self.sourceVolume(), self.segmentationNode()
        session = self._session()
        axis = session.axis if session.axis is not None else "axial"
        sliceRange = None
        if scope == SCOPES[1]:
            sliceRange = (self.scriptedEffect.integerParameter("RangeFirst"),
                          self.scriptedEffect.integerParameter("RangeLast"))
        try:
            mask = self.withProgress(
                f"ProMISe: segmenting ({scope})", lambda progress, cancel: self.logic.predictVolume(
                    volume, axis, sliceRange, mode="auto", intensity=self.intensity(), segmentationNode=segmentation,
                    progress=progress, cancel=cancel, **self.modelArgs()))
        except Cancelled:
            logging.info("ProMISe: cancelled, segment unchanged")
            return None, None
        from PromiseSegmentLib.preprocessing import resolve_axis

        m = volume_ijk_to_ras(volume, segmentation)
        ax = resolve_axis(axis, m)
        extent = slice_extent(mask.shape, ax, *(sliceRange or (0, mask.shape[ax] - 1)))
        return labelmap_from_mask(mask, m, extent), extent

    def withProgress(self, title, call):
        """``call(progress, cancel)`` under the module's progress dialog; ``self.progress`` while it runs
        (the Slicer-hosted test presses its Cancel)."""
        import PromiseSegment

        with PromiseSegment.ProgressWithCancel(title) as self.progress:
            try:
                return call(self.progress.progress, self.progress.cancelled)
            finally:
                self.progress = None

    def onPropagate(self):
        """From the previewed (accepted) slice to its neighbours, then Apply-able as one step."""
        from PromiseSegmentLib.errors import Cancelled

        session = self._session()
        with slicer.util.tryWithErrorDisplay("ProMISe propagation failed; the segment was not changed.",
                                             waitCursor=True):
            if session.preview_mask is None:
                raise ValueError("preview and accept a slice first (click, then Propagate)")
            volume = self.sourceVolume()
            negative = None
            if self.scriptedEffect.integerParameter("NegativeOthers"):
                from PromiseSegmentSlicerLib.logic import visible_other_segments_mask

                negative = visible_other_segments_mask(self.segmentationNode(), volume,
                                                       self.scriptedEffect.parameterSetNode().GetSelectedSegmentID())
            model = self.logic.loadModel(**self.modelArgs())
            try:
                results = self.withProgress("ProMISe: propagating", lambda progress, cancel: self.logic.propagate(
                    volume, session.axis, session.index, session.preview_mask, negativeMask=negative, model=model,
                    progress=progress, cancel=cancel))
            except Cancelled:
                return
            results[session.index] = session.preview_mask
            labelmap, extent = self.logic.slicesLabelmap(volume, session.axis, results, self.segmentationNode())
            self.modify(labelmap, extent)
            self.statusLabel.text = f"propagated to slices {min(results)}..{max(results)}"
            self.onClear()

    def deactivate(self):
        self.onClear()

    def cleanup(self):
        self.onClear()
        AbstractScriptedSegmentEditorEffect.cleanup(self)


def sliceNormal(sliceWidget):
    sliceToRas = sliceWidget.mrmlSliceNode().GetSliceToRAS()
    return [sliceToRas.GetElement(r, 2) for r in range(3)]
