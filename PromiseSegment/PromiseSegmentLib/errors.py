"""The two errors every layer reports, importable before torch is installed (Slicer's effect and module
catch them before the first model is loaded)."""


class InputError(ValueError):
    """The input image/volume cannot be segmented as given; the message says why."""


class Cancelled(Exception):
    """The user cancelled a long run; nothing was written."""
