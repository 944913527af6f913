"""The ``promise-segment`` command line: arguments, checks before any model work, commands, progress.
Imports no torch, so argument errors come back at once."""
