"""The module and the ProMISe effect loaded and driven the way Slicer does it, each scenario in a fresh
interpreter (``slicer_host`` re-enacts the C++ loading paths on slicer-core; see its docstring for the
Slicer sources mirrored): module file -> startupCompleted -> effect registration -> the editor's clone,
activation, parameters, mouse events, Apply, cleanup."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1] / "PromiseSegment"
EFFECT_FILE = MODULE_DIR / "SegmentEditorPromiseSegmentLib" / "SegmentEditorEffect.py"

PRELUDE = f"""
import json, os, sys
import numpy as np
import slicer_host as host
host.install()
MODULE_FILE = {str(MODULE_DIR / "PromiseSegment.py")!r}
EFFECT_FILE = {str(EFFECT_FILE).replace(os.sep, "/")!r}

def result(**values):
    print("RESULT " + json.dumps(dict(values, errors=host.ERRORS)))

def start_slicer(package_first=False):
    host.load_scripted_module(MODULE_FILE)  # every scripted module is loaded and instantiated first
    if package_first:
        import SegmentEditorPromiseSegmentLib
    host.startup_completed()
    return slicer.qSlicerSegmentEditorEffectFactory.instance().registeredEffects()

import slicer

def editor_with_effect(backbone="sam_vit_b"):
    from slicer_scene import add_segmentation, add_volume, make_app
    start_slicer()
    app = make_app()
    volume = add_volume(app.scene, np.zeros((6, 40, 44), np.int16), np.diag([0.8, 0.8, 2.0, 1.0]))
    seg = add_segmentation(app.scene, volume)
    seg.CreateDefaultDisplayNodes()
    sid = seg.GetSegmentation().AddEmptySegment("a", "a")
    editor = host.SegmentEditorWidget(app, seg, volume, sid)
    effect = editor.effectByName("ProMISe")
    assert effect is not None, "the editor cloned the ProMISe effect"
    effect.setParameter("Backbone", backbone)  # not the default: activation must not load a model here
    return app, editor, effect, volume, seg, sid
"""


def run_in_slicer(code: str) -> dict:
    # the module folder is *not* on the path: the factory adds it
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "utils"))
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("package_first", [False, True], ids=["nothing imported", "package imported first"])
def test_the_module_registers_the_effect_at_startup(package_first):
    out = run_in_slicer(f"""
        effects = start_slicer(package_first={package_first})
        names = [e.name for e in effects]
        python = effects[0].self() if effects else None
        result(names=names, cls=type(python).__name__, module=type(python).__module__)
    """)
    assert out["errors"] == []
    assert out["names"] == ["ProMISe"]
    assert out["cls"] == "SegmentEditorEffect"


def test_the_effect_file_loads_as_set_python_source_loads_it_in_a_fresh_interpreter():
    """Nothing imported before, only the module folder on sys.path (as the scripted-module factory leaves
    it): the file is executed as a plain module named after its folder."""
    out = run_in_slicer("""
        sys.path.append(os.path.dirname(MODULE_FILE))
        effect = host.ScriptedEffect(None)
        ok = effect.setPythonSource(EFFECT_FILE)
        module = sys.modules.get("SegmentEditorPromiseSegmentLib")
        result(ok=ok, cls=type(effect.self()).__name__, name=effect.name,
               is_package=hasattr(module, "__path__"))
    """)
    assert out["errors"] == [] and out["ok"]
    assert (out["cls"], out["name"]) == ("SegmentEditorEffect", "ProMISe")


def test_the_editor_clones_activates_and_cleans_up_the_effect():
    out = run_in_slicer("""
        app, editor, effect, volume, seg, sid = editor_with_effect()
        editor.setActiveEffectByName("ProMISe")
        active = editor.activeEffect()
        host.process_events()  # the activation's deferred step
        status, source = active.self().statusLabel.text, effect.sourcePath
        editor.setActiveEffectByName("")
        editor.delete()
        result(active=active is effect, status=status, clone_source=source)
    """)
    assert out["errors"] == []
    assert out["active"] and out["clone_source"].endswith("SegmentEditorPromiseSegmentLib/SegmentEditorEffect.py")
    assert "Load model" in out["status"]


def test_a_deferred_activation_never_fires_after_the_editor_is_gone():
    """Tests (and users closing a scene) create and drop editors: the activation's queued model load must
    die with the effect, not run later against deleted widgets (PythonQt reports that as an error)."""
    out = run_in_slicer("""
        app, editor, effect, volume, seg, sid = editor_with_effect()
        editor.setActiveEffectByName("ProMISe")
        editor.delete()
        host.process_events()
        result()
    """)
    assert out["errors"] == []


def test_the_effect_cursor_is_the_size_of_slicers_own():
    """Slicer's own effects have 21 px icons under a 21 px arrow: 42 px cursors. The default cursor stacks
    the effect's 128 px icon: 149 px."""
    out = run_in_slicer("""
        app, editor, effect, volume, seg, sid = editor_with_effect()
        cursor = effect.createCursor(slicer.app.layoutManager().sliceWidget("Red"))
        pixmap, hot = cursor.pixmap(), cursor.hotSpot()
        result(size=[pixmap.width(), pixmap.height()], hot=[hot.x(), hot.y()])
    """)
    assert out["errors"] == []
    assert 16 <= max(out["size"]) <= 42
    assert all(0 <= h < s for h, s in zip(out["hot"], out["size"]))


def test_modifier_presses_go_on_to_the_view():
    """Box mode: Shift/Ctrl/Alt + left press is the view's (pan, zoom, window/level ...), as in Slicer's
    Draw and Threshold effects; so is a release without a press taken. Clicks mode: Shift+click stays a
    negative click, Ctrl/Alt go on."""
    out = run_in_slicer("""
        import vtk
        app, editor, effect, volume, seg, sid = editor_with_effect()
        editor.setActiveEffectByName("ProMISe")
        view = slicer.app.layoutManager().sliceWidget("Red")
        interactor = view.interactor
        press, release = vtk.vtkCommand.LeftButtonPressEvent, vtk.vtkCommand.LeftButtonReleaseEvent
        def consumed(mode, event, shift=0, ctrl=0, alt=0):
            effect.setParameter("PromptTool", mode)
            interactor.SetShiftKey(shift); interactor.SetControlKey(ctrl); interactor.SetAltKey(alt)
            return bool(effect.self().processInteractionEvents(interactor, event, view))
        result(box_plain=consumed("box", press), box_shift=consumed("box", press, shift=1),
               box_ctrl=consumed("box", press, ctrl=1), box_alt=consumed("box", press, alt=1),
               box_release=consumed("box", release), clicks_shift=consumed("clicks", press, shift=1),
               clicks_ctrl=consumed("clicks", press, ctrl=1))
    """)
    assert out.pop("errors") == []
    assert out == {
        "box_plain": True,
        "box_shift": False,
        "box_ctrl": False,
        "box_alt": False,
        "box_release": False,
        "clicks_shift": True,
        "clicks_ctrl": False,
    }


def test_window_parameters_keep_every_digit_the_widgets_show():
    """``setParameter(name, float)`` stores 6 significant digits: 12345.67 would run as 12345.7."""
    out = run_in_slicer("""
        app, editor, effect, volume, seg, sid = editor_with_effect()
        widget = effect.self()
        widget.customWindow.checked = True
        widget.windowCenter.value = 12345.67
        widget.windowWidth.value = 98765.43
        rule = widget.intensity()
        result(shown=[widget.windowCenter.value, widget.windowWidth.value],
               stored=[effect.doubleParameter("WindowCenter"), effect.doubleParameter("WindowWidth")],
               back=[widget.windowCenter.value, widget.windowWidth.value])
    """)
    assert out["errors"] == []
    assert out["shown"] == [12345.67, 98765.43]
    assert out["stored"] == out["shown"] == out["back"]


def test_apply_through_the_effect_leaves_other_segments_alone_and_undoes_in_one_step():
    """The effect's own write path (modifySelectedSegmentByLabelmap into the editor's real logic): segment
    c, in another layer, overlaps a on slice 2; writing slice 4 keeps c whole and a's other slices."""
    out = run_in_slicer("""
        app, editor, effect, volume, seg, sid = editor_with_effect()
        from PromiseSegmentSlicerLib.mrml import labelmap_from_mask, segment_mask, slice_extent, volume_ijk_to_ras
        from slicer_scene import write_mask
        m = volume_ijk_to_ras(volume)
        a = np.zeros((6, 40, 44), np.uint8); a[1:5, 10:20, 10:20] = 1
        c = np.zeros_like(a); c[2, 12:28, 12:28] = 1
        cid = seg.GetSegmentation().AddEmptySegment("c", "c")
        write_mask(a, m, seg, sid); write_mask(c, m, seg, cid)
        new = np.zeros_like(a); new[4, 5:25, 5:25] = 1
        extent = slice_extent(a.shape, 0, 4)
        effect.self().modify(labelmap_from_mask(new, m, extent), extent)
        after_a, after_c = segment_mask(seg, sid, volume), segment_mask(seg, cid, volume)
        expected_a = a.copy(); expected_a[4] = new[4]
        editor.undo()
        result(a_ok=bool((after_a == expected_a).all()), c_ok=bool((after_c == c).all()),
               undone=bool((segment_mask(seg, sid, volume) == a).all() and (segment_mask(seg, cid, volume) == c).all()))
    """)
    assert out.pop("errors") == []
    assert out == {"a_ok": True, "c_ok": True, "undone": True}
