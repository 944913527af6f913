"""Small Qt helpers of the ProMISe effect: option rows, signal blocking, the slice view's normal, the
translated mode labels."""
import contextlib

import qt
from slicer.i18n import tr as _


def modeLabels():
    return {"box": _("box (drag in a slice view)"), "automatic": _("automatic (adapter's APM; clicks refine)"),
            "clicks": _("clicks (left +, Shift/right -; SAM ViT backbones)")}


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
