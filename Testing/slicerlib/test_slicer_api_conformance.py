"""Every Slicer/VTK/Qt name the Slicer-facing files use must exist: no Slicer runs in CI, so a misspelt or
removed API would otherwise only fail in a user's Slicer. The files are parsed (ast) at test time.

* CamelCase members (``node.GetSegmentation()``, ``vtk.vtkCommand.ModifiedEvent``) are looked up on the real
  classes of ``slicer-core`` and ``vtk``: on the receiver's class (or a subclass) where it is known
  (``slicer.vtkX``, a variable made by ``slicer.vtkX()`` or ``AddNewNodeByClass("vtkX")``, a return type from
  VTK's signatures or from an ``UNCHECKABLE`` entry), else on any vtkMRML/vtkSlicer/vtkSegment/vtkOrientedImage
  class or vtk class the files name; a call's argument count must fit one of the documented signatures.
* Qt/CTK/qSlicer/PythonQt names (on ``scriptedEffect``, ``slicer.app``, ``slicer.util``, ``qt``, ``ctk``,
  ``slicer.q*``, the widgets and objects those make or return, Slicer base-class members, host imports, signal
  signatures) cannot be checked here: each must be in ``UNCHECKABLE`` (end of this file) with the Slicer source
  (or Qt documentation) that was read for it.
"""

import ast
import functools
import re
import unittest
from pathlib import Path

import slicer
import vtk

ROOT = Path(__file__).resolve().parents[2] / "PromiseSegment"
HOST = re.compile(r"(qt|ctk|slicer|SegmentEditorEffects|PyTorchUtils|q(Slicer|MRML)\w*)(\.|$)")  # host imports
CLASSLIKE = re.compile(r"[A-Z]|q[A-Z]|ctk[A-Z]")  # Qt/CTK/qSlicer/Python class names
FACTORY = re.compile(r"create|find|get|mainWindow")  # slicer.util functions that return Qt/MRML objects
SIGNAL = re.compile(r"[a-z]\w*\([\w:*&, ]*\)")  # Qt signal signatures such as "clicked(bool)"
# the effect's Slicer-called methods get these (no call site in the files): AbstractScriptedSegmentEditorEffect.py:49
# __init__(self, scriptedEffect); qSlicerSegmentEditorAbstractEffect.h:180 processInteractionEvents(
# vtkRenderWindowInteractor* callerInteractor, unsigned long eid, qMRMLWidget* viewWidget). True: a Qt/Slicer object
SEEDS = {"scriptedEffect": True, "viewWidget": True, "callerInteractor": "vtkRenderWindowInteractor"}
EXTRA_VTK = {"vtkRenderWindowInteractor"}  # vtk classes used but never named: see SEEDS
NOT_VTK = {}  # CamelCase methods that are not VTK/MRML, {name: why}; keep it short (none so far)
PYTHON_TEST = set(dir(unittest.TestCase))  # ScriptedLoadableModuleTest is a unittest.TestCase: Python's own
SLICER_CLASSES = [
    getattr(slicer, n) for n in dir(slicer) if n.startswith(("vtkMRML", "vtkSlicer", "vtkSegment", "vtkOrientedImage"))
]


def slicer_files():
    return sorted(
        {
            ROOT / "PromiseSegment.py",
            *ROOT.glob("PromiseSegmentSlicerLib/*.py"),
            *ROOT.glob("SegmentEditorPromiseSegmentLib/*.py"),
            *ROOT.glob("Testing/Python/*.py"),
        }
    )


def vtk_class(name):
    return (getattr(slicer, name, None) or getattr(vtk, name, None)) if re.fullmatch(r"vtk[A-Z]\w*", name) else None


def family(cls):
    """``cls`` and its subclasses (VTK returns the most derived class of a declared return type)."""
    out = [cls]
    for c in out:
        out += [s for s in c.__subclasses__() if s not in out]
    return out


def lookup(classes, member):
    """(is ``member`` on one of ``classes``, the vtk class it returns where they agree)."""
    having = [c for c in classes if hasattr(c, member)]
    returns = {r for c in having for r in re.findall(r"->\s*(vtk\w+)\s*\nC\+\+", getattr(c, member).__doc__ or "")}
    return bool(having), returns.pop() if len(returns) == 1 else None


def is_obj(k):
    return isinstance(k, str) and k.startswith("obj:")


def arities(classes, member):
    """(required, all) parameter counts of each Python signature VTK documents for ``member``."""
    out = []
    for doc in {getattr(c, member).__doc__ or "" for c in classes if hasattr(c, member)}:
        for m in re.finditer(rf"(?m)^{member}\(", doc):
            depth, params = 1, [""]
            for ch in doc[m.end() :]:
                depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(ch, 0)
                if depth == 0:
                    break
                params += [""] if ch == "," and depth == 1 else []
                params[-1] += "" if ch == "," and depth == 1 else ch
            params = [q.strip() for q in params if q.strip()]
            params = params[1:] if params[:1] == ["self"] else params
            out.append((sum("=" not in q for q in params), len(params)))
    return out


def join(a, b):
    if a is None or a == b:
        return b
    if b is None:
        return a
    return tuple(map(join, a, b)) if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) else "?"


class Api:
    """Walks the files and infers a kind for expressions: None (a Python or project value), True (a Qt/Slicer
    object), "vtkX" (that class or a subclass), "obj:Class" / "obj:" (a project object of that / some class),
    "?" (mixed), a tuple (element kinds); assignments, returns and call arguments carry kinds."""

    def __init__(self, sources):
        self.nodes, self.imports, self.classes, self.defs, self.env, self.returns = [], {}, {}, {}, {}, {}
        for file, text in sources.items():
            self.walk(ast.parse(text), (file, None, ()))
        named = {m for t in sources.values() for m in re.findall(r"\bvtk[A-Z]\w+", t) if vtk_class(m)}
        self.anyclass = SLICER_CLASSES + [vtk_class(m) for m in named | EXTRA_VTK]
        self.inner = {id(n.value) for n, _ in self.nodes if isinstance(n, ast.Attribute)}
        self.called = {id(n.func): n for n, _ in self.nodes if isinstance(n, ast.Call)}
        self.arguments, self.untyped = {}, set()
        self.infer()  # optimistic; then again, where a parameter some call passes an untyped value to is "?"
        self.untyped = {
            i for i, (a, ctx) in self.arguments.items() if self.kind(a, ctx) is None and not isinstance(a, ast.Constant)
        }
        self.env, self.returns = {}, {}
        self.infer()
        self.vtk_refs, self.host_uses = [], []  # (where, name, found) / (where, name)
        for node, ctx in self.nodes:
            self.check(node, ctx)

    def infer(self):
        for _ in range(12):  # to a fixed point: assignments, returns and call arguments carry kinds
            before = repr((self.env, self.returns))
            for node, ctx in self.nodes:
                self.bind_node(node, ctx)
            if before == repr((self.env, self.returns)):
                break

    def walk(self, node, ctx):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for a in child.names:
                    top = a.name.split(".")[0]
                    if isinstance(child, ast.Import):  # import a.b binds a; import a.b as c binds c to a.b
                        self.imports[ctx[0], a.asname or top] = a.name if a.asname else top
                    else:
                        full = "." * child.level + (child.module or "") + "." + a.name
                        self.imports[ctx[0], a.asname or a.name] = full
            inner = ctx
            if isinstance(child, ast.ClassDef):
                members = (
                    {n.name for n in child.body if isinstance(n, ast.FunctionDef)}
                    | {
                        n.attr
                        for n in ast.walk(child)
                        if isinstance(n, ast.Attribute)
                        and isinstance(n.ctx, ast.Store)
                        and isinstance(n.value, ast.Name)
                        and n.value.id == "self"
                    }
                    | {n.target.id for n in child.body if isinstance(n, ast.AnnAssign)}
                )
                self.classes[child.name] = (child, ctx[0], members)
                inner = (ctx[0], child.name, ())
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = (ctx[0], ctx[1], ctx[2] + (child.name,))
                first = [a.arg for a in child.args.posonlyargs + child.args.args][:1]
                method = ctx[1] is not None and not ctx[2] and first in (["self"], ["cls"])  # called bound
                self.defs.setdefault(child.name, []).append((child, method, inner))
            self.nodes.append((child, ctx))
            self.walk(child, inner)

    def dotted(self, e, ctx):
        """``qt.QTimer.singleShot`` -> "qt.QTimer.singleShot" for chains on an imported name, else None."""
        parts = []
        while isinstance(e, ast.Attribute):
            parts, e = [e.attr] + parts, e.value
        full = isinstance(e, ast.Name) and self.imports.get((ctx[0], e.id))
        return ".".join([full] + parts) if full and self.local(e.id, ctx) is None else None

    def local(self, name, ctx):
        for i in range(len(ctx[2]), -1, -1):
            if (ctx[0], ctx[2][:i], name) in self.env:
                return self.env[ctx[0], ctx[2][:i], name]
        return None

    def hostclass(self, name):
        node, file, _ = self.classes.get(name, (None, None, None))
        return node is not None and any(
            HOST.match(self.dotted(b, (file, None, ())) or "") for b in node.bases + node.decorator_list
        )

    def inherited(self, owner, attr):
        """Is ``owner.attr`` a member of a Slicer base class (not of the project's own class)?"""
        if not is_obj(owner) or attr.startswith("__") or attr in PYTHON_TEST:
            return False
        cls = owner[4:]
        if "__getattr__" in self.classes.get(cls, (0, 0, ()))[2]:
            return False  # a class that forwards unknown names to the project's code
        if not cls:  # some project class (an effect's self()): inherited if no project class has it
            return all(attr not in members for _, _, members in self.classes.values())
        return self.hostclass(cls) and attr not in self.classes[cls][2]

    def kind(self, e, ctx):
        d = self.dotted(e, ctx)
        if d is not None:
            last = d.split(".")[-1]
            return "vtkMRMLScene" if d == "slicer.mrmlScene" else last if vtk_class(last) else None
        if isinstance(e, ast.Name):
            found = self.local(e.id, ctx)
            return "obj:" + ctx[1] if e.id == "self" and ctx[1] else found if found is not None else SEEDS.get(e.id)
        if isinstance(e, ast.Attribute):
            owner = self.kind(e.value, ctx)
            if is_obj(owner) and owner[4:]:
                known = self.env.get(("self", owner[4:], e.attr))
                return known if known is not None else True if self.inherited(owner, e.attr) else None
            return None
        if isinstance(e, ast.Call):
            return self.call_kind(e, ctx)
        if isinstance(e, (ast.Tuple, ast.List, ast.Set)):
            return tuple(self.kind(x, ctx) for x in e.elts)
        if isinstance(e, (ast.ListComp, ast.GeneratorExp, ast.SetComp)):
            return (self.kind(e.elt, ctx),)
        return join(self.kind(e.body, ctx), self.kind(e.orelse, ctx)) if isinstance(e, ast.IfExp) else None

    def call_kind(self, call, ctx):
        f, args = call.func, call.args
        strings = [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if isinstance(f, ast.Attribute) and f.attr.endswith("ByClass") and strings and vtk_class(strings[0]):
            return strings[0]
        d = self.dotted(f, ctx)
        if d is not None:
            *owner, last = d.split(".")
            if vtk_class(last):
                return last
            cls = vtk_class(owner[-1]) or (slicer.vtkMRMLScene if owner[-2:] == ["slicer", "mrmlScene"] else None)
            if cls is not None:
                return lookup(family(cls), last)[1]
            if not HOST.match(d):
                return None
            if CLASSLIKE.match(last) or owner[-1] == "app":  # a constructor, or a method of slicer.app
                return self.host_result(last)
            return True if owner == ["slicer", "util"] and FACTORY.match(last) else None  # the others give data
        if isinstance(f, ast.Name):
            if f.id == "getattr" and len(strings) == 1 and len(args) >= 2:
                return join(
                    self.kind(ast.Attribute(args[0], strings[0], ast.Load()), ctx),
                    self.kind(args[2], ctx) if len(args) > 2 else None,
                )
            return "obj:" + f.id if self.hostclass(f.id) else self.returns.get(f.id)
        if not isinstance(f, ast.Attribute):
            return None
        if f.attr == "self":
            return "obj:"  # a scripted effect's Python object: one of the project's classes
        owner = self.receiver(f, ctx)
        if isinstance(owner, str) and owner.startswith("vtk"):
            return lookup(family(vtk_class(owner)), f.attr)[1]
        if f.attr[0].isupper():
            return lookup(self.anyclass, f.attr)[1]
        return self.host_result(f.attr) if owner is True or self.inherited(owner, f.attr) else self.returns.get(f.attr)

    @staticmethod
    def host_result(name):
        """A Qt/Slicer call's result: the VTK class its UNCHECKABLE entry declares it returns, else a Qt object."""
        declared = re.search(rf"(vtk\w+)\* {name}\(", UNCHECKABLE.get(name, ""))
        return declared.group(1) if declared else True

    def receiver(self, f, ctx):
        e = f.value
        is_super = isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id == "super"
        return "obj:" + (ctx[1] or "") if is_super else self.kind(e, ctx)

    def bind(self, target, k, ctx):
        key = None
        if isinstance(target, ast.Name):
            key = (ctx[0], ctx[2], target.id)
        elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            key = ("self", ctx[1], target.attr)
        elif isinstance(target, (ast.Tuple, ast.List)) and isinstance(k, tuple):
            elts = target.elts
            star = next((i for i, t in enumerate(elts) if isinstance(t, ast.Starred)), None)
            if star is None and len(k) == len(elts):
                pairs = zip(elts, k)
            else:
                pairs = [] if star is None else [*zip(elts[:star], k), *zip(elts[star + 1 :][::-1], k[::-1])]
            for t, kk in pairs:
                self.bind(t, kk, ctx)
        if key is not None:
            self.env[key] = join(self.env.get(key), k)

    def bind_node(self, n, ctx):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                self.bind(t, self.kind(n.value, ctx), ctx)
        elif isinstance(n, (ast.For, ast.comprehension)):
            k, elem = self.kind(n.iter, ctx), None
            for x in k if isinstance(k, tuple) else ():
                elem = join(elem, x)
            self.bind(n.target, elem, ctx)
        elif isinstance(n, ast.withitem) and n.optional_vars is not None:
            self.bind(n.optional_vars, self.kind(n.context_expr, ctx), ctx)
        elif isinstance(n, ast.Return) and n.value is not None and ctx[2]:
            self.returns[ctx[2][-1]] = join(self.returns.get(ctx[2][-1]), self.kind(n.value, ctx))
        elif isinstance(n, ast.Call):  # arguments -> parameters of the project's functions of that name
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if isinstance(f, ast.Attribute) and (
                self.receiver(f, ctx) is True or HOST.match(self.dotted(f, ctx) or "")
            ):
                return  # a Slicer/Qt method of the same name
            for fn, method, scope in self.defs.get(name, ()):
                params = [a.arg for a in fn.args.posonlyargs + fn.args.args][int(method) :]
                args = [a for a in n.args if not isinstance(a, ast.Starred)]
                named = list(zip(params, args)) + [(kw.arg, kw.value) for kw in n.keywords if kw.arg in params]
                for p, a in named:
                    self.bind(ast.Name(p), self.argument(a, ctx), scope)
                if fn.args.vararg is not None:
                    self.bind(
                        ast.Name(fn.args.vararg.arg), tuple(self.argument(a, ctx) for a in args[len(params) :]), scope
                    )

    def argument(self, a, ctx):
        self.arguments[id(a)] = (a, ctx)
        return "?" if id(a) in self.untyped else self.kind(a, ctx)

    def check(self, n, ctx):  # records (where, name, found) for VTK, (where, name) for host names
        where = f"{ctx[0]}:{getattr(n, 'lineno', '?')}"
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.fullmatch(r"vtk[A-Z]\w*", n.value):
            self.vtk_refs.append((where, n.value, vtk_class(n.value) is not None))  # AddNewNodeByClass("vtkX")
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and SIGNAL.fullmatch(n.value):
            self.host_uses.append((where, n.value))  # connect("clicked()", ...)
        elif isinstance(n, ast.ImportFrom) and HOST.match(n.module or ""):
            for a in n.names:
                if vtk_class(a.name):
                    self.vtk_refs.append((where, a.name, True))
                else:
                    self.host_uses.append((where, a.name))
        elif isinstance(n, ast.Import):
            self.host_uses += [
                (where, a.name.split(".")[-1])
                for a in n.names
                if HOST.match(a.name) and a.name not in ("qt", "ctk", "slicer")
            ]
        elif isinstance(n, ast.Attribute) and not n.attr.startswith("__"):
            self.check_member(n, ctx, where)

    def vtk_member(self, where, label, classes, n):
        """``n.attr`` must be on one of ``classes``; called, with a number of arguments one of its signatures takes."""
        self.vtk_refs.append((where, label, lookup(classes, n.attr)[0]))
        call = self.called.get(id(n))
        if (
            call is not None
            and not any(isinstance(a, ast.Starred) for a in call.args)
            and None not in [k.arg for k in call.keywords]
            and arities(classes, n.attr)
        ):
            given = len(call.args) + len(call.keywords)
            ok = any(lo <= given <= hi for lo, hi in arities(classes, n.attr))
            self.vtk_refs.append((where, f"{label} with {given} arguments", ok))

    def check_member(self, n, ctx, where):
        d = self.dotted(n, ctx)
        if d is not None:
            *owner, last = d.split(".")
            cls = vtk_class(owner[-1]) or (slicer.vtkMRMLScene if owner[-2:] == ["slicer", "mrmlScene"] else None)
            if cls is not None:
                self.vtk_member(where, d, family(cls), n)
            elif owner in (["vtk"], ["slicer"]) and (owner == ["vtk"] or vtk_class(last)):
                self.vtk_refs.append((where, d, hasattr(vtk if owner == ["vtk"] else slicer, last)))
            elif HOST.match(d) and id(n) not in self.inner and d not in ("slicer.app", "slicer.mrmlScene"):
                self.host_uses.append((where, last))
            return
        owner = self.receiver(n, ctx)
        if isinstance(owner, str) and owner.startswith("vtk"):
            if n.attr[0].isupper():
                self.vtk_member(where, f"{owner}.{n.attr}", family(vtk_class(owner)), n)
        elif n.attr[0].isupper():  # a method on a receiver of unknown class (attributes: numpy's .T ...)
            if id(n) in self.called and n.attr not in NOT_VTK and not is_obj(owner):
                self.vtk_member(where, n.attr, self.anyclass, n)
        elif owner is True or self.inherited(owner, n.attr):
            self.host_uses.append((where, n.attr))


@functools.lru_cache(maxsize=1)
def analysed(paths):
    return Api({str(p.relative_to(ROOT.parent)): p.read_text(encoding="utf-8") for p in paths})


def test_vtk_and_mrml_members_exist():
    api = analysed(tuple(slicer_files()))
    missing = [f"{where} {name}" for where, name, found in api.vtk_refs if not found]
    assert not missing, "not on any slicer-core/vtk class (or add to NOT_VTK, with why):\n" + "\n".join(missing)
    assert len(api.vtk_refs) > 150 and sum("." in n for _, n, _ in api.vtk_refs) > 80  # reached, many exactly


def test_qt_and_slicer_names_were_read_in_slicer_source():
    api = analysed(tuple(slicer_files()))
    unread = {}
    for where, name in api.host_uses:
        if name not in UNCHECKABLE:
            unread.setdefault(name, where)
    assert not unread, (
        "Qt/Slicer names not in UNCHECKABLE: read Slicer's source (or Qt's documentation) and add "
        "each with file:line and what it says:\n" + "\n".join(f"{n}  ({w})" for n, w in unread.items())
    )
    assert all(re.search(r"\w\.(h|cxx|py):\d+|^Qt 5 documentation: Q", v) for v in UNCHECKABLE.values())


def test_the_checks_catch_misspelt_names():
    api = Api(
        {
            "bad.py": "import slicer, qt\ndef f(scene):\n"
            "    seg = scene.AddNewNodeByClass('vtkMRMLSegmentationNode')\n"
            "    seg.GetSegmentation().AddEmptySegmentt('a')\n    seg.SetName()\n"
            "    qt.QTimer.singleShott(0, f)\n"
        }
    )
    assert [n for _, n, found in api.vtk_refs if not found] == [
        "vtkSegmentation.AddEmptySegmentt",
        "vtkMRMLSegmentationNode.SetName with 0 arguments",
    ]
    assert ("bad.py:6", "singleShott") in api.host_uses and "singleShott" not in UNCHECKABLE


# Each Qt/CTK/qSlicer/PythonQt name the files use: where it was read (Slicer source paths are relative to the
# Slicer repository; CTK's to commontk/CTK; Qt's own API is its documentation).
EFFECT = "Modules/Loadable/Segmentations/EditorEffects/"
AE, SE = EFFECT + "qSlicerSegmentEditorAbstractEffect.h", EFFECT + "qSlicerSegmentEditorScriptedEffect.h"
APY = EFFECT + "Python/SegmentEditorEffects/AbstractScriptedSegmentEditorEffect.py"
UTIL, SLM = "Base/Python/slicer/util.py", "Base/Python/slicer/ScriptedLoadableModule.py"
SLMH = "Base/QTGUI/qSlicerScriptedLoadableModule.h"
EDW = "Modules/Loadable/Segmentations/Widgets/qMRMLSegmentEditorWidget.h"
COMBO = "Libs/MRML/Widgets/qMRMLNodeComboBox.h"
PNW, QT = "Base/Python/slicer/parameterNodeWrapper/", "Qt 5 documentation: "
UNCHECKABLE = {
    # the scripted effect (self.scriptedEffect / scriptedEffect) and its Python base class
    "scriptedEffect": f"{APY}:50 self.scriptedEffect = scriptedEffect",
    "name": f"{AE}:74 Q_PROPERTY(QString name READ name WRITE setName)",
    "title": f"{AE}:78 Q_PROPERTY(QString title ...) of the effect; {SLMH}:37 the same of the module",
    "perSegment": f"{AE}:84 Q_PROPERTY(bool perSegment ...)",
    "requireSegments": f"{AE}:90 Q_PROPERTY(bool requireSegments ...)",
    "active": f"{AE}:140 Q_INVOKABLE virtual bool active()",
    "modifySelectedSegmentByLabelmap": f"{AE}:146 Q_INVOKABLE (vtkOrientedImageData*, ModificationMode, bool "
    "bypassMasking), :147 (..., QList<int> extent, bool bypassMasking)",
    "parameterSetNode": f"{AE}:237 Q_INVOKABLE vtkMRMLSegmentEditorNode* parameterSetNode()",
    "addOptionsWidget": f"{AE}:267 Q_INVOKABLE void addOptionsWidget(QWidget*), :268 (QLayout*)",
    "addLabeledOptionsWidget": f"{AE}:270 Q_INVOKABLE QWidget* addLabeledOptionsWidget(QString, QWidget*), :271 "
    "(QString, QLayout*)",
    "parameter": f"{AE}:324 Q_INVOKABLE QString parameter(QString name)",
    "integerParameter": f"{AE}:327 Q_INVOKABLE int integerParameter(QString name)",
    "doubleParameter": f"{AE}:330 Q_INVOKABLE double doubleParameter(QString name)",
    "setParameter": f"{AE}:338 Q_INVOKABLE setParameter(QString, QString), :356 (QString, int), :369 (QString, double)",
    "setParameterDefault": f"{AE}:341 Q_INVOKABLE setParameterDefault(QString, QString), :359 (int), :372 (double)",
    "confirmCurrentSegmentVisible": f"{AE}:399 Q_INVOKABLE int confirmCurrentSegmentVisible() (0: NotConfirmed)",
    "defaultModifierLabelmap": f"{AE}:405 Q_INVOKABLE vtkOrientedImageData* defaultModifierLabelmap()",
    "saveStateForUndo": f"{AE}:428 Q_INVOKABLE void saveStateForUndo()",
    "setPythonSource": f"{SE}:58 Q_INVOKABLE bool setPythonSource(const QString newPythonSource)",
    "self": f"{SE}:61 Q_INVOKABLE PyObject* self() const (the Python effect object)",
    "qSlicerSegmentEditorScriptedEffect": f"{SE}:45 class qSlicerSegmentEditorScriptedEffect; built so in "
    f"{EFFECT}Python/SegmentEditorEffects/__init__.py:50",
    "qSlicerSegmentationsEditorEffectsPythonQt": f"{EFFECT}Python/SegmentEditorEffects/__init__.py:46 imports it so",
    "AbstractScriptedSegmentEditorEffect": f"{APY}:6 class AbstractScriptedSegmentEditorEffect (re-exported by "
    f"SegmentEditorEffects/__init__.py:1)",
    "register": f"{APY}:52 def register(self): registerEffect(self.scriptedEffect)",
    "cleanup": f"{APY}:56 def cleanup(self) (base: pass)",
    "xyToRas": f"{APY}:85 def xyToRas(self, xy, viewWidget) -> [r, a, s] via {AE}:453",
    "className": f"PythonQt's QObject.className(), used the same way in {EFFECT}Python/SegmentEditorEffects/"
    "SegmentEditorDrawEffect.py:59",
    # the Segment Editor widget, slice views, the application
    "qMRMLSegmentEditorWidget": f"{EDW}:65 class qMRMLSegmentEditorWidget : public qMRMLWidget",
    "activeEffect": f"{EDW}:125 Q_INVOKABLE qSlicerSegmentEditorAbstractEffect* activeEffect() const",
    "setMRMLScene": f"{EDW}:285 slot setMRMLScene(vtkMRMLScene*); {COMBO}:272; Libs/MRML/Widgets/qMRMLWidget.h:65",
    "setMRMLSegmentEditorNode": f"{EDW}:288 slot setMRMLSegmentEditorNode(vtkMRMLSegmentEditorNode*)",
    "setSegmentationNode": f"{EDW}:294 slot setSegmentationNode(vtkMRMLNode*)",
    "setSourceVolumeNode": f"{EDW}:300 slot setSourceVolumeNode(vtkMRMLNode*)",
    "setCurrentSegmentID": f"{EDW}:318 slot setCurrentSegmentID(const QString&)",
    "setActiveEffectByName": f"{EDW}:321 slot setActiveEffectByName(const QString&)",
    "undo": f"{EDW}:381 slot undo()",
    "layoutManager": "Base/QTGUI/qSlicerApplication.h:104 Q_INVOKABLE qSlicerLayoutManager* layoutManager() const",
    "startupCompleted()": "Base/QTGUI/qSlicerApplication.h:248 signal void startupCompleted()",
    "sliceWidget": "Libs/MRML/Widgets/qMRMLLayoutManager.h:134 Q_INVOKABLE qMRMLSliceWidget* sliceWidget(QString)",
    "mrmlSliceNode": "Libs/MRML/Widgets/qMRMLSliceWidget.h:75 Q_INVOKABLE vtkMRMLSliceNode* mrmlSliceNode() const",
    "sliceView": "Libs/MRML/Widgets/qMRMLSliceWidget.h:132 Q_INVOKABLE qMRMLSliceView* sliceView() const",
    "interactor": "CTK Libs/Visualization/VTK/Widgets/ctkVTKAbstractView.h:162 Q_INVOKABLE vtkRenderWindowInteractor* "
    "interactor() const (qMRMLSliceView : ctkVTKSliceView, Libs/MRML/Widgets/qMRMLSliceView.h:43)",
    "qMRMLNodeComboBox": f"{COMBO}:56 class qMRMLNodeComboBox : public QWidget",
    "nodeTypes": f"{COMBO}:61 Q_PROPERTY(QStringList nodeTypes ...)",
    "noneEnabled": f"{COMBO}:73 Q_PROPERTY(bool noneEnabled ...)",
    "addEnabled": f"{COMBO}:74 Q_PROPERTY(bool addEnabled ...)",
    "removeEnabled": f"{COMBO}:75 Q_PROPERTY(bool removeEnabled ...)",
    "renameEnabled": f"{COMBO}:77 Q_PROPERTY(bool renameEnabled ...)",
    "ctkCollapsibleButton": "CTK Libs/Widgets/ctkCollapsibleButton.h:45 class ctkCollapsibleButton : QAbstractButton",
    "collapsed": "CTK Libs/Widgets/ctkCollapsibleButton.h:48 Q_PROPERTY(bool collapsed ...)",
    # the scripted module (ScriptedLoadableModule.py) and its Qt side
    "ScriptedLoadableModule": f"{SLM}:17 class ScriptedLoadableModule",
    "ScriptedLoadableModuleWidget": f"{SLM}:88 class ScriptedLoadableModuleWidget",
    "ScriptedLoadableModuleLogic": f"{SLM}:296 class ScriptedLoadableModuleLogic",
    "ScriptedLoadableModuleTest": f"{SLM}:367 class ScriptedLoadableModuleTest(unittest.TestCase)",
    "parent": f"{SLM}:20 self.parent = parent (the module; :104 the widget's)",
    "layout": f"{SLM}:105 self.layout = self.parent.layout()",
    "setup": f"{SLM}:232 ScriptedLoadableModuleWidget.setup(self)",
    "delayDisplay": f"{SLM}:389 def delayDisplay(self, message, requestedDelay=None, msec=None)",
    "categories": f"{SLMH}:39 Q_PROPERTY(QStringList categories ...)",
    "contributors": f"{SLMH}:40 Q_PROPERTY(QStringList contributors ...)",
    "helpText": f"{SLMH}:42 Q_PROPERTY(QString helpText ...)",
    "acknowledgementText": f"{SLMH}:43 Q_PROPERTY(QString acknowledgementText ...)",
    "dependencies": f"{SLMH}:47 Q_PROPERTY(QStringList dependencies ...)",
    "isEntered": "Base/QTGUI/qSlicerAbstractModuleWidget.h:44 Q_PROPERTY(bool isEntered READ isEntered)",
    "parameterNodeWrapper": f"{PNW}wrapper.py:367 def parameterNodeWrapper(classtype=None)",
    "connectGui": f"{PNW}wrapper.py:352 connectGui = _connectGui (:243, finds widgets by SlicerParameterName)",
    "disconnectGui": f"{PNW}wrapper.py:354 disconnectGui = _disconnectGui (:258)",
    "Choice": f"{PNW}validators.py:126 class Choice(Validator) (star-exported, parameterNodeWrapper/__init__.py:11)",
    "WithinRange": f"{PNW}validators.py:83 class WithinRange(Validator)",
    "tr": "Base/Python/slicer/i18n.py:54 def tr(text)",
    "translate": "Base/Python/slicer/i18n.py:9 def translate(context, text)",
    # slicer.util, slicer.packaging, the PyTorch extension
    "showStatusMessage": f"{UTIL}:546 def showStatusMessage(message, duration=0)",
    "findChild": f"{UTIL}:608 def findChild(widget, name, properties=None) (UndoButton: "
    "Modules/Loadable/Segmentations/Widgets/Resources/UI/qMRMLSegmentEditorWidget.ui:183)",
    "arrayFromVolume": f"{UTIL}:2055 def arrayFromVolume(volumeNode)",
    "updateVolumeFromArray": f"{UTIL}:2650 def updateVolumeFromArray(volumeNode, narray)",
    "VTKObservationMixin": f"{UTIL}:3164 class VTKObservationMixin",
    "removeObservers": f"{UTIL}:3180 def removeObservers(self, method=None)",
    "addObserver": f"{UTIL}:3192 def addObserver(self, obj, event, method, group='none', priority=0.0)",
    "removeObserver": f"{UTIL}:3205 def removeObserver(self, obj, event, method)",
    "infoDisplay": f"{UTIL}:3333 def infoDisplay(text, windowTitle=None, parent=None, standardButtons=None, **kwargs)",
    "errorDisplay": f"{UTIL}:3359 def errorDisplay(text, ..., **kwargs) (detailedText: a QMessageBox property)",
    "confirmOkCancelDisplay": f"{UTIL}:3372 def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs)",
    "createProgressDialog": f"{UTIL}:3497 def createProgressDialog(parent, value, maximum, labelText, windowTitle, "
    "**kwargs): a QProgressDialog; other kwargs set when it has them (:3522)",
    "tryWithErrorDisplay": f"{UTIL}:3692 def tryWithErrorDisplay(message=None, show=True, waitCursor=False)",
    "pip_install": f"{UTIL}:4470 def pip_install(requirements, **kwargs) (packaging.py:526: str | list[str])",
    "packaging": "Base/Python/slicer/packaging.py:1 the module slicer.packaging (older Slicer: ImportError, handled)",
    "load_requirements": "Base/Python/slicer/packaging.py:40 def load_requirements(path) -> list[Requirement]",
    "pip_ensure": "Base/Python/slicer/packaging.py:327 def pip_ensure(requirements, ..., skip_packages, requester)",
    "PyTorchUtils": "SlicerPyTorch extension (fepegar/SlicerPyTorch) PyTorchUtils/PyTorchUtils.py:110, not Slicer",
    "PyTorchUtilsLogic": "SlicerPyTorch PyTorchUtils/PyTorchUtils.py:110 class PyTorchUtilsLogic",
    "installTorch": "SlicerPyTorch PyTorchUtils/PyTorchUtils.py:194 def installTorch(self, askConfirmation=False, "
    "forceComputationBackend=None, torchVersionRequirement=None, ...): torch, or None if declined",
    "connect": f"PythonQt QObject.connect(signal, callable), as {SLM}:166 does",
    "disconnect": f"PythonQt QObject.disconnect(signal, callable), as {UTIL}:747 does",
    # Qt's own
    **{
        c: QT + c
        for c in (
            "QWidget",
            "QLabel",
            "QLineEdit",
            "QPushButton",
            "QCheckBox",
            "QComboBox",
            "QSpinBox",
            "QDoubleSpinBox",
            "QVBoxLayout",
            "QHBoxLayout",
            "QFormLayout",
            "QTimer",
            "QIcon",
        )
    },
    "QPixmap": QT + "QPixmap::QPixmap(const QString &fileName)",
    "QCursor": QT + "QCursor::QCursor(const QPixmap &pixmap, int hotX, int hotY)",
    "addItem": QT + "QComboBox::addItem(const QString &text, const QVariant &userData)",
    "addItems": QT + "QComboBox::addItems(const QStringList &texts)",
    "clear": QT + "QComboBox::clear()",
    "findData": QT + "QComboBox::findData(const QVariant &data)",
    "itemData": QT + "QComboBox::itemData(int index)",
    "currentText": QT + "QComboBox::currentText property (WRITE setCurrentText)",
    "currentData": QT + "QComboBox::currentData property",
    "editable": QT + "QComboBox::editable property",
    "activated(int)": QT + "QComboBox::activated(int index) signal",
    "currentIndexChanged(int)": QT + "QComboBox::currentIndexChanged(int index) signal",
    "currentTextChanged(QString)": QT + "QComboBox::currentTextChanged(const QString &text) signal",
    "valueChanged(int)": QT + "QSpinBox::valueChanged(int i) signal",
    "valueChanged(double)": QT + "QDoubleSpinBox::valueChanged(double d) signal",
    "value": QT + "QSpinBox::value / QDoubleSpinBox::value properties; QSettings::value(key, defaultValue)",
    "minimum": QT + "QSpinBox::minimum / QDoubleSpinBox::minimum properties",
    "maximum": QT + "QSpinBox::maximum / QDoubleSpinBox::maximum properties",
    "checked": QT + "QAbstractButton::checked property",
    "text": QT + "QLabel::text / QAbstractButton::text properties",
    "clicked()": QT + "QAbstractButton::clicked(bool checked = false) signal",
    "clicked(bool)": QT + "QAbstractButton::clicked(bool checked = false) signal",
    "toggled(bool)": QT + "QAbstractButton::toggled(bool checked) signal",
    "wordWrap": QT + "QLabel::wordWrap property",
    "toolTip": QT + "QWidget::toolTip property",
    "enabled": QT + "QWidget::enabled property",
    "objectName": QT + "QObject::objectName property",
    "show": QT + "QWidget::show()",
    "close": QT + "QWidget::close()",
    "setWindowModality": QT + "QWidget::setWindowModality(Qt::WindowModality)",
    "setProperty": QT + "QObject::setProperty(const char *name, const QVariant &value)",
    "blockSignals": QT + "QObject::blockSignals(bool block), returns the previous state",
    "deleteLater": QT + "QObject::deleteLater()",
    "addWidget": QT + "QBoxLayout::addWidget(QWidget*) / QLayout::addWidget(QWidget*)",
    "addStretch": QT + "QBoxLayout::addStretch(int stretch)",
    "addRow": QT + "QFormLayout::addRow(const QString &labelText, QWidget *field) / addRow(QWidget*)",
    "setValue": QT
    + "QProgressDialog::setValue(int progress); QSettings::setValue(const QString &key, const QVariant &)",
    "QSettings": QT + "QSettings::QSettings(QObject *parent = nullptr): the application's settings (Slicer sets "
    "the organisation and application names); value(const QString &key, const QVariant &defaultValue)",
    "setCancelButtonText": QT + "QProgressDialog::setCancelButtonText(const QString &text)",
    "wasCanceled": QT + "QProgressDialog::wasCanceled property",
    "setLabelText": QT + "QProgressDialog::setLabelText(const QString &text)",
    "setSingleShot": QT + "QTimer::setSingleShot(bool)",
    "setInterval": QT + "QTimer::setInterval(int msec)",
    "start": QT + "QTimer::start()",
    "stop": QT + "QTimer::stop()",
    "timeout()": QT + "QTimer::timeout() signal",
    "getOpenFileName": QT + "QFileDialog::getOpenFileName(parent, caption, dir, filter) (static)",
    "setOverrideCursor": QT + "QGuiApplication::setOverrideCursor(const QCursor &cursor) (static)",
    "restoreOverrideCursor": QT + "QGuiApplication::restoreOverrideCursor() (static)",
    "processEvents": QT + "QCoreApplication::processEvents() (slicer.app is the application)",
    "WaitCursor": QT + "Qt::CursorShape Qt::WaitCursor",
    "WindowModal": QT + "Qt::WindowModality Qt::WindowModal",
}
