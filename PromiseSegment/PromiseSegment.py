"""PromiseSegment scripted module (3D Slicer).

The Slicer-side module is being built: for now it declares the module and puts the core
(``PromiseSegmentLib``) on Slicer's Python path; the console logic, the module widget and the
Segment Editor effect come next (see the project's issues). Outside Slicer, use the core directly
or the ``promise-segment`` command line.
"""
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class PromiseSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PromiseSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["PromiseSegment developers"]
        self.parent.helpText = (
            "ProMISe: a frozen Segment Anything Model with an Auto-Prompting Module and Incremental "
            "Pattern Shifting, for promptable and automatic segmentation of medical images.")
        self.parent.acknowledgementText = "Uses Segment Anything (Meta AI, Apache-2.0)."
