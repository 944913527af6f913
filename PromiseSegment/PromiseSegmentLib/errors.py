"""The errors every layer reports, importable before torch is installed (Slicer's effect and module
catch them before the first model is loaded). Every PromiseSegment error is a ``PromiseError`` with a
one-sentence message for the user; ``Cancelled`` is not an error but the user's choice."""


class PromiseError(Exception):
    """Base of PromiseSegment's own errors: the message is meant for the user as it is."""


class InputError(PromiseError, ValueError):
    """The input image/volume or an option cannot be used as given; the message says why."""


class Cancelled(Exception):
    """The user cancelled a long run; nothing was written."""


class AdapterError(PromiseError, ValueError):
    """An adapter file is unreadable or does not fit the chosen backbone."""


class CheckpointError(PromiseError, RuntimeError):
    """A checkpoint could not be found, downloaded, verified or loaded. The message says how to fix it."""


class WriteError(PromiseError, OSError):
    """A file could not be written completely (a full disk, no permission, another run's file at its name);
    nothing was left at its name (an existing file there is unchanged). The message says which file and why."""
