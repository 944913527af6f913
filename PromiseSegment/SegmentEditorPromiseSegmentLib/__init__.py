# Slicer's effect template re-exports the effect class here: when this package is imported before the
# effect is registered, qSlicerSegmentEditorScriptedEffect::setPythonSource finds the class (not the
# submodule) as sys.modules["SegmentEditorPromiseSegmentLib"].SegmentEditorEffect.
from .SegmentEditorEffect import *  # noqa: F401,F403
