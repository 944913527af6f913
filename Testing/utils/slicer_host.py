"""A running 3D Slicer, re-enacted in a plain interpreter on the ``slicer-core`` wheel, for the loading and
effect tests (each in a fresh subprocess: ``install()`` puts stand-ins into ``sys.modules``).

Real: ``slicer`` (MRML, ``vtkSlicerSegmentEditorLogic``, ``slicer.util``), ``vtk``. Stand-ins, only for what
slicer-core lacks, each mirroring the Slicer source named in its docstring (Slicer/Slicer HEAD 583e9b3):
``qt`` (PythonQt's Qt 5 wrappers, the few classes the extension uses), ``slicer.app``, ``slicer.i18n``,
``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``SegmentEditorEffects``,
``qSlicerSegmentationsEditorEffectsPythonQt``, the effect factory and ``qMRMLSegmentEditorWidget``.

The loading paths are the C++ ones step for step: ``load_scripted_module`` is
qSlicerScriptedLoadableModuleFactory + qSlicerScriptedLoadableModule::setPythonSource, and the scripted
effect's ``setPythonSource`` is qSlicerSegmentEditorScriptedEffect::setPythonSource with
qSlicerScriptedUtils::loadSourceAsModule. An exception PythonQt would catch and print (a slot, a timer,
a Python method called from C++) is recorded in ``ERRORS``; Slicer's test runner fails on those.
"""

from __future__ import annotations

import os
import sys
import traceback
import types

ERRORS: list = []


def record_error():
    ERRORS.append(traceback.format_exc())


def call_python(method, *args):
    """PythonQtObjectPtr / qSlicerPythonCppAPI::callMethod: an exception is printed, None is returned."""
    try:
        return method(*args)
    except Exception:
        record_error()
        return None


# ---------------------------------------------------------------------------------------------- qt
class QObject:
    """PythonQt wrapper semantics: properties as attributes, string signals, ``blockSignals``; once the C++
    object is deleted every access raises, as PythonQt does ("Trying to call ... on a destroyed ...")."""

    def __init__(self, parent=None):
        object.__setattr__(self, "_deleted", False)
        self._slots, self._blocked, self._children = {}, False, []
        if isinstance(parent, QObject):
            parent._children.append(self)

    def __getattribute__(self, name):
        if not name.startswith("_") and object.__getattribute__(self, "_deleted"):
            raise RuntimeError(f"Trying to call '{name}' on a destroyed {type(self).__name__} object")
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_") and object.__getattribute__(self, "_deleted"):
            raise RuntimeError(f"Trying to set '{name}' on a destroyed {type(self).__name__} object")
        object.__setattr__(self, name, value)

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot=None):
        slots = self._slots.get(signal, [])
        if slot is None:
            slots.clear()
        elif slot in slots:
            slots.remove(slot)
        return True

    def blockSignals(self, block):
        old, self._blocked = self._blocked, bool(block)
        return old

    def _emit(self, signal, *args):
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                call_python(slot, *args)

    def _delete(self):
        for child in self._children:
            child._delete()
        self._slots.clear()
        object.__setattr__(self, "_deleted", True)


class QWidget(QObject):
    def __init__(self, *args):
        parent = args[-1] if args and isinstance(args[-1], QObject) else None
        super().__init__(parent)
        self.toolTip, self.objectName, self.enabled, self.visible = "", "", True, False

    def show(self):
        self.visible = True

    def setVisible(self, visible):
        self.visible = visible


class QLabel(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self.wordWrap = text, False


class QPushButton(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text = text

    def click(self):
        self._emit("clicked()")


class QCheckBox(QWidget):
    def __init__(self, text="", parent=None):
        super().__init__(parent)
        self.text, self._checked = text, False

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self._emit("toggled(bool)", self._checked)


class QComboBox(QWidget):
    """QComboBox: adding the first item selects it; ``currentText`` on an editable combo sets the edit text
    (QComboBox::setCurrentText), otherwise selects the matching item."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._items, self._index, self._editText, self.editable = [], -1, "", False

    def addItem(self, text, data=None):
        self._items.append((text, data))
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def clear(self):
        self._items = []
        self.currentIndex = -1

    def count(self):
        return len(self._items)

    def findData(self, data):
        return next((n for n, (_, d) in enumerate(self._items) if d == data), -1)

    def findText(self, text):
        return next((n for n, (t, _) in enumerate(self._items) if t == text), -1)

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        index = index if 0 <= index < len(self._items) else -1
        if index == self._index:
            return
        self._index = index
        self._editText = self._items[index][0] if index >= 0 else ""
        self._emit("currentIndexChanged(int)", index)
        self._emit("currentTextChanged(QString)", self._editText)

    @property
    def currentText(self):
        return self._editText if self.editable else (self._items[self._index][0] if self._index >= 0 else "")

    @currentText.setter
    def currentText(self, text):
        if not self.editable:
            found = self.findText(text)
            if found >= 0:
                self.currentIndex = found
            return
        if text != self._editText:
            self._editText = text
            self._emit("currentTextChanged(QString)", text)

    @property
    def currentData(self):
        return self._items[self._index][1] if self._index >= 0 else None


class QSpinBox(QWidget):
    """QSpinBox / QDoubleSpinBox: values are clamped (and, for doubles, rounded to ``decimals``, 2 by
    default) before ``valueChanged`` is emitted."""

    signal, kind = "valueChanged(int)", int

    def __init__(self, parent=None):
        super().__init__(parent)
        self.minimum, self.maximum, self.decimals, self._value = 0, 99, 2, self.kind(0)

    def _clean(self, value):
        return self.kind(min(max(value, self.minimum), self.maximum))

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        value = self._clean(value)
        if value != self._value:
            self._value = value
            self._emit(self.signal, value)


class QDoubleSpinBox(QSpinBox):
    signal, kind = "valueChanged(double)", float

    def __init__(self, parent=None):
        super().__init__(parent)
        self.maximum = 99.99

    def _clean(self, value):
        return round(super()._clean(value), self.decimals)


class QLayout(QObject):
    def __init__(self, parent=None):
        super().__init__(parent if isinstance(parent, QObject) else None)
        self.items = []

    def addWidget(self, widget, *args):
        self.items.append(widget)
        self._children.append(widget)

    def addLayout(self, layout, *args):
        self.addWidget(layout)

    def addRow(self, *items):
        for item in items:
            if isinstance(item, QObject):
                self.addWidget(item)


PENDING: list = []  # timers due at the next processEvents (every timer here has interval 0)


class QTimer(QObject):
    """QTimer: ``QTimer.singleShot(msec, callable)`` queues a call nothing can cancel; an instance fires
    ``timeout()`` from the event loop until stopped (once when single-shot)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._single, self._interval, self._active = False, 0, False

    @staticmethod
    def singleShot(msec, callable_):
        PENDING.append(callable_)

    def setSingleShot(self, single):
        self._single = bool(single)

    def setInterval(self, msec):
        self._interval = msec

    def isActive(self):
        return self._active

    def start(self):
        self._active = True
        if self not in PENDING:
            PENDING.append(self)

    def stop(self):
        self._active = False
        if self in PENDING:
            PENDING.remove(self)

    def _fire(self):
        if self._deleted or not self._active:
            return
        if self._single:
            self._active = False
        else:
            PENDING.append(self)
        self._emit("timeout()")


def process_events():
    """One pass of the event loop: the timers due now."""
    due, PENDING[:] = list(PENDING), []
    for item in due:
        if isinstance(item, QTimer):
            item._fire()
        else:
            call_python(item)


def image_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


class QSize:
    def __init__(self, w, h):
        self._w, self._h = w, h

    def width(self):
        return self._w

    def height(self):
        return self._h


class QPixmap:
    def __init__(self, path=None):
        self._size = image_size(path) if path and os.path.exists(path) else (0, 0)

    def width(self):
        return self._size[0]

    def height(self):
        return self._size[1]

    def isNull(self):
        return self._size == (0, 0)


class QIcon:
    def __init__(self, path=None):
        self.path = path if path and os.path.exists(path) else None

    def isNull(self):
        return self.path is None

    def availableSizes(self):
        return [QSize(*image_size(self.path))] if self.path else []


class QCursor:
    def __init__(self, pixmap=None, hotX=-1, hotY=-1):
        self._pixmap, self._hot = pixmap, (hotX, hotY)

    def pixmap(self):
        return self._pixmap

    def hotSpot(self):
        return QPoint(*self._hot)


class QPoint:
    def __init__(self, x=0, y=0):
        self._xy = (x, y)

    def x(self):
        return self._xy[0]

    def y(self):
        return self._xy[1]


class QVector3D:
    def __init__(self, x=0.0, y=0.0, z=0.0):
        self._v = (float(x), float(y), float(z))

    def x(self):
        return self._v[0]

    def y(self):
        return self._v[1]

    def z(self):
        return self._v[2]


class QApplication:
    @staticmethod
    def setOverrideCursor(cursor):
        pass

    @staticmethod
    def restoreOverrideCursor():
        pass


def qt_module():
    qt = types.ModuleType("qt")
    for cls in (
        QObject,
        QWidget,
        QLabel,
        QPushButton,
        QCheckBox,
        QComboBox,
        QSpinBox,
        QDoubleSpinBox,
        QTimer,
        QPixmap,
        QIcon,
        QCursor,
        QPoint,
        QVector3D,
        QSize,
        QApplication,
    ):
        setattr(qt, cls.__name__, cls)
    qt.QFrame = qt.QLineEdit = QWidget
    qt.QHBoxLayout = qt.QVBoxLayout = qt.QFormLayout = QLayout
    qt.Qt = types.SimpleNamespace(WindowModal=2, WaitCursor=3, ArrowCursor=0)
    qt.QMessageBox = types.SimpleNamespace(Ok=0x400, Cancel=0x400000, Critical=3, Question=4, Information=1, Warning=2)
    return qt


# ---------------------------------------------------------------------------------------------- slicer
class Application(QObject):
    """qSlicerApplication as the extension sees it: ``connect("startupCompleted()", ...)``, testing mode
    (slicer.util's message boxes only log), ``processEvents``."""

    applicationName = "Slicer"

    def __init__(self):
        super().__init__()
        self.layout = LayoutManager()

    def testingEnabled(self):
        return True

    def processEvents(self, *args):
        process_events()

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    def layoutManager(self):
        return self.layout


class SliceWidget(QWidget):
    """qMRMLSliceWidget: a real vtkMRMLSliceNode and a real VTK interactor."""

    def __init__(self, name="Red"):
        import slicer
        import vtk

        super().__init__()
        self.node = slicer.vtkMRMLSliceNode()
        self.node.SetName(name)
        self.node.SetLayoutName(name)
        self.node.SetDimensions(256, 256, 1)
        self.node.SetFieldOfView(256.0, 256.0, 1.0)
        self.node.UpdateMatrices()
        self.interactor = vtk.vtkRenderWindowInteractor()

    def className(self):
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):
        return self.node


class LayoutManager:
    def __init__(self):
        self.widgets = {}

    def sliceWidget(self, name):
        return self.widgets.setdefault(name, SliceWidget(name))


class EffectFactory:
    """qSlicerSegmentEditorEffectFactory (Modules/Loadable/Segmentations/EditorEffects/
    qSlicerSegmentEditorEffectFactory.cxx): registerEffect refuses a second effect of the same name;
    copyEffects clones every registered effect not yet in the list."""

    _instance = None

    def __init__(self):
        self.registered = []

    @classmethod
    def instance(cls):
        cls._instance = cls._instance or cls()
        return cls._instance

    def registerEffect(self, effect):
        if effect is None or not effect.name or any(e.name == effect.name for e in self.registered):
            return False
        self.registered.append(effect)
        return True

    def registeredEffects(self):
        return list(self.registered)

    def copyEffects(self, effects):
        copied = []
        for effect in self.registered:
            if any(e.name == effect.name for e in effects):
                continue
            clone = effect.clone()
            if clone is not None:
                effects.append(clone)
                copied.append(clone)
        return copied


def load_source_as_module(module_name, file_path):
    """qSlicerScriptedUtils::loadSourceAsModule (Base/QTCore/qSlicerScriptedUtils.cxx): the same Python
    statements, run in ``__main__``'s globals with a fresh local dict; a failure is printed, not raised."""
    code = (
        "import importlib.util;import sys;"
        f"spec = importlib.util.spec_from_file_location({module_name!r}, {file_path!r});"
        "module = importlib.util.module_from_spec(spec);"
        f"sys.modules[{module_name!r}] = module;"
        "spec.loader.exec_module(module)"
    )
    try:
        exec(code, vars(sys.modules["__main__"]), {})
        return True
    except Exception:
        record_error()
        return False


def class_from_source(module_name, class_name, file_path):
    """The lookup both setPythonSource implementations share: the class from ``sys.modules[module_name]``
    if that module has it, else load the file as that module and look again."""
    module = sys.modules.get(module_name)
    if module is not None and hasattr(module, class_name):
        return getattr(module, class_name)
    if not load_source_as_module(module_name, file_path):
        return None
    return getattr(sys.modules.get(module_name), class_name, None)


class ModuleParent:
    """qSlicerScriptedLoadableModule: what a ScriptedLoadableModule's ``parent`` holds."""

    def __init__(self, name):
        self.name, self.title, self.categories, self.dependencies = name, name, [], []
        self.contributors, self.helpText, self.acknowledgementText, self.hidden = [], "", "", False


def load_scripted_module(path):
    """qSlicerScriptedLoadableModuleFactory (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx: the
    module's folder is *appended* to sys.path) + qSlicerScriptedLoadableModule::setPythonSource
    (Base/QTGUI/qSlicerScriptedLoadableModule.cxx: module and class name = the file's base name)."""
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:
        sys.path.append(folder)
    name = os.path.splitext(os.path.basename(path))[0]
    cls = class_from_source(name, name, path)
    if cls is None:
        raise RuntimeError(f"class {name} was not found in file {path}")
    parent = ModuleParent(name)
    return call_python(cls, parent), parent


class ScriptedEffect(QObject):
    """qSlicerSegmentEditorScriptedEffect + qSlicerSegmentEditorAbstractEffect (Modules/Loadable/
    Segmentations/EditorEffects/): setPythonSource, the parameter API on the editor node's attributes,
    modify/undo through the editor's real vtkSlicerSegmentEditorLogic, the Python method calls."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.name, self.title, self.perSegment, self.requireSegments = "", "", True, True
        self._python, self._node, self._logic, self._active, self._frame = None, None, None, False, QWidget()
        self.sourcePath = None

    # qSlicerSegmentEditorScriptedEffect::setPythonSource (~146-188)
    def setPythonSource(self, path):
        if not path.endswith((".py", ".pyc")):
            return False
        module_name = os.path.basename(os.path.dirname(path))  # the parent folder's name
        class_name = os.path.splitext(os.path.basename(path))[0]
        class_name += "" if class_name.endswith("Effect") else "Effect"
        cls = class_from_source(module_name, class_name, path)
        if not isinstance(cls, type):
            ERRORS.append(
                f"Failed to load segment editor scripted effect: class {class_name} was not found in "
                f"{path} (found {cls!r})"
            )
            return False
        self._python = call_python(cls, self)  # PythonCppAPI.instantiateClass(this, className, class)
        if self._python is None:
            return False
        self.sourcePath = path
        import slicer

        setattr(slicer, module_name, self._python)  # setModuleAttribute("slicer", moduleName, self)
        return True

    def self(self):
        return self._python

    def _call(self, method, *args, default=None):
        function = getattr(self._python, method, None)
        return default if function is None else call_python(function, *args)

    def clone(self):
        return self._call("clone")

    def icon(self):
        return self._call("icon", default=QIcon())

    def createCursor(self, viewWidget):
        """qSlicerSegmentEditorScriptedEffect::createCursor, falling back to the abstract effect's (~320-357):
        the effect icon's first size stacked under the 21x21 NullEffect arrow, squared."""
        if hasattr(self._python, "createCursor"):
            return self._call("createCursor", viewWidget)
        icon = self.icon()
        if icon.isNull():
            return QCursor(QPixmap(), 10, 0)
        size = icon.availableSizes()[0]
        side = max(21, size.width(), 21 + size.height())
        cursor = QPixmap()
        cursor._size = (side, side)
        return QCursor(cursor, side // 2 - 10 + 5, 2)

    def optionsFrame(self):
        return self._frame

    def addOptionsWidget(self, widget):
        self._frame._children.append(widget)

    def addLabeledOptionsWidget(self, label, widget):
        self.addOptionsWidget(widget)

    def active(self):
        return self._active

    def activate(self):  # the base class first, then Python
        self._active = True
        self._call("activate")

    def deactivate(self):
        self._active = False
        self._call("deactivate")

    # the parameter API (qSlicerSegmentEditorAbstractEffect.cxx ~541-877)
    def parameterSetNode(self):
        return self._node

    def parameter(self, name):
        value = self._node.GetAttribute(f"{self.name}.{name}")
        return value if value is not None else (self._node.GetAttribute(name) or "")

    def integerParameter(self, name):
        try:
            return int(self.parameter(name))
        except ValueError:
            return 0

    def doubleParameter(self, name):
        try:
            return float(self.parameter(name))
        except ValueError:
            return 0.0

    @staticmethod
    def _string(value):
        """PythonQt picks the overload by the Python type: QString, int, or double = QString::number(value)
        (format 'g', 6 significant digits)."""
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int)):
            return str(int(value))
        return f"{value:.6g}"

    def setParameter(self, name, value):
        self.setCommonParameter(f"{self.name}.{name}", self._string(value))

    def parameterDefined(self, name):
        return bool(self._node.GetAttribute(f"{self.name}.{name}"))

    def setParameterDefault(self, name, value):
        if not self.parameterDefined(name):
            self.setParameter(name, value)

    def setCommonParameter(self, name, value):
        old = self._node.GetAttribute(name)
        if (old is None and value == "") or value == old:
            return
        self._node.SetAttribute(name, value)
        self._node.InvokeCustomModifiedEvent(self._node.EffectParameterModified)

    # results
    def defaultModifierLabelmap(self):
        return self._logic.GetModifierLabelmap() if self._logic.ResetModifierLabelmapToDefault() else None

    def saveStateForUndo(self):
        self._logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, *rest):
        """The overloads (labelmap, mode[, bypassMasking]) and (labelmap, mode, QList<int> extent[, bypass])."""
        extent = list(rest[0]) if rest and isinstance(rest[0], (list, tuple)) else [0, -1, 0, -1, 0, -1]
        if rest and isinstance(rest[0], (list, tuple)) and len(rest[0]) != 6:
            raise ValueError("extent must have 6 int values")
        bypass = bool(rest[-1]) if rest and not isinstance(rest[-1], (list, tuple)) else False
        segment_id = self._node.GetSelectedSegmentID() or ""
        self._logic.ModifySegmentByLabelmap(
            self._node.GetSegmentationNode(), segment_id, labelmap, mode, extent, self.perSegment, bypass
        )

    def confirmCurrentSegmentVisible(self):
        return 1  # ConfirmedWithoutDialog: the tests' segments are visible

    def xyToRas(self, point, viewWidget):
        import slicer

        ras = [0.0, 0.0, 0.0]
        slicer.vtkSlicerSegmentEditorLogic.XyzToRas([point.x(), point.y(), 0.0], ras, viewWidget.mrmlSliceNode())
        return QVector3D(*ras)


class SegmentEditorWidget(QWidget):
    """qMRMLSegmentEditorWidget (Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.cxx):
    ``updateEffectList`` (~498-545) clones the factory's effects, gives each the editor node
    (setMRMLDefaults, EffectParameterModified -> updateGUIFromMRML) and calls setupOptionsFrame; switching
    effects deactivates the old one and activates the new (~1070-1100); the destructor (~279-290) calls
    every effect's cleanup and deletes it."""

    def __init__(self, app, segmentation_node, volume_node, segment_id):
        super().__init__()
        self.app, self.effects, self.active = app, [], None
        self.logic, self.node = app.editor(segmentation_node, volume_node, segment_id)
        self.updateEffectList()

    def updateEffectList(self):
        for effect in EffectFactory.instance().copyEffects(self.effects):
            effect._node, effect._logic = self.node, self.logic
            effect._call("setMRMLDefaults")
            self.node.AddObserver(
                self.node.EffectParameterModified, lambda *_, e=effect: e._deleted or e._call("updateGUIFromMRML")
            )
            effect._call("setupOptionsFrame")

    def effectByName(self, name):
        return next((e for e in self.effects if e.name == name), None)

    def setActiveEffectByName(self, name):
        effect = self.effectByName(name)
        if effect is self.active:
            return
        if self.active is not None:
            self.active.deactivate()
        self.active = effect
        if effect is not None:
            effect.activate()

    def activeEffect(self):
        return self.active

    def undo(self):
        self.logic.Undo()

    def delete(self):
        for effect in self.effects:
            effect._call("cleanup")
            effect._frame._delete()
            effect._delete()
        self.effects, self.active = [], None
        self._delete()


# ---------------------------------------------------------------------------------------------- modules
def scripted_loadable_module():
    """slicer.ScriptedLoadableModule (Base/Python/slicer/ScriptedLoadableModule.py), the parts used."""
    import unittest

    import slicer

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__.removesuffix("Logic")

        def getParameterNode(self):
            return slicer.mrmlScene.GetSingletonNode(
                self.moduleName, "vtkMRMLScriptedModuleNode"
            ) or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleTest,
    ):
        setattr(module, cls.__name__, cls)
    return module


def parameter_node_wrapper():
    """slicer.parameterNodeWrapper (Base/Python/slicer/parameterNodeWrapper/): the decorator wraps a node;
    ``Choice`` and ``WithinRange`` annotate. Only what declaring the class needs."""
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def parameterNodeWrapper(cls):
        def __init__(self, node=None):
            self.parameterNode = node

        cls.__init__ = __init__
        return cls

    module.parameterNodeWrapper = parameterNodeWrapper
    module.Choice = lambda choices: ("Choice", tuple(choices))
    module.WithinRange = lambda low, high: ("WithinRange", low, high)
    return module


def i18n():
    """slicer.i18n (Base/Python/slicer/i18n.py) with no translation loaded: text comes back unchanged."""
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


def segment_editor_effects():
    """SegmentEditorEffects (Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/
    AbstractScriptedSegmentEditorEffect.py): the base class, imported as Slicer's Segmentations module
    does before any extension registers an effect (qSlicerSegmentationsModule.cxx ~201)."""
    import qt
    import slicer

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect):
            self.scriptedEffect = scriptedEffect

        def register(self):
            slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

        def cleanup(self):
            pass

        def xyToRas(self, xy, viewWidget):
            ras = self.scriptedEffect.xyToRas(qt.QPoint(xy[0], xy[1]), viewWidget)
            return [ras.x(), ras.y(), ras.z()]

    package = types.ModuleType("SegmentEditorEffects")
    package.__path__ = []
    base = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")
    base.AbstractScriptedSegmentEditorEffect = package.AbstractScriptedSegmentEditorEffect = (
        AbstractScriptedSegmentEditorEffect
    )
    package.__all__ = base.__all__ = ["AbstractScriptedSegmentEditorEffect"]
    return package, base


def install():
    """Put the stand-ins where a running Slicer has the real ones, in the order Slicer starts up."""
    import slicer

    sys.modules["qt"] = qt_module()
    slicer.app = Application()
    for name, module in (
        ("i18n", i18n()),
        ("ScriptedLoadableModule", scripted_loadable_module()),
        ("parameterNodeWrapper", parameter_node_wrapper()),
    ):
        sys.modules[f"slicer.{name}"] = module
        setattr(slicer, name, module)
    slicer.qSlicerSegmentEditorEffectFactory = EffectFactory
    slicer.qSlicerSegmentEditorAbstractEffect = types.SimpleNamespace(
        ModificationModeSet=0,
        ModificationModeAdd=1,
        ModificationModeRemove=2,
        ModificationModeRemoveAll=3,
        NotConfirmed=0,
        ConfirmedWithoutDialog=1,
        ConfirmedWithDialog=2,
    )
    slicer.modules = types.SimpleNamespace()
    effects = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    effects.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = effects
    package, base = segment_editor_effects()
    sys.modules["SegmentEditorEffects"] = package
    sys.modules["SegmentEditorEffects.AbstractScriptedSegmentEditorEffect"] = base


def startup_completed():
    import slicer

    slicer.app._emit("startupCompleted()")
