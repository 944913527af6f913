"""The errors every layer reports, importable before torch is installed (Slicer's effect and module
catch them before the first model is loaded). Every PromiseSegment error is a ``PromiseError`` with a
one-sentence message for the user; ``Cancelled`` is not an error but the user's choice."""


class PromiseError(Exception):
    """Base of PromiseSegment's own errors: the message is meant for the user as it is."""


class InputError(PromiseError, ValueError):
    """The input image/volume or an option cannot be used as given; the message says why."""


class Cancelled(Exception):
    """The user cancelled a long run; nothing was written."""
